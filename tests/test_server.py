"""Integration: real uvicorn processes on loopback with the real SmolLM2 and an exported adapter."""

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest

from adapters.basemodel import load_base
from adapters.calibration import metrics as offline_metrics
from adapters.data import Item, load_jsonl
from adapters.scoring import score
from adapters.uncertainty import summarize
from tests.server_utils import ServerProcess

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def servers(adapters_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    a = ServerProcess(adapters_dir, "test-ad", logs / "a.log", DALORRA_MAX_WAIT_MS="20")
    b = ServerProcess(adapters_dir, "test-ad", logs / "b.log")
    a.wait_ready()
    b.wait_ready()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def items(data_dir):
    return load_jsonl(data_dir / "arc_easy" / "validation.jsonl", limit=6)


def _body(it: Item, **kw):
    return {"question": it.question, "choices": list(it.choices), **kw}


def test_predict_equals_core_score(servers, items, adapters_dir):
    a, _ = servers
    r = httpx.post(a.url + "/predict", json=[_body(it, samples=4, seed=3) for it in items[:3]], timeout=120)
    assert r.status_code == 200, r.text
    got = r.json()
    from adapters.adapter_io import load_adapter

    base, tok = load_base(None)
    model = load_adapter(adapters_dir / "test-ad", base, tok)
    ref = summarize(score(model, items[:3], samples=4, seed=3))
    for i, g in enumerate(got):
        k = len(items[i].choices)
        assert sum(g["probabilities"]) == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose(g["probabilities"], ref["probabilities"][i, :k], atol=1e-5)
        assert g["epistemic"] == pytest.approx(ref["epistemic"][i], abs=1e-5)
        assert g["decision"] in ("answer", "abstain") and g["samples"] == 4
    # Default (fixed) draws are reproducible; fresh draws are allowed.
    one = httpx.post(a.url + "/predict", json=_body(items[0]), timeout=60).json()
    two = httpx.post(a.url + "/predict", json=_body(items[0]), timeout=60).json()
    assert one["probabilities"] == two["probabilities"]
    assert httpx.post(a.url + "/predict", json=_body(items[0], fresh=True), timeout=60).status_code == 200


def test_adaptive_sampling_equals_core_score_at_the_samples_it_used(servers, items, adapters_dir):
    """Adaptive rounds continue the same seeded draws, so its answer is exactly S = n of plain scoring."""
    from adapters.adapter_io import load_adapter
    from adapters.uncertainty import sampling_settled

    a, _ = servers
    body = [_body(it, samples=10, seed=11, adaptive=True, return_samples=True) for it in items[:4]]
    r = httpx.post(a.url + "/predict", json=body, timeout=300)
    assert r.status_code == 200, r.text
    base, tok = load_base(None)
    model = load_adapter(adapters_dir / "test-ad", base, tok)
    for it, g in zip(items[:4], r.json(), strict=True):
        n = g["samples"]
        assert n in (4, 7, 10) and len(g["sample_probabilities"]) == n
        full = score(model, [it], samples=10, seed=11)[:, 0]
        ref = summarize(full[:n, None])
        np.testing.assert_allclose(g["probabilities"], ref["probabilities"][0], atol=1e-5)
        if n < 10:  # it stopped because the rule said so, and not before
            assert sampling_settled(full[:n]) and not (n > 4 and sampling_settled(full[: n - 3]))


def test_concurrent_requests_share_backend_calls(servers, items):
    a, _ = servers
    before = a.metric("dalorra_backend_calls_total")

    async def go():
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(
                *[c.post(a.url + "/predict", json=_body(items[i % 6], samples=2)) for i in range(32)]
            )

    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    for i, r in enumerate(rs):
        assert r.json()["answer"] in items[i % 6].choices
    calls = a.metric("dalorra_backend_calls_total") - before
    assert 1 <= calls < 32


def test_seeded_results_are_cached_until_the_adapter_reloads(servers, items):
    a, _ = servers
    body = _body(items[5], samples=3, seed=77)
    first = httpx.post(a.url + "/predict", json=body, timeout=120).json()
    calls, hits = a.metric("dalorra_backend_calls_total"), a.metric("dalorra_cache_hits_total")
    again = httpx.post(a.url + "/predict", json=body, timeout=120).json()
    assert again["probabilities"] == first["probabilities"]
    assert (
        a.metric("dalorra_cache_hits_total") == hits + 1 and a.metric("dalorra_backend_calls_total") == calls
    )
    httpx.post(a.url + "/predict", json=_body(items[5], samples=3, fresh=True), timeout=120)
    assert a.metric("dalorra_cache_hits_total") == hits + 1  # fresh draws are never cached
    assert httpx.post(a.url + "/v1/adapters/test-ad/load", json={}, timeout=120).status_code == 200  # reload
    calls = a.metric("dalorra_backend_calls_total")
    after = httpx.post(a.url + "/predict", json=body, timeout=120).json()
    assert a.metric("dalorra_backend_calls_total") == calls + 1  # a reload invalidates the cache
    np.testing.assert_allclose(after["probabilities"], first["probabilities"], atol=1e-6)


def test_length_bucketing_changes_no_result(adapters_dir, items):
    from server.backend import ScoreRequest
    from server.hf_backend import HFBackend
    from server.settings import Settings

    reqs = [
        ScoreRequest("t", it.question * (1 + i % 3), it.choices, None, 2, i) for i, it in enumerate(items)
    ]
    out, chunks = {}, {}
    for bucket in (False, True):
        be = HFBackend(Settings(max_forward_rows=4, length_bucketing=bucket))
        be.load_adapter("t", str(adapters_dir / "test-ad"))
        chunks[bucket] = [
            [m[0] for m in c] for c in be._chunks([(i, None, None) for i in range(len(reqs))], reqs)
        ]
        assert [len(c) for c in chunks[bucket]] == [2, 2, 2]
        out[bucket] = be.score(reqs)
    assert chunks[True] != chunks[False]  # bucketing really regrouped the forwards
    for x, y in zip(out[False], out[True], strict=True):
        np.testing.assert_allclose(x.logits, y.logits, atol=1e-4)


def test_a_request_the_tokenizer_cannot_encode_fails_alone(adapters_dir, items):
    """A lone surrogate makes the tokenizer raise TypeError: only that request fails, with a BackendError (4xx)."""
    from server.backend import BackendError, Scored, ScoreRequest
    from server.hf_backend import HFBackend
    from server.settings import Settings

    be = HFBackend(Settings())
    be.load_adapter("t", str(adapters_dir / "test-ad"))
    reqs = [ScoreRequest("t", it.question, it.choices, None, 2, i) for i, it in enumerate(items[:3])]
    reqs.insert(1, ScoreRequest("t", "q?", ("\udfff", "b"), None, 2, 0))
    out = be.score(reqs)
    assert isinstance(out[1], BackendError) and "tokenized" in str(out[1])
    for i in (0, 2, 3):
        assert isinstance(out[i], Scored) and out[i].logits.shape == (2, len(reqs[i].choices))


def test_torch_compile_is_warmed_at_load_and_changes_no_result(adapters_dir, items):
    from server.backend import ScoreRequest
    from server.hf_backend import HFBackend
    from server.settings import Settings

    reqs = [ScoreRequest("t", it.question, it.choices, None, 3, i) for i, it in enumerate(items[:2])]
    out = {}
    for compiled in (False, True):
        be = HFBackend(Settings(compile=compiled, default_samples=3))
        be.load_adapter("t", str(adapters_dir / "test-ad"))
        layer = be.models["t"].decoder.layers[0]
        assert (layer.mlp._compiled_call_impl is not None) == compiled
        assert ("t" in be.warmup_seconds) == compiled  # the warm-up ran inside load, before "t" could serve
        out[compiled] = be.score(reqs)
    for x, y in zip(out[False], out[True], strict=True):
        np.testing.assert_allclose(x.logits, y.logits, atol=1e-4)


@pytest.mark.parametrize(
    "body,status",
    [
        ({"question": "", "choices": ["a", "b"]}, 422),
        ({"question": "q", "choices": ["a"]}, 422),
        ({"question": "q", "choices": [str(i) for i in range(27)]}, 422),
        ({"question": "q", "choices": ["a", "b"], "samples": 0}, 422),
        ({"question": "q", "choices": ["a", "b"], "samples": 10_000}, 422),
        ({"question": "q", "choices": ["a", "b"], "adapter": "nope"}, 404),
        ({"question": "q" * 5000, "choices": ["a", "b"]}, 413),
        ({"question": 5, "choices": "ab"}, 422),
        ({"question": "q", "choices": ["a", "  "]}, 422),
    ],
)
def test_bad_inputs_4xx_counted_as_invalid_and_change_nothing_else(servers, body, status):
    a, _ = servers
    ok, invalid = (
        a.metric("dalorra_requests_total", {"outcome": "ok"}),
        a.metric("dalorra_requests_total", {"outcome": "invalid"}),
    )
    r = httpx.post(a.url + "/predict", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"type", "message"}
    assert a.metric("dalorra_requests_total", {"outcome": "ok"}) == ok
    assert a.metric("dalorra_requests_total", {"outcome": "invalid"}) == invalid + 1


def test_malformed_json(servers):
    a, _ = servers
    r = httpx.post(a.url + "/predict", content=b'{"question": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_json"


def test_feedback_ecE_from_metrics_equals_offline(servers, items):
    a, b = servers
    # Predictions on server B; feedback to server A (another replica, same key).
    preds = httpx.post(b.url + "/predict", json=[_body(it, samples=3) for it in items], timeout=120).json()
    for p, it in zip(preds, items, strict=True):
        r = httpx.post(a.url + "/feedback", json={"receipt": p["receipt"], "label": it.label})
        assert r.status_code == 200 and r.json()["duplicate"] is False
    again = httpx.post(a.url + "/feedback", json={"receipt": preds[0]["receipt"], "label": items[0].label})
    assert again.json()["duplicate"] is True
    n = np.array([a.metric("dalorra_calibration_predictions_total", {"bin": str(i)}) for i in range(15)])
    c = np.array([a.metric("dalorra_calibration_confidence_total", {"bin": str(i)}) for i in range(15)])
    k = np.array([a.metric("dalorra_calibration_correct_total", {"bin": str(i)}) for i in range(15)])
    assert n.sum() == len(items)  # the repeat counted once
    probs = np.zeros((len(items), 5))
    for i, p in enumerate(preds):
        probs[i, : len(p["probabilities"])] = p["probabilities"]
    offline = offline_metrics(probs, np.array([it.label for it in items]))["ece"]
    assert np.abs(c - k).sum() / n.sum() == pytest.approx(offline, abs=1e-9)


def test_forged_or_bad_feedback_refused(servers, items):
    a, _ = servers
    p = httpx.post(a.url + "/predict", json=_body(items[0]), timeout=60).json()
    body, sig = p["receipt"].split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=="))
    payload["p"] = (payload["p"] + 1) % 4  # claim another predicted answer
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=") + "." + sig
    before = a.metric("dalorra_calibration_predictions_total")
    assert httpx.post(a.url + "/feedback", json={"receipt": forged, "label": 0}).status_code == 403
    assert httpx.post(a.url + "/feedback", json={"receipt": "garbage", "label": 0}).status_code == 403
    assert httpx.post(a.url + "/feedback", json={"receipt": p["receipt"], "label": 9}).status_code == 422
    assert httpx.post(a.url + "/feedback", json={"receipt": p["receipt"], "label": -1}).status_code == 422
    assert a.metric("dalorra_calibration_predictions_total") == before


def test_adapters_health_and_loading(servers, adapters_dir):
    a, _ = servers
    j = httpx.get(a.url + "/v1/adapters").json()
    names = {x["name"]: x for x in j["adapters"]}
    assert j["default"] == "test-ad" and names["test-ad"]["loaded"] and names["test-ad"]["rank"] == 8
    assert set(names["test-ad"]["keep_probability"]) == {"q_proj", "v_proj", "lm_head"}
    for path in (
        "/health/live",
        "/health/ready",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/test-ad/ready",
    ):
        assert httpx.get(a.url + path).status_code == 200, path
    assert httpx.get(a.url + "/v2/models/nope/ready").status_code == 404
    r = httpx.post(a.url + "/v1/adapters/corrupt/load", json={}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["type"] == "bad_adapter"
    assert str(adapters_dir) not in r.text  # errors name the adapter, not where the server keeps it
    assert httpx.post(a.url + "/v1/adapters/..%2Fetc/load", json={}).status_code in (404, 422)
    assert (
        httpx.post(a.url + "/predict", json={"question": "q?", "choices": ["a", "b"]}, timeout=60).status_code
        == 200
    )


def test_web_page_shows_api_probabilities(servers, tmp_path):
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian chromium is required (scripts/test.sh installs it)"
    a, _ = servers
    # Drive the page with a tiny script injected through the DevTools-free path: --dump-dom after a
    # virtual-time budget, with the form auto-submitted by a query flag.
    r = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path}",
            "--virtual-time-budget=60000",
            "--run-all-compositor-stages-before-draw",
            "--dump-dom",
            a.url + "/?autosubmit=1",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    dom = r.stdout
    assert 'data-prob="' in dom, r.stderr[-2000:]
    import re

    shown = [float(x) for x in re.findall(r'data-prob="([0-9.]+)"', dom)]
    api = httpx.post(
        a.url + "/predict",
        json={
            "question": "Which of these is a source of light?",
            "choices": ["the Sun", "the Moon", "a mirror", "a rock"],
            "adapter": "test-ad",
            "samples": 10,
        },
        timeout=60,
    ).json()
    np.testing.assert_allclose(shown, api["probabilities"], atol=1e-6)
