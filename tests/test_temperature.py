"""Calibrated by default: `dalorra train` fits one temperature, the server divides every mask's logits by it."""

import json
import shutil

import httpx
import numpy as np
import pytest

from adapters.adapter_io import load_adapter
from adapters.basemodel import load_base
from adapters.calibration import tempered_nll
from adapters.data import load_jsonl
from adapters.decision import split_calibration
from adapters.evaluate import predict_logits
from adapters.scoring import score
from adapters.train import load_splits, run
from adapters.uncertainty import summarize
from tests.conftest import make_tiny
from tests.server_utils import ServerProcess
from tests.test_train import _cfg, small_data  # noqa: F401  (fixture)


def test_train_fits_a_temperature_and_the_thresholds_after_it(tmp_path, tiny_dir, small_data, tokenizer):  # noqa: F811
    rec = run(_cfg(tmp_path, tiny_dir, small_data, steps=16, lr=2e-2))
    T = rec["temperature"]
    fit = rec["temperature_fit"]
    assert T > 0 and T != 1.0
    assert fit["nll_after"] <= fit["nll_before"] + 1e-12  # the fit never makes the calibration NLL worse
    # the calibration record describes the temperature-scaled predictions the server will serve
    model = load_adapter(tmp_path / "ad", make_tiny(seed=1), tokenizer)
    assert json.loads((tmp_path / "ad" / "dalorra.json").read_text())["temperature"] == pytest.approx(T)
    _, _, calib = load_splits(_cfg(tmp_path, tiny_dir, small_data))  # the trainer's own seeded split
    lg = predict_logits(model, calib, 3, seed=0, progress=False)
    labels = np.array([it.label for it in calib])
    # T is fitted on the temperature part; the thresholds and their metrics on the other, disjoint part
    t_idx, d_idx = split_calibration(len(calib), 0)
    assert fit["items"] == len(t_idx) and rec["decision"]["policy"]["split"]["decision_items"] == len(d_idx)
    assert tempered_nll(lg[:, t_idx], labels[t_idx], T) == pytest.approx(fit["nll_after"], abs=1e-6)
    assert rec["calibration"]["metrics"]["nll"] == pytest.approx(
        tempered_nll(lg[:, d_idx], labels[d_idx], T), abs=1e-6
    )


def test_opt_out_stores_no_temperature(tmp_path, tiny_dir, small_data):  # noqa: F811
    rec = run(_cfg(tmp_path, tiny_dir, small_data, steps=4, temperature_scaling=False))
    assert "temperature" not in rec and "decision" in rec


@pytest.mark.smollm
def test_served_probabilities_use_the_stored_temperature(adapters_dir, tmp_path, data_dir):
    d = tmp_path / "adapters"
    shutil.copytree(adapters_dir / "test-ad", d / "hot")
    rec = json.loads((d / "hot" / "dalorra.json").read_text())
    rec["temperature"] = 2.5
    (d / "hot" / "dalorra.json").write_text(json.dumps(rec))
    items = load_jsonl(data_dir / "arc_easy" / "validation.jsonl", limit=2)
    srv = ServerProcess(d, "hot", tmp_path / "server.log").wait_ready()
    try:
        body = [
            {"question": it.question, "choices": list(it.choices), "samples": 4, "seed": 3} for it in items
        ]
        got = httpx.post(srv.url + "/predict", json=body, timeout=120).json()
        info = httpx.get(srv.url + "/v1/adapters/hot", timeout=30).json()
    finally:
        srv.stop()
    assert info["temperature"] == pytest.approx(2.5)
    base, tok = load_base(None)
    raw = score(load_adapter(d / "hot", base, tok), items, samples=4, seed=3)
    want, untempered = summarize(raw / 2.5), summarize(raw)
    for i, g in enumerate(got):
        k = len(items[i].choices)
        np.testing.assert_allclose(g["probabilities"], want["probabilities"][i, :k], atol=1e-5)
        assert g["epistemic"] == pytest.approx(want["epistemic"][i], abs=1e-6)  # MI of the tempered masks
        assert not np.allclose(g["probabilities"], untempered["probabilities"][i, :k], atol=1e-3)


def test_recalibrate_fits_what_train_would_have_and_keeps_the_weights(tmp_path, tiny_dir, small_data):  # noqa: F811
    """An adapter trained without a temperature gets the one (and the thresholds) `dalorra train` fits, from the
    same seeded calibration split; the weights and the rest of the record stay; false removes it again."""
    from adapters.cli import main as adapters_main

    with_T = run(_cfg(tmp_path, tiny_dir, small_data, steps=16, lr=2e-2, out=str(tmp_path / "ref")))
    plain = run(_cfg(tmp_path, tiny_dir, small_data, steps=16, lr=2e-2, temperature_scaling=False))
    assert "temperature" not in plain
    d = tmp_path / "ad"
    weights = {p.name: p.read_bytes() for p in d.glob("*.safetensors")}
    assert adapters_main(["recalibrate", str(d), "--progress", "false"]) == 0
    rec = json.loads((d / "dalorra.json").read_text())
    assert rec["temperature"] == pytest.approx(with_T["temperature"], rel=1e-9)
    assert rec["temperature_fit"] == pytest.approx(with_T["temperature_fit"])
    assert rec["decision"]["confidence"]["threshold"] == with_T["decision"]["confidence"]["threshold"]
    assert rec["calibration"]["metrics"]["nll"] == pytest.approx(with_T["calibration"]["metrics"]["nll"])
    assert rec["recalibrated"]["temperature_before"] == 1.0 and rec["recalibrated"]["items"] == 12
    assert rec["default_samples"] == 3  # the S the thresholds were fitted at is the S served
    assert rec["training"] == json.loads(json.dumps(plain["training"], default=float))  # provenance kept
    assert {p.name: p.read_bytes() for p in d.glob("*.safetensors")} == weights

    assert (
        adapters_main(
            ["recalibrate", str(d), "--temperature-scaling", "false", "--samples", "2", "--progress", "false"]
        )
        == 0
    )
    rec = json.loads((d / "dalorra.json").read_text())
    assert "temperature" not in rec and rec["recalibrated"]["temperature"] == 1.0
    assert rec["default_samples"] == 2 and rec["recalibrated"]["samples"] == 2  # --samples N: served S = N
    assert (
        rec["calibration"]["part"] == "all" and rec["calibration"]["metrics"]["n"] == 12
    )  # no split without T
    assert "validation" not in rec  # trained without a validation split: nothing to re-score

    args = [
        "recalibrate",
        str(d),
        "--validation",
        str(small_data),
        "--eval-limit",
        "5",
        "--progress",
        "false",
    ]
    assert adapters_main(args) == 0
    rec = json.loads((d / "dalorra.json").read_text())
    assert rec["validation"]["n"] == 5 and 0.0 <= rec["validation"]["acc"] <= 1.0


def test_recalibrate_refuses_what_it_cannot_do(tmp_path, adapters_dir, capsys):
    from adapters.cli import main as adapters_main

    d = tmp_path / "ad"
    shutil.copytree(adapters_dir / "test-ad", d)  # saved directly: no training config in its record
    before = (d / "dalorra.json").read_bytes()
    assert adapters_main(["recalibrate", str(d), "--progress", "false"]) != 0
    assert "no training config" in capsys.readouterr().err
    assert (d / "dalorra.json").read_bytes() == before
    assert adapters_main(["recalibrate", str(tmp_path / "missing")]) != 0
