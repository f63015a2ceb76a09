"""Thresholds for generated answers: fitted offline by `dalorra eval --generation-set` and `dalorra train` on
short-answer questions, with the server's own generation code, and applied by the server from the file written."""

import contextlib
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from adapters.adapter_io import load_adapter, save_adapter
from adapters.basemodel import load_base
from adapters.config import AdapterConfig, PromptFormat
from adapters.data import Item
from adapters.generation import decide, fit_generation_decision, thresholds_of
from adapters.model import DalorraModel
from adapters.short_answers import answer_short, short_answer_prompt
from adapters.train import run
from tests.conftest import randomize_lora
from tests.test_train import _cfg, small_data  # noqa: F401  (fixture)

S, MAX_TOKENS = 3, 3
QUESTIONS = [f"What is item number {i}?" for i in range(12)]


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory, tiny_dir):
    """A DALorRA adapter on the tiny base (random B, so the masks disagree), alone in an adapters directory."""
    root = tmp_path_factory.mktemp("gen-adapters")
    base, tok = load_base(str(tiny_dir))
    model = DalorraModel(
        base, tok, AdapterConfig(), PromptFormat(mode="cloze"), base_name=str(tiny_dir), seed=0
    )
    randomize_lora(model, std=0.5)
    save_adapter(model, root / "ad", extra={"default_samples": S})
    return root


@pytest.fixture(scope="module")
def reference(adapters_root, tiny_dir):
    """The adapter's greedy short answers and their scores, computed here in-process."""
    base, tok = load_base(str(tiny_dir))
    model = load_adapter(adapters_root / "ad", base, tok)
    items = [
        Item(question=q, choices=("placeholder", "other"), label=0, id=str(i))
        for i, q in enumerate(QUESTIONS)
    ]
    return model, answer_short(model, items, "ad", samples=S, max_tokens=MAX_TOKENS, progress=False)


@pytest.fixture(scope="module")
def generation_set(tmp_path_factory, reference):
    """10 questions whose gold is the adapter's own answer (correct), 2 with another gold (wrong), and 2 items that
    are not short-answer questions (no '?'; a 4-word gold) and must be left out."""
    _, rows = reference
    golds = [r["answer"].strip() for r in rows[:10]] + ["zebra crossing", "giraffe"]
    assert all(g and len(g.split()) <= 3 for g in golds), golds  # the tiny model answers in ≤ 3 short tokens
    lines = [
        {"id": str(i), "question": q, "choices": [g, "none of them"], "label": 0}
        for i, (q, g) in enumerate(zip(QUESTIONS, golds, strict=True))
    ]
    lines += [
        {
            "id": "x1",
            "question": "Complete the sentence: plants need",
            "choices": ["light", "rocks"],
            "label": 0,
        },
        {"id": "x2", "question": "Why do plants grow?", "choices": ["they need the light", "no"], "label": 0},
    ]
    path = tmp_path_factory.mktemp("gen-set") / "short.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def fitted(adapters_root, tiny_dir, generation_set):
    """`dalorra eval ad --generation-set ...`: exit status, what it printed."""
    from adapters.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(
            [
                "eval",
                str(adapters_root / "ad"),
                "--generation-set",
                str(generation_set),
                "--base-model",
                str(tiny_dir),
                "--samples",
                str(S),
                "--generation-max-tokens",
                str(MAX_TOKENS),
                "--target-error",
                "0.5",
            ]
        )
    return code, printed.getvalue()


def test_eval_fits_and_writes_generation_decision(adapters_root, generation_set, reference, fitted):
    code, printed = fitted
    assert code == 0
    rec = json.loads((adapters_root / "ad" / "generation_decision.json").read_text())
    assert rec["fitted_on"] == {
        "set": str(generation_set),
        "items": 12,
        "short_answer_items": 12,
        "set_items": 14,
        "accuracy": pytest.approx(10 / 12),
        "correct": "normalised exact match",
    }
    assert rec["request"] == {
        "prompt": "the adapter's cloze prompt",
        "temperature": 0.0,
        "stop": ["\n"],
        "max_tokens": MAX_TOKENS,
        "samples": S,
        "mask_seed": 0,
    }
    for k in ("confidence", "epistemic", "policy"):
        assert rec[k]["target_error"] == 0.5 and rec[k]["n_calibration"] == 12
    # ten right of twelve: every step of the joint path holds ≤ 2 errors, under the bound at δ = 0.1, so the
    # policy is certified as a whole; its confidence threshold is what older readers see
    assert rec["policy"]["valid"] and rec["confidence"]["valid"] and rec["confidence"]["joint"]
    assert rec["policy"]["error_upper_bound"] <= 0.5
    # its unfamiliarity reference is of the generated answers' own scores
    assert rec["reference"]["signals"] == ["epistemic_mean", "entropy_mean"] and rec["reference"]["n"] == 12
    # the same thresholds as the in-process answers give: the CLI generated and scored exactly what they did
    _, rows = reference
    want = fit_generation_decision(
        np.array([r["confidence"] for r in rows]),
        np.array([r["epistemic_mean"] for r in rows]),
        np.arange(12) < 10,
        0.5,
        entropy_mean=np.array([r["entropy_mean"] for r in rows]),
    )
    for got_t, want_t in zip(thresholds_of(rec), thresholds_of(want), strict=True):
        assert (got_t is None and want_t is None) or got_t == pytest.approx(want_t, rel=1e-9)
    assert '"generation_decision"' in printed and "generation_decision.json" in printed


def test_served_answers_use_the_thresholds_written_by_eval(adapters_root, tiny_dir, reference, fitted):
    from server.app import create_app
    from server.settings import Settings

    rec = json.loads((adapters_root / "ad" / "generation_decision.json").read_text())  # written by eval
    conf_t, epi_t = thresholds_of(rec)
    model, rows = reference
    k = int(np.argmin([r["confidence"] for r in rows]))  # the least sure answer: abstains if any does
    prompt = short_answer_prompt(Item(question=QUESTIONS[k], choices=("a", "b"), label=0), model.fmt)
    settings = Settings(adapters_dir=adapters_root, default_adapter="ad", base_model=str(tiny_dir))
    with TestClient(create_app(settings)) as c:
        r = c.post(
            "/v1/completions",
            json={
                "model": "ad",
                "prompt": prompt,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "stop": ["\n"],
                "samples": S,
            },
        )
        other = c.post(  # decoded differently (a longer answer budget): no certified decision exists for it
            "/v1/completions",
            json={
                "model": "ad",
                "prompt": prompt,
                "max_tokens": MAX_TOKENS + 1,
                "temperature": 0,
                "stop": ["\n"],
                "samples": S,
            },
        )
    assert other.status_code == 200, other.text
    ou = other.json()["choices"][0]["uncertainty"]
    assert (ou["decision"], ou["abstain_reason"]) == ("abstain", "not_calibrated_for_settings")
    assert ou["thresholds"]["settings_mismatch"] == ["max_tokens"]
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    u = choice["uncertainty"]
    th = u["thresholds"]
    assert (th["min_confidence"], th["max_epistemic"], th["source"]) == (
        conf_t,
        epi_t,
        "generation_decision.json",
    )
    assert th["settings_mismatch"] is None  # the request decodes as the fit did: its thresholds apply
    assert choice["text"] == rows[k]["answer"]
    assert u["confidence"] == pytest.approx(rows[k]["confidence"], rel=1e-5)
    assert u["epistemic_mean"] == pytest.approx(rows[k]["epistemic_mean"], rel=1e-5)
    reason = decide(rows[k], conf_t, epi_t)
    assert (u["decision"], u["abstain_reason"]) == ("abstain" if reason else "answer", reason)


def test_eval_refuses_a_set_without_short_answers(adapters_root, tiny_dir, tmp_path, capsys):
    from adapters.cli import main

    bad = tmp_path / "long.jsonl"
    bad.write_text(json.dumps({"question": "Plants need", "choices": ["light", "rocks"], "label": 0}) + "\n")
    code = main(
        [
            "eval",
            str(adapters_root / "ad"),
            "--generation-set",
            str(bad),
            "--base-model",
            str(tiny_dir),
            "--generation-out",
            str(tmp_path / "out.json"),
        ]
    )
    assert code == 2 and "no short-answer items" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_train_writes_generation_decision(tmp_path, tiny_dir, small_data):  # noqa: F811
    rec = run(_cfg(tmp_path, tiny_dir, small_data, steps=2, generation_items=3))
    out = tmp_path / "ad"
    full = json.loads((out / "generation_decision.json").read_text())
    stored = json.loads((out / "dalorra.json").read_text())["generation_decision"]
    assert stored == rec["generation_decision"]
    assert stored["file"] == "generation_decision.json" and stored["items"] == 3
    assert stored["set"] == "25% of " + str(
        small_data
    )  # the calibration split of the temperature and thresholds
    assert full["fitted_on"]["short_answer_items"] == 12 and full["request"]["samples"] == 3  # --eval-samples
    assert full["confidence"]["target_error"] == 0.2 and full["confidence"]["n_calibration"] == 3
    assert (stored["min_confidence"], stored["max_epistemic"]) == thresholds_of(full)


def test_train_without_short_answers_trains_and_says_why_no_generation_thresholds(tmp_path, tiny_dir):
    data = tmp_path / "statements.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"{i} is a number", "choices": ["no", "yes"], "label": 1}) + "\n"
            for i in range(16)
        )
    )
    rec = run(_cfg(tmp_path, tiny_dir, data, steps=2))  # the default asks for them: skipped with the reason
    assert (
        rec["generation_decision"]["file"] is None
        and "no short-answer items" in rec["generation_decision"]["skipped"]
    )
    assert (tmp_path / "ad" / "dalorra.json").is_file() and not (
        tmp_path / "ad" / "generation_decision.json"
    ).exists()
    rec = run(_cfg(tmp_path, tiny_dir, data, steps=2, generation_items=0))
    assert "generation_decision" not in rec and not (tmp_path / "ad" / "generation_decision.json").exists()
