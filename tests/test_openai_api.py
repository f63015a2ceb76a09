"""OpenAI-compatible API, driven by the official `openai` package against a real server on loopback."""

import json
import threading
import time

import httpx
import numpy as np
import pytest

from tests.server_utils import ServerProcess

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.smollm

QUESTION = "Which gas do plants take in from the air to make food?"
CHOICES = ["carbon dioxide", "oxygen", "nitrogen", "helium"]
LIMITS = {
    "DALORRA_MAX_TOKENS": "64",
    "DALORRA_MAX_N": "2",
    "DALORRA_MAX_PROMPT_TOKENS": "96",
    "DALORRA_GENERATION_SLOTS": "1",
}


@pytest.fixture(scope="module")
def server(adapters_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    decision = d / "decision.json"  # fitted offline in real use (bench/generate.py); here an impossible bar
    decision.write_text(
        json.dumps(
            {
                "test-ad": {
                    "confidence": {"valid": True, "threshold": 0.999},
                    "epistemic": {"valid": False, "threshold": None},
                }
            }
        )
    )
    s = ServerProcess(
        adapters_dir, "test-ad", d / "server.log", DALORRA_GENERATION_DECISION=str(decision), **LIMITS
    )
    s.wait_ready(timeout=900)  # a busy 2-core machine can take minutes to load the model
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(adapters_dir):
    """The same adapter loaded in this process: what the server must reproduce."""
    from adapters.adapter_io import load_adapter
    from adapters.basemodel import load_base

    base, tok = load_base(None)
    return load_adapter(adapters_dir / "test-ad", base, tok).eval()


def _check_uncertainty(u: dict, tokens: int, samples: int = 4) -> None:
    assert u["kind"] == "generation" and u["samples"] == samples and u["tokens"] == tokens
    for k in ("entropy", "epistemic", "logprob"):
        assert len(u["per_token"][k]) == tokens
    assert 0 <= u["epistemic_mean"] <= u["entropy_mean"] and u["epistemic_max"] >= u["epistemic_mean"]
    assert u["loglik_std"] >= 0 and 0 < u["confidence"] <= 1
    assert u["decision"] in ("answer", "abstain")


def test_models_lists_loaded_adapters(client):
    assert "test-ad" in [m.id for m in client.models.list().data]
    assert client.models.retrieve("test-ad").id == "test-ad"


def test_completion_equals_in_process_generation(client, server, reference):
    from adapters.generate import generate
    from adapters.generation import GenerateRequest, summarize_answer

    prompt = f"Question: {QUESTION}\nAnswer:"
    r = client.completions.create(
        model="test-ad",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stop=["\n"],
        logprobs=2,
        extra_body={"samples": 4},
    )
    c = r.choices[0]
    u = c.model_extra["uncertainty"]
    _check_uncertainty(u, r.usage.completion_tokens)
    assert len(c.logprobs.tokens) == u["tokens"] and all(len(t) == 2 for t in c.logprobs.top_logprobs)
    ref = generate(
        reference,
        GenerateRequest(
            adapter="test-ad", prompt=prompt, max_tokens=12, temperature=0.0, stop=("\n",), samples=4
        ),
        threading.Lock(),
        96,
    ).choices[0]
    assert c.text == ref.text and c.finish_reason == ref.finish_reason
    summ = summarize_answer(ref.scores)
    for k in ("entropy_mean", "epistemic_mean", "epistemic_max", "loglik_mean", "loglik_std", "confidence"):
        assert u[k] == pytest.approx(summ[k], rel=1e-4, abs=1e-6), k
    # thresholds from DALORRA_GENERATION_DECISION: confidence ≥ 0.999 is never met
    assert u["decision"] == "abstain" and u["abstain_reason"] == "low_confidence"
    assert u["thresholds"]["min_confidence"] == 0.999
    # per-request overrides win
    r2 = client.completions.create(
        model="test-ad",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stop=["\n"],
        extra_body={"samples": 4, "min_confidence": 0.0, "max_epistemic": 10.0},
    )
    u2 = r2.choices[0].model_extra["uncertainty"]
    assert u2["decision"] == "answer" and u2["thresholds"]["source"] == "request"
    assert r2.choices[0].text == c.text  # greedy: the same answer


def test_chat_stream_equals_chat_and_ends_with_usage_and_uncertainty(client):
    kw = {
        "model": "test-ad",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 10,
        "temperature": 0,
        "extra_body": {"samples": 4},
    }
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant" and whole.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    last = chunks[-1]
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    u = last.choices[0].model_extra["uncertainty"]
    _check_uncertainty(u, whole.usage.completion_tokens)
    assert u == whole.choices[0].model_extra["uncertainty"]


def test_completion_stream_sampling_n_and_seed(client):
    kw = {
        "model": "test-ad",
        "prompt": "The sky is",
        "max_tokens": 6,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 3,
        "n": 2,
        "extra_body": {"samples": 2},
    }
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    parts = {0: "", 1: ""}
    final = None
    for ch in client.completions.create(stream=True, **kw):
        for c in ch.choices:
            parts[c.index] += c.text
            if c.finish_reason:
                final = ch
    assert [parts[0], parts[1]] == [c.text for c in a.choices]
    assert final.usage.total_tokens == a.usage.total_tokens
    assert all(c.model_extra["uncertainty"]["samples"] == 2 for c in final.choices)


def test_multiple_choice_equals_predict(client, server):
    ref = httpx.post(
        server.url + "/predict",
        json={"question": QUESTION, "choices": CHOICES, "samples": 4, "seed": 3},
        timeout=120,
    ).json()
    extra = {"choices": CHOICES, "samples": 4, "mask_seed": 3}
    comp = client.completions.create(model="test-ad", prompt=QUESTION, extra_body=extra)
    chat = client.chat.completions.create(
        model="test-ad", messages=[{"role": "user", "content": QUESTION}], extra_body=extra
    )
    for text, u in (
        (comp.choices[0].text, comp.choices[0].model_extra["uncertainty"]),
        (chat.choices[0].message.content, chat.choices[0].model_extra["uncertainty"]),
    ):
        assert text == ref["answer"] and u["kind"] == "multiple_choice"
        np.testing.assert_allclose(u["probabilities"], ref["probabilities"], atol=1e-9)
        for k in ("confidence", "entropy", "aleatoric", "epistemic", "epistemic_norm"):
            assert u[k] == pytest.approx(ref[k], abs=1e-9), k
        assert (u["decision"], u["abstain_reason"], u["prediction_set"]) == (
            ref["decision"],
            ref["abstain_reason"],
            ref["prediction_set"],
        )


def test_limits_and_errors_in_openai_shape(client, server):
    msgs = [{"role": "user", "content": QUESTION}]
    for kw in ({"max_tokens": 65}, {"n": 3}, {"logit_bias": {"42": 5}}):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.chat.completions.create(model="test-ad", messages=msgs, **kw)
        assert set(e.value.body) >= {"message", "type", "code"}, e.value.body
    with pytest.raises(openai.UnprocessableEntityError, match="at most 96"):  # prompt tokens
        client.completions.create(model="test-ad", prompt="word " * 200, max_tokens=2)
    with pytest.raises(
        openai.UnprocessableEntityError, match="at most 96"
    ):  # streamed: still a 422, not a 200
        client.completions.create(model="test-ad", prompt="word " * 200, max_tokens=2, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    r = httpx.post(
        server.url + "/v1/completions", json={"model": "test-ad", "prompt": "hi", "n": 9}, timeout=30
    )
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_disconnected_stream_frees_its_slot_and_metrics_count(server, client):
    """GENERATION_SLOTS=1: a stream abandoned after its first chunk must stop decoding and free the slot."""
    cancelled = server.metric("dalorra_generation_requests_total", {"outcome": "cancelled"})
    body = {
        "model": "test-ad",
        "prompt": "Once upon a time",
        "max_tokens": 64,
        "temperature": 0,
        "stream": True,
        "stop": ["\x00"],
        "samples": 4,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one chunk, then hang up
    end = time.time() + 60
    while time.time() < end and server.metric("dalorra_generation_slots_busy") > 0:
        time.sleep(0.2)
    assert server.metric("dalorra_generation_slots_busy") == 0
    assert server.metric("dalorra_generation_requests_total", {"outcome": "cancelled"}) == cancelled + 1
    # the slot serves the next request, which did not have to wait for 64 tokens of a gone client
    t0 = time.time()
    r = client.completions.create(model="test-ad", prompt="Hello", max_tokens=2, extra_body={"samples": 2})
    assert r.choices[0].model_extra["uncertainty"]["tokens"] >= 1 and time.time() - t0 < 60
    assert server.metric("dalorra_generated_tokens_total") > 0
    assert server.metric("dalorra_generation_confidence_count") > 0
    assert server.metric("dalorra_generation_epistemic_nats_count") > 0


def _no_generation_backend():
    from server.backend import Backend

    class NoGen(Backend):
        name = "nogen"

        def load_adapter(self, name, path):
            return {"default_samples": 2}

        def unload_adapter(self, name):
            return None

        def adapter_names(self):
            return ["test-ad"]

        def score(self, requests):
            return [np.zeros((r.samples, len(r.choices))) for r in requests]

    return NoGen()


def test_backend_without_generation_answers_501(adapters_dir):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings
    from server.vllm_backend import VLLMBackend

    app = create_app(
        Settings(adapters_dir=adapters_dir, default_adapter="test-ad"), backend=_no_generation_backend()
    )
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "test-ad", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 501 and "cannot generate" in r.json()["error"]["message"]
        mc = c.post("/v1/completions", json={"model": "test-ad", "prompt": "Q?", "choices": ["a", "b"]})
        assert mc.status_code == 200 and mc.json()["choices"][0]["uncertainty"]["probabilities"] == [0.5, 0.5]
    with pytest.raises(Exception, match="not implemented on the vLLM backend"):
        VLLMBackend.generate(object.__new__(VLLMBackend), None)


def test_openai_and_kserve_routes_need_the_api_token(adapters_dir):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    app = create_app(
        Settings(adapters_dir=adapters_dir, default_adapter="test-ad", api_token="s3cret-token"),
        backend=_no_generation_backend(),
    )
    with TestClient(app) as c:
        for path in ("/v1/models", "/v2/models/test-ad"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert c.post("/v1/completions", json={"model": "test-ad", "prompt": "hi"}).status_code == 401
