"""Reliability and security against real server processes: fuzzing, overload, hot-loading, drain, tokens."""

import asyncio
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.server_utils import ServerProcess

pytestmark = pytest.mark.smollm
BODY = {
    "question": "Which of these is a source of light?",
    "choices": ["the Sun", "the Moon", "a mirror", "a rock"],
}


@pytest.fixture(scope="module")
def server(adapters_dir, tmp_path_factory):
    s = ServerProcess(
        adapters_dir,
        "test-ad",
        tmp_path_factory.mktemp("rel") / "s.log",
        DALORRA_MAX_SAMPLES="4",
        DALORRA_API_TOKEN="user-token-1",
        DALORRA_ADMIN_TOKEN="admin-token-1",
        DALORRA_BODY_TIMEOUT_S="1",
        DALORRA_HEAD_TIMEOUT_S="2",
    ).wait_ready()
    yield s
    s.stop()


AUTH = {"authorization": "Bearer user-token-1"}
ADMIN = {"authorization": "Bearer admin-token-1"}


def test_schemathesis_no_server_errors(server, tmp_path):
    st = shutil.which("schemathesis") or str(
        __import__("pathlib").Path(sys.executable).parent / "schemathesis"
    )
    r = subprocess.run(
        [
            st,
            "run",
            server.url + "/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "15",
            "-H",
            "Authorization: Bearer admin-token-1",
            "--exclude-path",
            "/metrics",
            "--exclude-path-regex",
            "/v1/adapters/.*/(load|unload)",
            "--seed",
            "1",
            "--request-timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:]


def test_tokens_required_and_constant_time(server):
    assert httpx.post(server.url + "/predict", json=BODY).status_code == 401
    assert (
        httpx.post(server.url + "/predict", json=BODY, headers={"authorization": "Bearer nope"}).status_code
        == 401
    )
    assert httpx.post(server.url + "/predict", json=BODY, headers=AUTH, timeout=60).status_code == 200
    # Adapter management needs the admin token, not the user's.
    assert httpx.post(server.url + "/v1/adapters/test-ad/load", json={}, headers=AUTH).status_code == 401
    assert "user-token-1" not in open(server.log.name).read()


def test_limits_give_clear_4xx(server):
    long_q = {"question": "word " * 700, "choices": ["a", "b"]}
    r = httpx.post(server.url + "/predict", json=long_q, headers=AUTH, timeout=60)
    assert r.status_code == 422 and "tokens" in r.json()["error"]["message"]
    big = httpx.post(
        server.url + "/predict",
        content=b"x" * 2_000_000,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert big.status_code == 413
    many = httpx.post(server.url + "/predict", json=[BODY] * 65, headers=AUTH)
    assert many.status_code == 413


def test_path_traversal_and_corrupt_adapter_hot_load(server, adapters_dir, tmp_path):
    for name in ("..", "../etc", "a/b", ".hidden"):
        r = httpx.post(server.url + f"/v1/adapters/{name}/load", json={}, headers=ADMIN)
        assert r.status_code in (404, 422), (name, r.status_code)
    outside = tmp_path / "outside"
    shutil.copytree(adapters_dir / "test-ad", outside)
    (adapters_dir / "escape").symlink_to(outside, target_is_directory=True)
    try:
        r = httpx.post(server.url + "/v1/adapters/escape/load", json={}, headers=ADMIN)
        assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
    finally:
        (adapters_dir / "escape").unlink()

    async def go():
        async with httpx.AsyncClient(timeout=300, headers=AUTH) as c:
            load = asyncio.create_task(
                c.post(server.url + "/v1/adapters/corrupt/load", json={}, headers=ADMIN)
            )
            preds = await asyncio.gather(
                *[c.post(server.url + "/predict", json={**BODY, "samples": 2}) for _ in range(12)]
            )
            return await load, preds

    load, preds = asyncio.run(go())
    assert load.status_code == 422 and load.json()["error"]["type"] == "bad_adapter"
    assert [r.status_code for r in preds] == [200] * 12


def test_poisoned_request_fails_alone(server):
    """A lone surrogate (valid JSON, not text) beside 12 good requests: it gets a 422 naming the field, they 200."""

    async def go():
        async with httpx.AsyncClient(timeout=300, headers=AUTH) as c:
            bad = c.post(
                server.url + "/predict",
                content=b'{"question":"q?","choices":["\\udfff","b"],"samples":2}',
                headers={"content-type": "application/json"},
            )
            return await asyncio.gather(
                bad,
                *[c.post(server.url + "/predict", json={**BODY, "samples": 2, "seed": i}) for i in range(12)],
            )

    bad, *good = asyncio.run(go())
    assert bad.status_code == 422 and "choices.0" in bad.json()["error"]["message"]
    assert [r.status_code for r in good] == [200] * 12


def test_stalled_bodies_and_heads_are_cut_off(server):
    import socket

    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # 10 of 200 body bytes, then nothing
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer user-token-1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{"question'
        )
        t = time.monotonic()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t < 5, reply
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a head that never ends
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        t = time.monotonic()
        assert s.recv(4096) == b"" and time.monotonic() - t < 6  # closed by the server


def test_soak_overload_every_accepted_answered_once(adapters_dir, tmp_path):
    s = ServerProcess(
        adapters_dir,
        "test-ad",
        tmp_path / "soak.log",
        DALORRA_MAX_QUEUE_ROWS="16",
        DALORRA_MAX_BATCH_ROWS="16",
    ).wait_ready()
    try:
        ok0 = s.metric("dalorra_requests_total", {"outcome": "ok"})

        async def go():
            async with httpx.AsyncClient(timeout=300) as c:
                end = time.monotonic() + 20  # bounded soak
                results = []

                async def client():
                    while time.monotonic() < end:
                        r = await c.post(s.url + "/predict", json={**BODY, "samples": 4})
                        results.append(r)
                        if r.status_code == 429:
                            assert int(r.headers["retry-after"]) >= 1
                            await asyncio.sleep(0.05)

                await asyncio.gather(*[client() for _ in range(16)])  # ~4× what the queue admits
                return results

        results = asyncio.run(go())
        codes = [r.status_code for r in results]
        ok, refused = codes.count(200), codes.count(429)
        assert set(codes) <= {200, 429} and ok > 0 and refused > 0
        assert s.metric("dalorra_requests_total", {"outcome": "ok"}) - ok0 == ok  # answered exactly once each
        assert s.metric("dalorra_requests_total", {"outcome": "rejected"}) == refused
        (tmp_path / "soak.txt").write_text(f"accepted={ok} refused={refused}\n")
    finally:
        s.stop()


def test_sigterm_drains_in_flight(adapters_dir, tmp_path):
    s = ServerProcess(adapters_dir, "test-ad", tmp_path / "drain.log").wait_ready()

    async def go():
        async with httpx.AsyncClient(timeout=300) as c:
            tasks = [
                asyncio.create_task(
                    c.post(
                        s.url + "/predict", json={**BODY, "samples": 16, "seed": i, "adaptive": i % 2 == 1}
                    )
                )
                for i in range(4)
            ]  # adaptive ones are between rounds at times: they must finish too
            await asyncio.sleep(1.0)  # requests are in flight
            s.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(go())
    assert all(not isinstance(r, Exception) and r.status_code == 200 for r in results), results
    assert s.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a graceful shutdown
    s.stop()
