"""An MC-dropout adapter served over HTTP is reproducible by seed (issue 18, item 2).

The server caches results by (question, seed); a fresh answer must then equal a cached one, whatever else shared
its forward, and equal offline evaluation (adapters.scoring.score) for the same seed. A real `dalorra serve` on
loopback with the tiny random Llama as its base model and the result cache off, so every answer is computed.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from adapters.adapter_io import load_adapter, save_adapter
from adapters.basemodel import load_base
from adapters.config import AdapterConfig, PromptFormat
from adapters.data import Item
from adapters.model import DalorraModel
from adapters.scoring import score
from adapters.uncertainty import summarize
from tests.conftest import make_tiny, randomize_lora
from tests.server_utils import ServerProcess

QUESTION = Item("Which of these is a source of light?", ("the Sun", "a rock", "soil", "water"))
OTHERS = [Item("Is ice cold?", ("yes", "no")), Item("Pick the prime number", ("four", "six", "seven"))]


@pytest.fixture(scope="module")
def mc_adapters(tmp_path_factory, tiny_dir, tokenizer):
    d = tmp_path_factory.mktemp("mc-adapters")
    cfg = AdapterConfig(method="mcdropout", dropout=0.1, stochastic=False)
    model = DalorraModel(
        make_tiny(seed=1), tokenizer, cfg, PromptFormat(mode="cloze"), seed=0, base_name=str(tiny_dir)
    )
    randomize_lora(model, seed=3, std=0.5)
    save_adapter(model, d / "mc", extra={"default_samples": 4})
    return d


def _body(it: Item, **kw) -> dict:
    return {"question": it.question, "choices": list(it.choices), **kw}


def test_hf_backend_gives_a_request_the_same_logits_alone_or_batched(mc_adapters, tiny_dir):
    from server.backend import ScoreRequest
    from server.hf_backend import HFBackend
    from server.settings import Settings

    be = HFBackend(Settings(base_model=str(tiny_dir)))
    be.load_adapter("mc", str(mc_adapters / "mc"))
    me = ScoreRequest("mc", QUESTION.question, QUESTION.choices, None, 4, 3)
    others = [ScoreRequest("mc", it.question, it.choices, None, 3, 10 + i) for i, it in enumerate(OTHERS)]
    alone = be.score([me])[0].logits
    batched = be.score([others[0], me, others[1]])[1].logits
    assert alone.shape == (4, 4)
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(be.score([me])[0].logits, alone, rtol=0, atol=0)  # and again, bit for bit
    other_seed = be.score([ScoreRequest("mc", QUESTION.question, QUESTION.choices, None, 4, 4)])[0].logits
    assert np.abs(other_seed - alone).max() > 1e-3  # the seed matters: the equalities test the dropout noise


def test_same_question_and_seed_give_the_same_answer_over_http(mc_adapters, tiny_dir, tokenizer, tmp_path):
    srv = ServerProcess(
        mc_adapters,
        "mc",
        tmp_path / "server.log",
        DALORRA_BASE_MODEL=str(tiny_dir),
        DALORRA_RESULT_CACHE_SIZE="0",
        DALORRA_MAX_WAIT_MS="50",
    ).wait_ready()
    try:
        one = httpx.post(srv.url + "/predict", json=_body(QUESTION, samples=4, seed=3), timeout=120).json()
        two = httpx.post(srv.url + "/predict", json=_body(QUESTION, samples=4, seed=3), timeout=120).json()
        calls = srv.metric("dalorra_backend_calls_total")
        mixed = [
            _body(OTHERS[0], samples=3, seed=1),
            _body(QUESTION, samples=4, seed=3),
            _body(OTHERS[1], samples=2, seed=2),
        ]
        batched = httpx.post(srv.url + "/predict", json=mixed, timeout=120).json()
        assert srv.metric("dalorra_backend_calls_total") == calls + 1  # the three shared one backend call
        other = httpx.post(srv.url + "/predict", json=_body(QUESTION, samples=4, seed=4), timeout=120).json()
    finally:
        srv.stop()
    assert not one["cached"] and not two["cached"] and one["samples"] == 4
    assert two["probabilities"] == one["probabilities"]  # computed twice, the same to the last bit
    np.testing.assert_allclose(batched[1]["probabilities"], one["probabilities"], rtol=0, atol=1e-6)
    assert batched[1]["epistemic"] == pytest.approx(one["epistemic"], abs=1e-6)
    assert (
        np.abs(np.subtract(other["probabilities"], one["probabilities"])).max() > 1e-4
    )  # another seed differs
    # Offline evaluation of the same adapter and seed gives the served probabilities.
    base, tok = load_base(str(tiny_dir))
    model = load_adapter(mc_adapters / "mc", base, tok, str(tiny_dir))
    ref = summarize(score(model, [QUESTION], samples=4, seed=3))
    np.testing.assert_allclose(one["probabilities"], ref["probabilities"][0], rtol=0, atol=1e-6)
    assert one["epistemic"] == pytest.approx(float(ref["epistemic"][0]), abs=1e-6)
