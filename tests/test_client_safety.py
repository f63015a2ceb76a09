"""Issue "Safe by default", item 9: the client and `dalorra predict` when things go wrong (no server needed)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import pytest

from clients.batch import run_batch
from clients.client import Client, Unreachable
from server.protocol import PredictResponse
from tests.server_utils import free_port


def test_connection_refused_is_one_clear_error_after_bounded_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = time.monotonic()
    with Client(url, retries=2, backoff=0.05) as c, pytest.raises(Unreachable) as exc:
        c.predict("q?", ["a", "b"])
    assert 0.1 <= time.monotonic() - t < 5  # two backoffs (0.05 s, 0.1 s), then it gives up
    assert "cannot connect" in str(exc.value) and url in str(exc.value)


# `dalorra predict` as the console script wires it (whichever package hosts the entry point)
CLI = (
    "import argparse, sys; from clients.cli import add_predict; p = argparse.ArgumentParser(prog='dalorra'); "
    "add_predict(p.add_subparsers()); a = p.parse_args(); sys.exit(a.func(a))"
)


def test_cli_connection_error_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CLI,
            "predict",
            "--url",
            url,
            "--question",
            "q?",
            "--choice",
            "a",
            "--choice",
            "b",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "cannot connect" in lines[0], r.stderr


class FakeClient:
    """Answers choice 0 with confidence 0.9 (answer) for even items and 0.4 (abstain) for odd ones;
    raises KeyboardInterrupt on call number `stop_at`."""

    def __init__(self, stop_at: int | None = None):
        self.calls, self.stop_at, self.asked = 0, stop_at, []

    def predict_many(self, body):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        out = []
        for it in body:
            self.asked.append(it["id"])
            n = int(it["question"].split()[-1])
            conf = 0.9 if n % 2 == 0 else 0.4
            probs = [conf, (1 - conf) / 2, (1 - conf) / 2]
            out.append(
                PredictResponse(
                    id=it["id"],
                    adapter="a",
                    answer=it["choices"][0],
                    answer_index=0,
                    probabilities=probs,
                    confidence=conf,
                    entropy=0.3,
                    entropy_norm=0.4,
                    aleatoric=0.3,
                    aleatoric_norm=0.4,
                    epistemic=0.0,
                    epistemic_norm=0.0,
                    decision="answer" if conf > 0.5 else "abstain",
                    abstain_reason=None if conf > 0.5 else "low_confidence",
                    prediction_set=[0],
                    samples=2,
                    latency_ms=1.0,
                    receipt=f"receipt-{it['id']}",
                )
            )
        return out


def test_predict_file_writes_as_it_goes_resumes_and_keeps_receipts(tmp_path, capsys):
    data = tmp_path / "items.jsonl"
    # labels: item n is right (label 0) unless n is 2 (a wrong answered item)
    data.write_text(
        "".join(
            json.dumps({"question": f"q {n}", "choices": ["x", "y", "z"], "label": 1 if n == 2 else 0}) + "\n"
            for n in range(6)
        )
    )
    out = tmp_path / "out.jsonl"
    a = argparse.Namespace(file=str(data), out=str(out), batch=2, adapter=None, samples=None, adaptive=None)
    assert run_batch(FakeClient(stop_at=3), a) == 130  # interrupted during the third batch
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["receipt"].startswith("receipt-") for r in rows)  # not in a hidden .tmp
    with out.open("a") as f:
        f.write('{"id": "torn')  # a kill mid-write leaves a partial line
    again = FakeClient()
    assert run_batch(again, a) == 0
    assert again.asked == ["items-5", "items-6"]  # only what was missing
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"items-{i}" for i in range(1, 7)]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["done"] == 6 and summary["answered"] == 3 and summary["labelled"] == 6
    assert summary["accuracy"] == pytest.approx(5 / 6)
    assert summary["labelled_answered"] == 3 and summary["accuracy_answered"] == pytest.approx(2 / 3)


def test_eval_writes_metrics_without_matplotlib(tmp_path, monkeypatch, capsys):
    """`dalorra eval --out-dir` skips the plot with a warning when matplotlib is missing, instead of crashing
    before metrics.json is written."""
    import numpy as np

    from adapters.cli import _plot_or_warn
    from adapters.evaluate import plot_reliability

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    probs, labels = np.array([[0.7, 0.3], [0.4, 0.6]]), np.array([0, 0])
    assert _plot_or_warn(plot_reliability, tmp_path / "x.png", probs, labels, "x") is False
    assert not (tmp_path / "x.png").exists() and "matplotlib is not installed" in capsys.readouterr().err
