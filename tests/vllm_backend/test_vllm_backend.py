"""The vLLM mask-bank backend, for real on vLLM's CPU build (scripts/test_vllm.sh installs it).

Run apart from the main suite (which has no vLLM): `scripts/test_vllm.sh`; `.ci/run` calls both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from adapters.adapter_io import load_adapter
from adapters.basemodel import load_base
from adapters.data import Item, load_jsonl
from adapters.decision import FIXED_SEED
from adapters.maskbank import BankSource
from adapters.scoring import DrawRequest, choice_logits, encode, score_draws
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


def _hf_draws(adapter_dir: Path, reqs: list[ScoreRequest]) -> list[np.ndarray]:
    """Reference: the HF backend's own scoring (adapters.scoring.score_draws) of each request: draws
    first..first+S-1 of the request's seed, whatever the bank holds."""
    base, tok = load_base(None)
    model = load_adapter(adapter_dir, base, tok)
    out = []
    for r in reqs:
        enc = encode([Item(r.question, r.choices, None, context=r.context)], tok, model.fmt)
        (lg,) = score_draws(model, [DrawRequest(enc, r.samples, r.seed, r.first)])
        out.append(softmax(lg[:, 0, :]))  # (S, K)
    return out


@pytest.mark.parametrize("mode", ["cloze", "letter"])
def test_vllm_serves_the_hf_backends_draws(backend, letter_adapter, questions, mode):
    """Issue #25.5: a request for draws first..first+S-1 of the default seed gets bank members first..first+S-1,
    i.e. the same draws the HF backend, `dalorra eval` and the fitted thresholds use."""
    path = DEFAULT if mode == "cloze" else letter_adapter
    backend.load_adapter(mode, str(path))
    bank = backend.banks[mode]
    assert bank.seed == FIXED_SEED == backend.settings.vllm_bank_seed
    reqs = [
        ScoreRequest(mode, it.question, it.choices, it.context, 3, seed=FIXED_SEED, first=2 * (i % 2))
        for i, it in enumerate(questions[:4])
    ]  # first = 2: an adaptive round after the first two draws
    assert backend.members_for(bank, 3, FIXED_SEED, 2) == [2, 3, 4]
    got = backend.score(reqs)
    assert all(isinstance(g, Scored) for g in got), got
    for g, r in zip(got, _hf_draws(path, reqs), strict=True):
        np.testing.assert_allclose(softmax(g.logits), r, atol=1e-3)
    spread = max(float(np.abs(softmax(g.logits)[0] - softmax(g.logits)[1]).max()) for g in got)
    assert spread > 1e-3  # the draws really differ: otherwise the equality would not test the masks


def test_other_seeds_get_distinct_members_continued_across_rounds(backend):
    if "cloze" not in backend.adapter_names():
        backend.load_adapter("cloze", str(DEFAULT))
    bank = backend.banks["cloze"]
    five = backend.members_for(bank, 5, seed=7)
    assert len(set(five)) == 5 and five != list(range(5))
    assert backend.members_for(bank, 3, 7) + backend.members_for(bank, 2, 7, first=3) == five


def test_banks_of_several_adapters_coexist_in_one_batch(backend, letter_adapter, questions):
    for name, path in (("cloze", DEFAULT), ("letter", letter_adapter), ("cloze-2", DEFAULT)):
        if name not in backend.adapter_names():
            backend.load_adapter(name, str(path))
    banks = [backend.banks[n] for n in ("cloze", "letter", "cloze-2")]
    ids = [{m.lora_int_id for m in b.members} for b in banks]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # one bank each, never shared
    reqs = [
        ScoreRequest(name, it.question, it.choices, it.context, 4, FIXED_SEED)
        for it in questions[:2]
        for name in ("cloze", "letter", "cloze-2")
    ]
    got = backend.score(reqs)  # one generate call over the three banks' members
    paths = {"cloze": DEFAULT, "letter": letter_adapter, "cloze-2": DEFAULT}
    for name in paths:
        mine = [i for i, r in enumerate(reqs) if r.adapter == name]
        ref = _hf_draws(paths[name], [reqs[i] for i in mine])
        for i, r in zip(mine, ref, strict=True):
            np.testing.assert_allclose(softmax(got[i].logits), r, atol=1e-3)
    backend.unload_adapter("cloze-2")


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
    import psutil

    env = {f"DALORRA_{k.upper()}": str(v) for k, v in ENGINE.items()}
    srv = ServerProcess(DEFAULT.parent, DEFAULT.name, tmp_path / "server.log", DALORRA_BACKEND="vllm", **env)
    children = []
    try:
        srv.wait_ready(timeout=600)
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        assert children  # vLLM's EngineCore runs in a process of its own
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
        code = srv.stop()
    # SIGTERM: the server's shutdown ends vLLM's engine processes itself, leaving none behind. (uvicorn re-raises
    # the SIGTERM it handled once its graceful shutdown is done, so the exit status is -SIGTERM, not 0.)
    log = (tmp_path / "server.log").read_text()
    assert code in (0, -signal.SIGTERM), log[-3000:]
    assert "vLLM engine stopped" in log and ", 0 still alive" in log, log[-3000:]
    left = psutil.wait_procs(children, timeout=30)[1]
    assert not left, [(p.pid, p.name()) for p in left]
    assert "Logging error" not in log


# Run as a script: the backend's life in a process whose stdout is a stream that is closed before exit, as
# pytest's capture is; vLLM's logger writes to the stream it found at import. Prints the engine's pids.
SHUTDOWN_SCRIPT = """
import io, os, sys
real_out = sys.stdout
sys.stdout = captured = io.StringIO()
from server.settings import Settings
from server.backend import ScoreRequest
from server.vllm_backend import VLLMBackend
be = VLLMBackend(Settings(backend="vllm", **{engine!r}))
be.load_adapter("a", {adapter!r})
assert be.score([ScoreRequest("a", "Is fire hot?", ("yes", "no"), None, 2, 0)])[0].logits.shape == (2, 2)
print("ENGINE_PIDS", *(p.pid for p in be.engine_processes), file=real_out, flush=True)
be.shutdown()
captured.close()
sys.stdout = real_out
"""


def test_shutdown_ends_the_engine_and_nothing_logs_at_exit(tmp_path):
    """Issue #28.4: after shutdown() no EngineCore process is left (one was once, orphaned, ignoring SIGTERM) and
    nothing logs into closed streams at interpreter exit ("Logging error ... I/O operation on closed file")."""
    import psutil

    script = SHUTDOWN_SCRIPT.format(engine=ENGINE, adapter=str(DEFAULT))
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900, cwd=REPO, env=os.environ
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [
        x for x in r.stdout.splitlines() if x.startswith("ENGINE_PIDS")
    ]  # the engine logs to stdout too
    pids = [int(x) for x in line.split()[1:]]
    assert pids, r.stdout  # the engine ran in processes of its own
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        time.sleep(0.5)
    assert not alive, f"engine processes left behind: {alive}"
    assert "Logging error" not in r.stderr and "closed file" not in r.stderr, r.stderr[-3000:]
