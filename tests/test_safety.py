"""Issue "Safe by default": the server's guards, against a fake backend (no model, fast).

Each test names the defect it pins (D1–D11 in the issue); each failed against the server before the fix.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.backend import Backend, BackendError
from server.errors import ApiError
from server.metrics import Metrics
from server.protocol import FeedbackRequest, PredictItem
from server.scheduler import Overloaded, Scheduler, TooLarge
from server.service import Service
from server.settings import Settings

DECISION = {"confidence": {"valid": True, "threshold": 0.9}, "epistemic": {"valid": False}}
Q = {"question": "Which is a source of light?", "choices": ["a rock", "the Sun"]}
LOCAL = {"client": ("127.0.0.1", 40000), "base_url": "http://127.0.0.1:8000"}


class FakeBackend(Backend):
    """Scores under a lock, like the HF backend: logits [0, 1, ...] per row, after `delay` seconds per call
    plus `row_delay` per row. A question containing "boom" raises; "nan" gives NaN logits."""

    name = "fake"

    def __init__(self, delay: float = 0.0, row_delay: float = 0.0):
        self.delay, self.row_delay = delay, row_delay
        self.lock = threading.Lock()
        self.models: dict[str, dict] = {}

    def load_adapter(self, name: str, path: str) -> dict:
        try:
            rec = json.loads((Path(path) / "dalorra.json").read_text())
        except ValueError as exc:  # like adapter_io's AdapterError, the message starts with the path
            raise ValueError(f"{path}: corrupt JSON ({exc})") from None
        with self.lock:
            self.models[name] = rec
        return rec

    def unload_adapter(self, name: str) -> None:
        with self.lock:  # waits for a running batch, as the HF backend does
            self.models.pop(name, None)

    def adapter_names(self) -> list[str]:
        return list(self.models)

    def score(self, requests):
        with self.lock:
            time.sleep(self.delay + self.row_delay * sum(r.rows for r in requests))
            out = []
            for r in requests:
                if r.adapter not in self.models:
                    out.append(BackendError(f"adapter {r.adapter!r} is not loaded"))
                elif "boom" in r.question:
                    out.append(RuntimeError("boom"))
                else:
                    lg = np.tile(np.arange(len(r.choices), dtype=float), (r.samples, 1))
                    out.append(lg * np.nan if "nan" in r.question else lg)
            return out


def _adapter(root: Path, name: str, **rec) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "dalorra.json").write_text(json.dumps({"method": "dalorra", "decision": DECISION, **rec}))
    return d


@pytest.fixture
def adapters(tmp_path) -> Path:
    root = tmp_path / "adapters"
    _adapter(root, "fake")
    _adapter(root, "spare")
    return root


def _settings(adapters: Path, **kw) -> Settings:
    return Settings(
        adapters_dir=adapters,
        default_adapter="fake",
        default_samples=2,
        feedback_key="unit-test-key-123",
        **kw,
    )


def _client(adapters: Path, backend=None, settings_kw=None, **client_kw) -> TestClient:
    app = create_app(_settings(adapters, **(settings_kw or {})), backend or FakeBackend())
    return TestClient(app, **{"raise_server_exceptions": False, **client_kw})


async def _service(adapters: Path, backend: Backend, **kw) -> Service:
    svc = Service(_settings(adapters, **kw), backend, Metrics())
    await svc.start()
    return svc


def _metric(c: TestClient, name: str, **labels) -> float:
    total = 0.0
    for line in c.get("/metrics").text.splitlines():
        head, _, val = line.rpartition(" ")
        if line.startswith("#") or head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(val)
    return total


# ---- D1: one bad request fails alone -------------------------------------------------------------
def test_lone_surrogate_is_a_422_naming_the_field(adapters):
    with _client(adapters) as c:
        body = b'{"question":"q?","choices":["\\udfff","b"],"samples":2}'
        r = c.post("/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "choices.0" in r.json()["error"]["message"], r.text
        r = c.post(
            "/predict",
            content=b'{"question":"q?","choices":["a","b"],"context":"\\ud800x"}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and "context" in r.json()["error"]["message"]


def test_unexpected_backend_error_is_a_counted_json_500_for_that_request_only(adapters):
    async def go():
        svc = await _service(adapters, FakeBackend(delay=0.05))
        res = await asyncio.gather(
            svc.predict([PredictItem(question="boom?", choices=["a", "b"])]),
            *[svc.predict([PredictItem(**Q, seed=i)]) for i in range(5)],
            return_exceptions=True,
        )
        await svc.stop()
        return res, svc

    res, svc = asyncio.run(go())
    assert isinstance(res[0], ApiError) and res[0].status == 500 and res[0].type == "internal_error"
    assert all(r[0].answer == "the Sun" for r in res[1:])
    with _client(adapters) as c:
        r = c.post("/predict", json={"question": "boom?", "choices": ["a", "b"]})
        assert r.status_code == 500 and set(r.json()["error"]) == {"type", "message"}
        assert _metric(c, "dalorra_requests_total", outcome="error") == 1


# ---- D2 and the D11 race: unload off the loop, admitted requests finish on what they were admitted to --
def test_unload_keeps_the_loop_live_and_lets_admitted_requests_finish(adapters):
    async def go():
        svc = await _service(adapters, FakeBackend(delay=0.6))
        await svc.registry.load("spare")
        busy = [
            asyncio.create_task(svc.predict([PredictItem(**Q, adapter="spare", seed=i)])) for i in range(8)
        ]
        await asyncio.sleep(0.1)  # the first batch holds the backend lock
        unload = asyncio.create_task(svc.registry.unload("spare"))
        lags = []
        while not unload.done():
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t)
        await unload
        res = await asyncio.gather(*busy, return_exceptions=True)
        with pytest.raises(ApiError) as after:
            await svc.predict([PredictItem(**Q, adapter="spare")])
        await svc.stop()
        return lags, res, after.value

    lags, res, after = asyncio.run(go())
    assert max(lags) < 0.3, max(lags)  # the event loop never waited for the backend lock
    assert all(not isinstance(r, Exception) for r in res), res
    # scored and decided with the thresholds they were admitted under (0.9), though the adapter is gone now
    assert all(r[0].decision == "abstain" and r[0].abstain_reason == "low_confidence" for r in res)
    assert after.status == 404 and after.type == "adapter_not_loaded"


# ---- D3: secure defaults ------------------------------------------------------------------------
def test_admin_routes_loopback_only_without_token_and_json_only(adapters):
    with _client(adapters) as c:  # TestClient's peer is "testclient": not loopback
        r = c.post("/v1/adapters/spare/load", json={})
        assert r.status_code == 403 and r.json()["error"]["type"] == "admin_forbidden"
    with _client(adapters, **LOCAL) as c:
        form = c.post("/v1/adapters/fake/unload", data={"x": "1"})  # what a cross-site HTML form can send
        assert form.status_code == 415
        assert c.post("/v1/adapters/fake/unload").status_code == 415
        assert c.get("/health/ready").status_code == 200
        rebound = c.post("/v1/adapters/spare/load", json={}, headers={"host": "evil.example:8000"})
        assert rebound.status_code == 403  # loopback peer, foreign Host: a DNS-rebound page
        assert c.post("/v1/adapters/spare/load", json={}).status_code == 200
    with _client(adapters, settings_kw={"admin_token": "admin-secret-1"}) as c:
        ok = c.post("/v1/adapters/spare/load", json={}, headers={"authorization": "Bearer admin-secret-1"})
        assert ok.status_code == 200


def test_allowed_hosts(adapters):
    with _client(adapters, settings_kw={"allowed_hosts": "api.example, localhost"}) as c:
        r = c.get("/health/live", headers={"host": "evil.example"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_host"
        assert c.get("/health/live", headers={"host": "api.example:8000"}).status_code == 200


@pytest.mark.parametrize("key", [None, "dev-only-change-me", "change-me-please"])
def test_no_public_feedback_key(adapters, key):
    s = Settings(adapters_dir=adapters, default_adapter="fake", feedback_key=key)
    a, b = Service(s, FakeBackend(), Metrics()), Service(s, FakeBackend(), Metrics())
    assert a.receipts.key != (key or "dev-only-change-me").encode()
    assert a.receipts.key != b.receipts.key and len(a.receipts.key) >= 32  # random per process
    assert Service(_settings(adapters), FakeBackend(), Metrics()).receipts.key == b"unit-test-key-123"


# ---- D4: body limit on the bytes read; body read timeout ------------------------------------------------
def test_chunked_body_over_the_limit_is_413(adapters):
    sent = 0

    def body():
        nonlocal sent
        for _ in range(48):  # 3 MiB in 64 KiB chunks, no Content-Length
            sent += 65536
            yield b" " * 65536

    with _client(adapters, **LOCAL) as c:
        r = c.post("/predict", content=body(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "too_large"
        assert (
            sent == 48 * 65536
        )  # (TestClient sends it all first; bench/reliability.py measures a real socket)
        assert _metric(c, "dalorra_requests_total", outcome="invalid") == 1


# ---- D5: receipts are typed after the signature ------------------------------------------------------
@pytest.mark.parametrize(
    "payload",
    [
        {"id": "x", "a": "fake", "p": 0, "c": 0.5, "t": "now"},  # no k, t a string
        {"id": "x", "a": "fake", "p": 0, "c": -3, "k": 2, "t": 0},
        {"id": "x", "a": "fake", "p": 0, "c": float("nan"), "k": 2, "t": 0},
        {"id": "x", "a": "fake", "p": 5, "c": 0.5, "k": 2, "t": 0},
        [1, 2, 3],
    ],
)
def test_signed_but_odd_receipts_are_4xx_never_500_or_nan(adapters, payload):
    svc = Service(_settings(adapters), FakeBackend(), Metrics())
    if isinstance(payload, dict):
        payload["t"] = time.time() if payload["t"] == 0 else payload["t"]
    with pytest.raises(ApiError) as exc:
        svc.feedback(FeedbackRequest(receipt=svc.receipts.sign(payload), label=0))
    assert exc.value.status == 422 and exc.value.type == "bad_receipt"


def test_feedback_for_an_adapter_not_loaded_creates_no_series(adapters):
    async def go():
        svc = await _service(adapters, FakeBackend())
        before = _series(svc)
        for i in range(5):
            r = svc.receipts.sign(
                {"id": f"r{i}", "a": f"made-up-{i}", "p": 0, "c": 0.5, "k": 2, "t": time.time()}
            )
            with pytest.raises(ApiError) as exc:
                svc.feedback(FeedbackRequest(receipt=r, label=0))
            assert exc.value.status == 404
        after = _series(svc)
        await svc.stop()
        return before, after

    before, after = asyncio.run(go())
    assert after == before


@pytest.mark.parametrize(
    "body", [{"receipt": "x" * 40, "label": -1}, {"receipt": "x", "label": "0"}, {"label": 0}]
)
def test_feedback_refused_by_its_schema_is_counted_invalid(adapters, body):
    with _client(adapters) as c:
        before = _metric(c, "dalorra_feedback_total", outcome="invalid")
        assert c.post("/feedback", json=body).status_code == 422
        assert _metric(c, "dalorra_feedback_total", outcome="invalid") == before + 1


def _series(svc: Service) -> set:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for m in svc.metrics.registry.collect()
        for s in m.samples
        if "calibration" in s.name
    }


# ---- D6/D7: adapter files, errors without server paths, never null probabilities --------------------------
def test_file_symlinks_out_of_the_adapters_dir_are_refused(adapters, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "dalorra.json").write_text(json.dumps({"method": "dalorra"}))
    d = adapters / "linked"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "dalorra.json").symlink_to(outside / "dalorra.json")
    with _client(adapters, **LOCAL) as c:
        r = c.post("/v1/adapters/linked/load", json={})
        assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"


def test_bad_adapter_errors_name_the_adapter_not_server_paths(adapters):
    (adapters / "broken").mkdir()
    (adapters / "broken" / "adapter_config.json").write_text("{}")
    (adapters / "broken" / "dalorra.json").write_text("{not json")
    with _client(adapters, **LOCAL) as c:
        r = c.post("/v1/adapters/broken/load", json={})
        assert r.status_code == 422 and "broken" in r.json()["error"]["message"]
        assert str(adapters) not in r.text and "/tmp" not in r.text


def test_non_finite_scores_are_an_error_never_null_probabilities(adapters):
    with _client(adapters) as c:
        r = c.post("/predict", json={"question": "nan?", "choices": ["a", "b"]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "non_finite_scores"
        assert "null" not in r.text


# ---- D8: admission keeps 429 honest ------------------------------------------------------------------
def test_overload_gets_429_at_once_not_504_later(adapters):
    async def wave(svc, n):
        res = await asyncio.gather(
            *[svc.predict([PredictItem(**Q, seed=i, samples=2)]) for i in range(n)], return_exceptions=True
        )
        return [200 if not isinstance(r, Exception) else r.status for r in res], res

    async def go():
        # 0.05 s per row: 20 requests × 2 rows = 2 s of work against a 1 s deadline
        svc = await _service(
            adapters,
            FakeBackend(row_delay=0.05),
            request_timeout_s=1.0,
            max_batch_rows=4,
            result_cache_size=0,
        )
        first, _ = await wave(svc, 20)
        second, res = await wave(svc, 20)
        await svc.stop()
        return first, second, res

    first, second, res = asyncio.run(go())
    assert 504 not in first + second and set(first + second) <= {200, 429}
    assert (
        second.count(200) >= 4
    )  # the measured rate admits what fits in the deadline: 0.8 s / 0.1 s per request
    ra = [int(r.headers["Retry-After"]) for r in res if isinstance(r, ApiError)]
    assert ra and all(1 <= x <= 3 for x in ra)


def test_scheduler_admission_from_the_measured_rate():
    b = Scheduler(FakeBackend(), max_batch_rows=4, max_wait_ms=0, max_queue_rows=1000)
    b.admit(4, 2.0)  # unmeasured: one batch
    with pytest.raises(Overloaded):
        b.admit(1, 2.0)
    b.release(4)
    b.row_seconds = 0.1
    b.admit(10, 2.0)
    b.admit(10, 2.0)  # 20 rows × 0.1 s = 2 s: fits exactly
    with pytest.raises(Overloaded) as exc:
        b.admit(15, 2.0)
    assert exc.value.retry_after == pytest.approx(1.5)  # 15 more rows must drain first


def test_a_request_too_large_for_its_deadline_is_refused_even_when_idle():
    """Issue 25: an idle server admitted any single request (640 rows via KServe → 504 after 60 s)."""
    b = Scheduler(FakeBackend(), max_batch_rows=4, max_wait_ms=0, max_queue_rows=1000)
    b.row_seconds = 0.1
    with pytest.raises(TooLarge) as exc:
        b.admit(21, 2.0)  # alone it needs 2.1 s > 2 s
    assert exc.value.limit == 20 and b.admitted_rows == 0
    b.admit(20, 2.0)
    b.release(20)
    with pytest.raises(TooLarge):  # beyond the queue bound, measured or not
        Scheduler(FakeBackend(), 4, 0, max_queue_rows=10).admit(11, None)


# ---- D9/D10/D11: counted outcomes, readiness, honest errors, odd inputs --------------------------------
def test_outcomes_counted_and_ready_gauge_follows_readiness(adapters):
    with _client(adapters, **LOCAL) as c:
        assert c.post("/predict", json={"question": "q", "choices": ["a"]}).status_code == 422
        assert c.post("/predict", json={**Q, "adapter": "nope"}).status_code == 404
        assert _metric(c, "dalorra_requests_total", outcome="invalid") == 2
        assert _metric(c, "dalorra_requests_total", adapter="nope") == 0  # made-up names: no series
        assert _metric(c, "dalorra_ready") == 1
        assert c.post("/v1/adapters/fake/unload", json={}).status_code == 200
        assert c.get("/health/ready").status_code == 503 and _metric(c, "dalorra_ready") == 0


def test_error_headers_and_messages(adapters):
    with _client(adapters, settings_kw={"api_token": "user-token-1"}) as c:
        r = c.get("/predict", headers={"authorization": "Bearer user-token-1"})
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        r = c.post("/predict", json=Q)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    with _client(adapters) as c:
        r = c.post("/predict", content=b'{"question": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert "body." not in r.json()["error"]["message"]
        r = c.post("/predict", json={"question": "q"})
        assert r.status_code == 422 and "list" not in r.json()["error"]["message"], r.text
        assert "choices" in r.json()["error"]["message"]
        r = c.post(
            "/predict",
            content=b'{"question":"q","choices":["a","b"],"min_confidence":NaN}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and "finite" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"question": "\u200b\u200b\u200b", "choices": ["a", "b"]},
        {"question": "q?", "choices": ["a", "\u200b\u2060"]},
        {"question": "q?", "choices": ["a", "b"], "samples": True},
        {"question": "q?", "choices": ["a", "b"], "seed": "3"},
    ],
)
def test_invisible_text_and_non_integers_refused(adapters, body):
    with _client(adapters) as c:
        r = c.post("/predict", json=body)
        assert r.status_code == 422, r.text


# ---- Issue #28: slow bodies, proxies, the API token on every route not meant to be open, receipts ---------
def _drip(chunks: list[bytes], gap_s: float):
    """An ASGI `receive` that hands out one chunk every `gap_s` seconds."""
    it = iter(range(len(chunks)))

    async def receive() -> dict:
        i = next(it)
        await asyncio.sleep(gap_s)
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    return receive


def _guarded(scope_extra: dict, receive, **guard_kw) -> tuple[int, list]:
    """Run one POST through RequestGuard in front of an app that answers 200; (status, rejections)."""
    from server.guards import RequestGuard

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent, rejected = [], []
    guard = RequestGuard(app, on_reject=lambda path, status: rejected.append(status), **guard_kw)

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [], **scope_extra}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], rejected


def test_a_dripping_body_is_cut_though_no_single_read_stalls():
    # a byte every 0.1 s never trips the 0.3 s per-read limit; the overall budget (0.3 s + 1 s/KiB) ends it
    status, rejected = _guarded({}, _drip([b"x"] * 40, 0.1), max_body_bytes=10_000, body_timeout_s=0.3)
    assert status == 408 and rejected == [408]


def test_a_slow_but_steady_body_is_read_whole():
    # 2,400 bytes at about 3 KB/s: above the minimum rate, so it arrives in full and the app answers
    status, rejected = _guarded({}, _drip([b"x" * 600] * 4, 0.2), max_body_bytes=10_000, body_timeout_s=0.3)
    assert status == 200 and rejected == []


def test_dripping_connections_are_closed_by_a_real_server(adapters):
    """Over a socket to uvicorn: the 408 arrives and the server closes the connection."""
    import select
    import socket

    import uvicorn

    from server.guards import head_timeout_protocol
    from tests.server_utils import free_port

    port = free_port()
    app = create_app(_settings(adapters, body_timeout_s=1.0), FakeBackend())
    server = uvicorn.Server(
        uvicorn.Config(app, port=port, log_level="warning", http=head_timeout_protocol(5.0))
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 400\r\n\r\n"
            )
            dripped = 0
            for _ in range(100):  # a byte every 0.2 s (under the 1 s per-read limit) for up to 20 s
                # send only while the server has said nothing: a byte sent after its close would be answered
                # with a reset that can discard the reply unread
                if select.select([s], [], [], 0.2)[0]:
                    break
                s.sendall(b" ")
                dripped += 1
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert b"body_timeout" in reply
        assert dripped < 50  # cut about 1 s in (~5 bytes), not after the 100 bytes and a stall
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-real-ip": "203.0.113.7"},
        {"forwarded": "for=203.0.113.7;proto=https"},
        {"forwarded": 'for="[2001:db8::1]:443"'},
        {"forwarded": "for=127.0.0.1"},  # what the proxy passed through says nothing about the client
        {"x-real-ip": "::1"},
        {"x-forwarded-host": "api.example"},
        {"true-client-ip": "198.51.100.2"},
    ],
)
def test_a_same_host_proxy_is_not_a_loopback_client(adapters, headers):
    with _client(adapters, **LOCAL) as c:
        r = c.post("/v1/adapters/spare/load", json={}, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["type"] == "admin_forbidden", r.text
        assert c.post("/v1/adapters/spare/load", json={}).status_code == 200  # direct loopback: allowed


def test_relayed_client_records_the_address_the_proxy_names():
    from server.guards import PROXIED, relayed_client

    local = ("127.0.0.1", 5000)
    assert relayed_client({}, local) == local
    assert relayed_client({b"x-real-ip": b"203.0.113.7"}, local) == ("203.0.113.7", 0)
    assert relayed_client({b"forwarded": b'for="[2001:db8::1]:443", for=10.0.0.1'}, local) == (
        "2001:db8::1",
        0,
    )
    assert relayed_client({b"forwarded": b"for=_hidden"}, local) == (PROXIED, 0)
    assert relayed_client({b"x-real-ip": b"127.0.0.1"}, local) == (PROXIED, 0)
    remote = ("198.51.100.9", 5000)  # not a same-host proxy: its headers are not ours to act on
    assert relayed_client({b"x-real-ip": b"127.0.0.1"}, remote) == remote


TOKEN = {"authorization": "Bearer user-token-1"}


@pytest.mark.parametrize(
    "path", ["/v2/models/fake/ready", "/v1/adapters", "/v1/adapters/fake", "/openapi.json", "/docs", "/redoc"]
)
def test_with_an_api_token_only_probes_metrics_and_the_page_stay_open(adapters, path):
    with _client(adapters, settings_kw={"api_token": "user-token-1"}) as c:
        r = c.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.status_code)
        err = r.json()["error"]
        if path.startswith("/v2"):  # KServe's shape: a string tritonclient can format
            assert isinstance(err, str) and "bearer token" in err
        else:
            assert err["type"] == "unauthorized"
        assert c.get(path, headers={"authorization": "Bearer wrong-token"}).status_code == 401
        assert c.get(path, headers=TOKEN).status_code == 200
        for open_path in (
            "/health/live",
            "/health/ready",
            "/v2/health/live",
            "/v2/health/ready",
            "/metrics",
            "/",
        ):
            assert c.get(open_path).status_code == 200, open_path


def test_api_token_refusals_are_counted_and_admin_keeps_its_own_token(adapters):
    kw = {"api_token": "user-token-1", "admin_token": "admin-token-1"}
    with _client(adapters, settings_kw=kw) as c:
        assert c.post("/predict", json=Q).status_code == 401
        assert _metric(c, "dalorra_requests_total", outcome="invalid") == 1
        admin = {"authorization": "Bearer admin-token-1"}
        assert c.post("/v1/adapters/spare/load", json={}, headers=admin).status_code == 200
        assert c.post("/v1/adapters/spare/load", json={}, headers=TOKEN).status_code == 401


def test_receipts_dated_in_the_future_are_refused(adapters):
    from server.receipts import ReceiptError, Receipts

    r = Receipts("unit-test-key-123", ttl_s=3600)
    now = time.time()
    pay = {"id": "x", "a": "fake", "p": 0, "c": 0.5, "k": 2}
    assert r.verify(r.sign({**pay, "t": now + 60})).id == "x"  # another replica's clock a minute ahead
    for t in (now + 3 * 3600, now + 100 * 365 * 86400, 1e300):
        with pytest.raises(ReceiptError, match="future"):
            r.verify(r.sign({**pay, "t": t}))
    svc = Service(_settings(adapters), FakeBackend(), Metrics())
    with pytest.raises(ApiError) as exc:
        svc.feedback(FeedbackRequest(receipt=svc.receipts.sign({**pay, "t": now + 86400}), label=0))
    assert exc.value.status == 403 and exc.value.type == "bad_receipt"


def test_an_empty_feedback_key_means_unset(adapters, monkeypatch):
    monkeypatch.setenv("DALORRA_FEEDBACK_KEY", "")  # what docker-compose passes when the shell has none
    s = Settings(adapters_dir=adapters, default_adapter="fake")
    assert s.feedback_key is None
    assert len(Service(s, FakeBackend(), Metrics()).receipts.key) >= 32  # a random key per process
    monkeypatch.setenv("DALORRA_FEEDBACK_KEY", "short")
    with pytest.raises(ValueError, match="feedback_key"):  # a real but too short key still stops the start
        Settings(adapters_dir=adapters, default_adapter="fake")
