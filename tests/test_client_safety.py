"""Issue "Safe by default", item 9: the client and `dalorra predict` when things go wrong (no server needed)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from clients.batch import run_batch
from clients.client import Client, Unreachable
from clients.router import AbstainRouter
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

    def __init__(self, stop_at: int | None = None, refuse: tuple[str, ...] = ()):
        self.calls, self.stop_at, self.asked = 0, stop_at, []
        self.fed: list[tuple[str, int]] = []
        self.refuse = refuse  # receipts whose feedback the "server" refuses

    def feedback(self, receipt, label):
        from clients.client import BadRequest
        from server.protocol import FeedbackResponse

        if receipt in self.refuse:
            raise BadRequest(422, "invalid_receipt", "receipt signature does not verify")
        dup = any(r == receipt for r, _ in self.fed)
        self.fed.append((receipt, label))
        return FeedbackResponse(accepted=True, duplicate=dup, correct=label == 0)

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


def _items_file(tmp_path, n=6, unlabelled=()):
    data = tmp_path / "items.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"question": f"q {i}", "choices": ["x", "y", "z"]}
                | ({} if i in unlabelled else {"label": i % 3})
            )
            + "\n"
            for i in range(n)
        )
    )
    return data


def test_progress_bar_counts_items_not_batches(tmp_path, capsys):
    a = argparse.Namespace(
        file=str(_items_file(tmp_path, 5)), out=None, batch=2, adapter=None, samples=None, adaptive=None
    )
    assert run_batch(FakeClient(), a) == 0
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "5/5" in bar[-1] and "item" in bar[-1], bar[-1]  # 3 requests, 5 items
    assert not any("3/3" in line for line in bar)


def test_feedback_sends_each_label_once_also_across_a_resume(tmp_path, capsys):
    data = _items_file(tmp_path, 6, unlabelled=(3,))
    out = tmp_path / "out.jsonl"
    a = argparse.Namespace(file=str(data), out=str(out), batch=2, adapter=None, samples=None, adaptive=None)
    assert run_batch(FakeClient(stop_at=2), a) == 130  # an earlier run without --feedback: 2 answers in --out
    a.feedback = True
    c = FakeClient(refuse=("receipt-items-5",))
    assert run_batch(c, a) == 0
    # every labelled item once, resumed ones included; not the unlabelled items-4, nor items-5 (refused)
    sent = {f"receipt-items-{i + 1}": i % 3 for i in (0, 1, 2, 5)}
    assert sorted(c.fed) == sorted(sent.items())
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["items-5"]["feedback"].startswith("error: ") and rows["items-1"]["feedback"] == "accepted"
    assert "feedback" not in rows["items-4"]
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["feedback"] == {"accepted": 4, "error": 1}
    assert "feedback for 'items-5' refused" in captured.err
    again = FakeClient()
    assert run_batch(again, a) == 0
    assert again.fed == [("receipt-items-5", 1)]  # only the refused one is tried again


def test_predict_help_is_clean_and_names_the_environment():
    r = subprocess.run(
        [sys.executable, "-c", CLI, "predict", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DALORRA_API_TOKEN": "s3cret-token", "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    assert "(default: None)" not in r.stdout and "(default: False)" not in r.stdout
    assert "s3cret-token" not in r.stdout  # a token from the environment is never printed
    assert "DALORRA_URL" in r.stdout and "DALORRA_API_TOKEN" in r.stdout and "(default: 8)" in r.stdout
    assert all(line.count("default") <= 1 for line in r.stdout.splitlines()), r.stdout
    assert "--feedback" in r.stdout


def test_feedback_without_a_file_is_refused():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CLI,
            "predict",
            "--question",
            "q?",
            "--choice",
            "a",
            "--choice",
            "b",
            "--feedback",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--feedback" in r.stderr and "--file" in r.stderr


class AbstainingClient:
    """Always abstains; records the feedback the router sends."""

    def __init__(self):
        self.fed = []

    def predict(self, question, choices, **kw):
        return FakeClient().predict_many([{"id": "x", "question": "q 1", "choices": choices}])[0]

    def feedback(self, receipt, label):
        self.fed.append(label)


@pytest.mark.parametrize("returned,index", [(2, 2), ("z", 2), (0, 0)])
def test_router_fallback_returns_an_index_or_a_choice(returned, index):
    c = AbstainingClient()
    routed = AbstainRouter(c, fallback=lambda q, ch, p: returned).route("q 1", ["x", "y", "z"])
    assert routed.path == "fallback" and routed.answer_index == index and routed.answer == "xyz"[index]
    assert c.fed == [index]


@pytest.mark.parametrize("returned", ["a fish", 3, -1, True, None])
def test_router_fallback_with_no_usable_answer_says_what_it_must_return(returned):
    with pytest.raises(ValueError, match=r"must return the index \(0 to 2\)"):
        AbstainRouter(AbstainingClient(), fallback=lambda q, ch, p: returned).route("q 1", ["x", "y", "z"])


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
