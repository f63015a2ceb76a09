"""Trainer tests on a tiny random Llama saved to disk (fast), plus the real CLI under torchrun."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file

from adapters.adapter_io import load_adapter
from adapters.data import DataError
from adapters.train import Interrupted, TrainConfig, run
from tests.conftest import make_tiny
from tests.server_utils import free_port


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A learnable toy task: the answer is always the choice 'yes'."""
    d = tmp_path_factory.mktemp("data")
    rows = [
        {
            "id": str(i),
            "question": f"Is {i} a number?",
            "choices": ["no", "yes", "maybe"][: 2 + i % 2],
            "label": 1,
        }
        for i in range(48)
    ]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "train.jsonl"


def _cfg(tmp_path, tiny_dir, data, **kw):
    base = dict(
        out=str(tmp_path / "ad"),
        train=str(data),
        base_model=str(tiny_dir),
        steps=12,
        batch_size=8,
        lr=3e-3,
        lr_mask=0.1,
        mask_schedule="constant",
        eval_samples=3,
        save_every=4,
        progress=False,
        calib_fraction=0.25,
        generation_items=2,
        generation_max_tokens=2,
    )  # a token fit: the machine is busy
    return TrainConfig(**{**base, **kw})


def test_training_lowers_loss_and_moves_phi(tmp_path, tiny_dir, small_data, tokenizer):
    rec = run(_cfg(tmp_path, tiny_dir, small_data, steps=20))
    h = rec["training"]["history"]
    first, last = sum(x["nll"] for x in h[:3]) / 3, sum(x["nll"] for x in h[-3:]) / 3
    assert last < first
    assert h[-1]["kl_per_n"] > 0  # the KL gradient moved φ away from the prior
    phi = load_file(str(tmp_path / "ad" / "dalorra_masks.safetensors"))
    assert any(not torch.allclose(v, torch.zeros_like(v)) for v in phi.values())  # logit(0.5) = 0 at init
    assert {"confidence", "epistemic", "conformal"} <= set(rec["decision"])
    model = load_adapter(tmp_path / "ad", make_tiny(seed=1), tokenizer)
    assert model.cfg.method == "dalorra"


def test_resume_after_interruption_is_identical(tmp_path, tiny_dir, small_data):
    run(_cfg(tmp_path / "a", tiny_dir, small_data))
    with pytest.raises(Interrupted):
        run(_cfg(tmp_path / "b", tiny_dir, small_data, stop_at=7))  # last checkpoint: step 4
    assert not (tmp_path / "b" / "ad").exists()  # nothing half-written
    run(_cfg(tmp_path / "b", tiny_dir, small_data), resume=True)
    for f in ("adapter_model.safetensors", "dalorra_masks.safetensors"):
        a, b = load_file(str(tmp_path / "a" / "ad" / f)), load_file(str(tmp_path / "b" / "ad" / f))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


@pytest.mark.parametrize("method", ["lora", "map", "mcdropout", "ensemble"])
def test_baselines_train_and_load(tmp_path, tiny_dir, small_data, tokenizer, method):
    run(_cfg(tmp_path, tiny_dir, small_data, method=method, steps=4, ensemble_size=2))
    model = load_adapter(tmp_path / "ad", make_tiny(seed=1), tokenizer)
    assert model.cfg.method == method and not model.cfg.stochastic
    if method == "ensemble":
        assert model.cfg.r == 16 and model.fixed_masks


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "no items"),
        ("{oops\n", "not valid JSON"),
        ('{"question": "q", "choices": ["a", "b"], "label": 2}\n', "label 2"),
    ],
)
def test_bad_data_writes_nothing(tmp_path, tiny_dir, content, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(DataError, match=match):
        run(_cfg(tmp_path, tiny_dir, bad))
    assert not (tmp_path / "ad").exists() and not (tmp_path / "ad.ckpt").exists()


def test_cli_two_processes_with_torchrun(tmp_path, tiny_dir, small_data, tokenizer):
    out = tmp_path / "dist"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "adapters.cli",
        "train",
        "--out",
        str(out),
        "--train",
        str(small_data),
        "--base-model",
        str(tiny_dir),
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--eval-samples",
        "2",
        "--progress",
        "false",
        "--calib-fraction",
        "0.25",
        "--generation-items",
        "2",
        "--generation-max-tokens",
        "2",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        raise
    assert proc.returncode == 0, err[-3000:]
    rec = json.loads((out / "dalorra.json").read_text())
    assert rec["training"]["world_size"] == 2
    assert (
        rec["generation_decision"]["items"] == 2 and (out / "generation_decision.json").is_file()
    )  # rank 0 wrote
    load_adapter(out, make_tiny(seed=1), tokenizer)


def test_cli_help_documents_every_option():
    """The help is written once, on TrainConfig's fields; every field is a flag that shows it."""
    r = subprocess.run(
        [sys.executable, "-m", "adapters.cli", "train", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps the help text
    options = TrainConfig.options()
    assert {f.name for f in options} == {f.name for f in fields(TrainConfig)} - {"extra"}
    for f in options:
        flag = "--" + f.name.replace("_", "-")
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help text"
        assert flag in r.stdout, flag
        assert " ".join(f.metadata["help"].split()[:4]) in text, f.name  # argparse shows the field's own help
    assert "--resume" in r.stdout


def test_eval_cli_writes_metrics_predictions_and_plots(tmp_path, tiny_dir, small_data):
    run(_cfg(tmp_path, tiny_dir, small_data, steps=4))
    out = tmp_path / "eval"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "adapters.cli",
            "eval",
            str(tmp_path / "ad"),
            "--data",
            str(small_data),
            "--base-model",
            str(tiny_dir),
            "--samples",
            "3",
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())[0]
    assert {"acc", "ece", "nll", "brier", "aurc", "mean_entropy", "mean_epistemic", "coverage"} <= set(m)
    assert m["n"] == 48
    pngs = list(out.glob("*.png"))
    assert pngs and pngs[0].read_bytes()[:4] == b"\x89PNG"
    assert len(next(out.glob("*.predictions.jsonl")).read_text().splitlines()) == 48
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "adapters.cli",
            "eval",
            str(tmp_path / "nope"),
            "--data",
            str(small_data),
            "--base-model",
            str(tiny_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not an adapter directory" in bad.stderr


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_dir, small_data):
    """A real SIGKILL mid-training (no clean-up code runs), then --resume: same final adapter."""
    import time

    args = [
        "--train",
        str(small_data),
        "--base-model",
        str(tiny_dir),
        "--steps",
        "120",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--save-every",
        "5",
        "--eval-samples",
        "2",
        "--progress",
        "false",
        "--calib-fraction",
        "0.25",
        "--calibrate",
        "false",
    ]
    cli = [sys.executable, "-m", "adapters.cli", "train"]
    subprocess.run(
        cli + ["--out", str(tmp_path / "a" / "ad")] + args, check=True, capture_output=True, timeout=600
    )
    out_b = tmp_path / "b" / "ad"
    proc = subprocess.Popen(
        cli + ["--out", str(out_b)] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = tmp_path / "b" / "ad.ckpt" / "state.pt"
    end = time.time() + 300
    while time.time() < end and not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out_b.exists(), "killed too late to test anything"
    subprocess.run(
        cli + ["--out", str(out_b), "--resume"] + args, check=True, capture_output=True, timeout=600
    )
    for f in ("adapter_model.safetensors", "dalorra_masks.safetensors"):
        a, b = load_file(str(tmp_path / "a" / "ad" / f)), load_file(str(out_b / f))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
