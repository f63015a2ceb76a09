"""The vLLM mask-bank backend, for real on vLLM's CPU build (scripts/test_vllm.sh installs it).

Run apart from the main suite (which has no vLLM): `scripts/test_vllm.sh`; `.ci/run` calls both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from adapters.adapter_io import load_adapter
from adapters.basemodel import load_base
from adapters.data import load_jsonl
from adapters.maskbank import BankSource
from adapters.scoring import choice_logits, encode
from adapters.uncertainty import softmax
from server.backend import Scored, ScoreRequest
from server.settings import REPO, Settings
from tests.server_utils import ServerProcess

DEFAULT = REPO / "adapters" / "default" / "arc-easy-dalorra"
ENGINE = {
    "vllm_dtype": "float32",
    "vllm_gpu_memory_utilization": 0.2,
    "vllm_max_model_len": 512,
    "vllm_bank_size": 8,
    "vllm_max_loras": 4,
    "vllm_max_cpu_loras": 32,
    "vllm_max_lora_rank": 8,
}


@pytest.fixture(scope="module")
def backend():
    from server.vllm_backend import VLLMBackend

    be = VLLMBackend(Settings(backend="vllm", **ENGINE))
    yield be
    be.shutdown()


@pytest.fixture(scope="module")
def letter_adapter(tmp_path_factory) -> Path:
    """The default adapter's weights and masks, scored in letter mode (a second, real scoring path)."""
    d = tmp_path_factory.mktemp("letter") / "arc-easy-letter"
    shutil.copytree(DEFAULT, d)
    rec = json.loads((d / "dalorra.json").read_text())
    rec["prompt"].update(mode="letter", template="")  # the letter mode's default template
    rec.pop("decision", None)
    (d / "dalorra.json").write_text(json.dumps(rec))
    return d


@pytest.fixture(scope="module")
def questions(data_dir):
    return load_jsonl(data_dir / "arc_easy" / "validation.jsonl", limit=8)


def _hf_probs(adapter_dir: Path, items, members_of, bank_masks) -> list[np.ndarray]:
    """Reference: the HF path with exactly the bank members' masks."""
    base, tok = load_base(None)
    model = load_adapter(adapter_dir, base, tok)
    out = []
    for i, item in enumerate(items):
        members = members_of(i)
        masks = {n: m[members] for n, m in bank_masks.items()}
        enc = encode([item], tok, model.fmt)
        with torch.no_grad():
            lg = choice_logits(model, enc, [0] * len(members), masks, torch.arange(len(members)))
        out.append(softmax(lg.double().numpy()))
    return out


@pytest.mark.parametrize("mode", ["cloze", "letter"])
def test_vllm_equals_hf_for_the_same_bank_members(backend, letter_adapter, questions, mode):
    path = DEFAULT if mode == "cloze" else letter_adapter
    backend.load_adapter(mode, str(path))
    bank = backend.banks[mode]
    samples = 4 if mode == "cloze" else 3
    reqs = [
        ScoreRequest(mode, it.question, it.choices, it.context, samples, seed=i)
        for i, it in enumerate(questions)
    ]
    got = backend.score(reqs)
    assert all(isinstance(g, Scored) for g in got), got
    src = BankSource(path)
    masks = src.draw(len(bank.members), backend.settings.vllm_bank_seed)
    base, tok = load_base(None)
    model = load_adapter(path, base, tok)
    torch.testing.assert_close(model.draw_masks(len(bank.members), 0), masks)  # one draw function
    ref = _hf_probs(path, questions, lambda i: backend.members_for(bank, samples, i), masks)
    for g, r in zip(got, ref, strict=True):
        assert g.logits.shape == r.shape
        np.testing.assert_allclose(softmax(g.logits), r, atol=1e-3)
        assert 0 < g.choice_mass <= 1.0 + 1e-6
    # The members really differ: otherwise equality above would not test the masks.
    spread = max(float(np.abs(softmax(g.logits)[0] - softmax(g.logits)[1]).max()) for g in got)
    assert spread > 1e-3


def test_bank_names_and_ids_are_never_reused(backend, letter_adapter):
    backend.load_adapter("x", str(letter_adapter))
    first = backend.banks["x"]
    ids1 = {m.lora_int_id for m in first.members}
    names1 = {m.lora_name for m in first.members}
    assert len(ids1) == len(first.members) == backend.settings.vllm_bank_size
    backend.load_adapter("x", str(letter_adapter))  # reload under the same name while loaded
    second = backend.banks["x"]
    assert not ids1 & {m.lora_int_id for m in second.members}
    assert not names1 & {m.lora_name for m in second.members}
    assert not ids1 & backend.registered_lora_ids()  # the old bank left the engine
    assert not first.directory.exists() and second.directory.is_dir()
    ids2 = {m.lora_int_id for m in second.members}
    backend.unload_adapter("x")
    assert not ids2 & backend.registered_lora_ids() and not second.directory.exists()
    backend.load_adapter("x", str(letter_adapter))
    ids3 = {m.lora_int_id for m in backend.banks["x"].members}
    assert not ids3 & (ids1 | ids2)
    out = backend.score([ScoreRequest("x", "Is water wet?", ("yes", "no"), None, 2, 0)])[0]
    assert isinstance(out, Scored) and out.logits.shape == (2, 2)


def test_bad_requests_and_adapters_fail_alone(backend, tmp_path):
    from adapters.adapter_io import AdapterError

    if "cloze" not in backend.adapter_names():
        backend.load_adapter("cloze", str(DEFAULT))
    out = backend.score(
        [
            ScoreRequest("nope", "q?", ("a", "b"), None, 2, 0),
            ScoreRequest("cloze", "q?", ("a", "b"), None, 99, 0),
            ScoreRequest("cloze", "Is fire hot?", ("yes", "no"), None, 2, 0),
        ]
    )
    assert "not loaded" in str(out[0]) and "mask bank" in str(out[1])
    assert isinstance(out[2], Scored)
    bad = tmp_path / "bad"
    shutil.copytree(DEFAULT, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError):
        backend.load_adapter("bad", str(bad))
    assert "bad" not in backend.adapter_names()


def test_predict_end_to_end_through_vllm(backend, tmp_path):
    env = {f"DALORRA_{k.upper()}": str(v) for k, v in ENGINE.items()}
    srv = ServerProcess(DEFAULT.parent, DEFAULT.name, tmp_path / "server.log", DALORRA_BACKEND="vllm", **env)
    try:
        srv.wait_ready(timeout=600)
        item = {
            "question": "Which of these is a source of light?",
            "choices": ["the Sun", "a rock", "soil", "water"],
            "samples": 4,
            "seed": 5,
        }
        r = httpx.post(srv.url + "/predict", json=item, timeout=300)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["samples"] == 4 and abs(sum(body["probabilities"]) - 1) < 1e-6
        assert 0 < body["choice_mass"] <= 1
        if DEFAULT.name not in backend.adapter_names():
            backend.load_adapter(DEFAULT.name, str(DEFAULT))
        ref = backend.score(
            [ScoreRequest(DEFAULT.name, item["question"], tuple(item["choices"]), None, 4, 5)]
        )[0]
        T = json.loads((DEFAULT / "dalorra.json").read_text()).get(
            "temperature", 1.0
        )  # the server applies it
        np.testing.assert_allclose(body["probabilities"], softmax(ref.logits / T).mean(0), atol=1e-4)
        assert srv.metric("dalorra_requests_total", {"outcome": "ok"}) >= 1
        too_many = httpx.post(srv.url + "/predict", json={**item, "samples": 9}, timeout=60)
        assert too_many.status_code == 422 and "mask bank" in too_many.text
    finally:
        srv.stop()
