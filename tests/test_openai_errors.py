"""Refusals, usage, headers and metrics of the OpenAI-compatible routes, on the fake backend (issues #27, #28).

Every refusal is a 4xx in OpenAI's shape {"error": {"message", "type", "param", "code"}} naming the field at
fault, and counted once in /metrics. Each `defect` case below was a 500 (or an invalid SSE event) on the tree
before it was fixed; tests/test_fuzz.py pinned them as strict xfails until then.
"""

from __future__ import annotations

import json
import math
import time

import pytest

from bench import fuzz

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with fuzz.client_for(tmp_path_factory.mktemp("openai-errors")) as c:
        yield c


def post(client, url: str, body: dict):
    """JSON as a hostile client writes it: lone surrogates as \\u escapes, Infinity literals, big integers."""
    return client.post(url, content=fuzz.encode(body), headers={"content-type": "application/json"})


def metric(client, name: str, **labels: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        head, _, val = line.rpartition(" ")
        if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(val)
    return total


DEFECTS = [  # (url, body, param): each answered 500 before, or streamed a bare Infinity
    ("/v1/completions", {"model": "fake", "prompt": "a\ud800b", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"model": "fake", "prompt": "\udfff", "max_tokens": 2, "stream": True}, "prompt"),
    (
        "/v1/chat/completions",
        {"model": "fake", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        {"model": "fake", "messages": [{"role": "user", "content": "x\ud800"}], "stream": True},
        "messages.0.content",
    ),
    ("/v1/chat/completions", {"model": "fake", "messages": HI, "max_tokens": 2, "seed": 2**64}, "seed"),
    ("/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 2, "mask_seed": 2**64}, "mask_seed"),
    ("/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 2, "seed": 2**63}, "seed"),
    (
        "/v1/completions",
        {"model": "fake", "prompt": "hi", "max_tokens": 2, "max_epistemic": math.inf},
        "max_epistemic",
    ),
    (
        "/v1/chat/completions",
        {"model": "fake", "messages": HI, "max_tokens": 2, "max_epistemic": math.inf, "stream": True},
        "max_epistemic",
    ),
    ("/v1/completions", {"model": "fake", "prompt": "hi", "min_confidence": math.nan}, "min_confidence"),
    ("/v1/completions", {"model": "fake", "prompt": "hi", "temperature": -math.inf}, "temperature"),
]


@pytest.mark.parametrize(
    "url, body, param", DEFECTS, ids=[f"{u}:{p}:{b.get('stream', False)}" for u, b, p in DEFECTS]
)
def test_defect_is_a_422_naming_the_field(client, url, body, param):
    before = metric(client, "dalorra_generation_requests_total", outcome="invalid")
    r = post(client, url, body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] and param in err["message"]
    assert metric(client, "dalorra_generation_requests_total", outcome="invalid") == before + 1


def test_stream_thresholds_and_events_are_strict_json(client):
    body = {"model": "fake", "messages": HI, "max_tokens": 3, "max_epistemic": 1e308, "stream": True}
    ctype = {"content-type": "application/json"}
    with client.stream("POST", "/v1/chat/completions", content=fuzz.encode(body), headers=ctype) as r:
        text = r.read().decode()
    assert r.status_code == 200 and text.rstrip().endswith("data: [DONE]")
    assert not fuzz.problems(
        fuzz.Route("POST", "/v1/chat/completions", (), {}), 200, "text/event-stream", text
    )


def test_validation_errors_have_param_and_code(client):
    cases = [
        ({"model": "fake", "prompt": "hi", "max_tokens": -1}, "max_tokens", "greater_than_equal"),
        ({"model": "fake", "prompt": "hi", "n": 0}, "n", "greater_than_equal"),
        ({"model": "fake"}, "prompt", "missing"),
        ({"model": "fake", "prompt": [[1, -2]]}, "prompt.1", None),  # a token id below 0
        ({"model": "fake", "prompt": "hi", "logit_bias": {"1": 2}}, "logit_bias", "unsupported_parameter"),
        ({"model": "fake", "prompt": "hi", "stop": ["a"] * 17}, "stop", "invalid_request"),
        ({"model": "fake", "prompt": "hi", "max_tokens": 17}, "max_tokens", "invalid_request"),
    ]
    for body, param, code in cases:
        r = post(client, "/v1/completions", body)
        assert r.status_code == 422, (body, r.text)
        err = r.json()["error"]
        assert err["param"] is not None and err["param"].startswith(param.split(".")[0]), (body, err)
        if code:
            assert err["code"] == code, (body, err)
    bad = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "json_invalid"
    missing = client.post("/v1/completions", json={"model": "no-such", "prompt": "hi"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] is None
    assert missing.json()["error"]["code"] == "model_not_found"


def test_refusals_are_counted_once_by_kind(client):
    gen = metric(client, "dalorra_generation_requests_total")
    mc = metric(client, "dalorra_requests_total")
    post(client, "/v1/completions", {"model": "fake", "prompt": "hi", "n": 99})  # refused by the planner
    post(client, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": "x"})  # by the schema
    post(
        client, "/v1/completions", {"model": "fake", "prompt": "Q?", "choices": ["a", "b"], "n": 2}
    )  # choices
    post(
        client, "/v1/chat/completions", {"model": "fake", "messages": HI, "choices": ["a", "b"], "samples": 0}
    )
    post(
        client, "/v1/completions", {"model": "fake", "prompt": "Q?", "choices": ["a", "\ud800"]}
    )  # in /predict
    assert metric(client, "dalorra_generation_requests_total") == gen + 2
    assert metric(client, "dalorra_requests_total") == mc + 3


def test_cancelled_generations_tokens_are_counted(client):
    """A stream whose reader leaves: its outcome is `cancelled` and the tokens it decoded are counted."""
    svc = client.app.state.service
    from server.openai_api import GenerationService

    async def run() -> None:
        g = client.app.state.generation if hasattr(client.app.state, "generation") else GenerationService(svc)
        req = g.plan(
            "fake",
            prompt="Once",
            max_tokens=6,
            temperature=1.0,
            top_p=1.0,
            stop=(),
            seed=1,
            n=1,
            top_logprobs=None,
            samples=0,
            mask_seed=None,
        )
        events = g.events(req, stream=True)
        assert (await events.__anext__())[0] == "token"
        await events.aclose()
        for _ in range(200):  # the worker returns at its next step; its done-callbacks count the tokens
            if g.busy == 0:
                return
            await __import__("asyncio").sleep(0.01)

    before = metric(client, "dalorra_generated_tokens_total", adapter="fake")
    client.portal.call(run)
    assert metric(client, "dalorra_generated_tokens_total", adapter="fake") >= before + 1


def test_multiple_choice_usage_headers_and_created(client):
    body = {"model": "fake", "prompt": "Which is a source of light?", "choices": ["the sun", "a stone"]}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    u = out["choices"][0]["uncertainty"]
    tok = client.app.state.service.backend.tokenizer("fake")
    want = sum(len(tok(t, add_special_tokens=False).input_ids) for t in [body["prompt"], *body["choices"]])
    assert out["usage"] == {"prompt_tokens": want, "completion_tokens": 0, "total_tokens": want}
    assert abs(out["created"] - time.time()) < 3600 and out["created"] > 1_700_000_000
    h = r.headers
    assert h["x-dalorra-kind"] == "multiple_choice" and h["x-dalorra-decision"] == u["decision"]
    assert float(h["x-dalorra-confidence"]) == pytest.approx(u["confidence"], rel=1e-5)
    assert float(h["x-dalorra-epistemic"]) == pytest.approx(u["epistemic_norm"], rel=1e-5, abs=1e-9)
    assert h["x-dalorra-abstain-reason"] == (u["abstain_reason"] or "none")
    assert "x-dalorra-unfamiliarity" not in h or float(h["x-dalorra-unfamiliarity"]) == pytest.approx(
        u["unfamiliarity"], rel=1e-5
    )
    stream = client.post("/v1/completions", json={**body, "stream": True})
    first = json.loads(stream.text.split("\n\n")[0][6:])
    assert first["usage"] == out["usage"] and stream.text.rstrip().endswith("data: [DONE]")


def test_predict_headers_single_item_only(client):
    one = client.post("/predict", json={"question": "Is fire hot?", "choices": ["yes", "no"]})
    body = one.json()
    assert one.headers["x-dalorra-decision"] == body["decision"]
    assert float(one.headers["x-dalorra-confidence"]) == pytest.approx(body["confidence"], rel=1e-5)
    assert float(one.headers["x-dalorra-epistemic"]) == pytest.approx(
        body["epistemic_norm"], rel=1e-5, abs=1e-9
    )
    two = client.post("/predict", json=[{"question": "Q?", "choices": ["a", "b"]}] * 2)
    assert two.status_code == 200 and not any(k.startswith("x-dalorra-") for k in two.headers)


def test_generation_headers_list_every_choice(client):
    r = client.post(
        "/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2, "n": 2, "seed": 1}
    )
    us = [c["uncertainty"] for c in r.json()["choices"]]
    h = r.headers
    assert h["x-dalorra-kind"] == "generation, generation"
    assert [float(x) for x in h["x-dalorra-confidence"].split(", ")] == pytest.approx(
        [u["confidence"] for u in us]
    )
    assert [float(x) for x in h["x-dalorra-epistemic"].split(", ")] == pytest.approx(
        [u["epistemic_mean"] for u in us]
    )
    skipped = client.post(
        "/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2, "samples": 0}
    )
    assert skipped.json()["choices"][0]["uncertainty"] is None
    assert not any(k.startswith("x-dalorra-") for k in skipped.headers)
