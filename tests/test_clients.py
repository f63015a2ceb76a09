"""Python client, abstain router and CLI against a real server process on loopback."""

import asyncio
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from clients.client import AsyncClient, BadRequest, Client, NotFound
from clients.router import AbstainRouter, AsyncAbstainRouter
from tests.server_utils import ServerProcess, free_port

pytestmark = pytest.mark.smollm
Q, CH = "Which of these is a source of light?", ["the Sun", "the Moon", "a mirror", "a rock"]


@pytest.fixture(scope="module")
def server(adapters_dir, tmp_path_factory):
    s = ServerProcess(adapters_dir, "test-ad", tmp_path_factory.mktemp("clog") / "s.log").wait_ready()
    yield s
    s.stop()


def test_every_client_call(server):
    with Client(server.url) as c:
        assert c.ready()
        r = c.predict(Q, CH, samples=3)
        assert r.answer in CH and abs(sum(r.probabilities) - 1) < 1e-9 and r.samples == 3
        many = c.predict_many([{"question": Q, "choices": CH}, {"question": "2+2?", "choices": ["4", "5"]}])
        assert len(many) == 2 and len(many[1].probabilities) == 2
        fb = c.feedback(r.receipt, 0)
        assert fb.accepted and not fb.duplicate
        assert c.adapters().default == "test-ad"
        with pytest.raises(NotFound, match="adapter_not_found"):
            c.predict(Q, CH, adapter="missing")
        with pytest.raises(BadRequest) as exc:
            c.predict(Q, CH, samples=10_000)
        assert exc.value.status == 422 and "exceeds" in exc.value.message

    async def go():
        async with AsyncClient(server.url) as ac:
            assert await ac.ready()
            r = await ac.predict(Q, CH, samples=2)
            return (await ac.feedback(r.receipt, 0)).accepted

    assert asyncio.run(go())


def test_retry_honours_retry_after():
    calls = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            calls.append(self.path)
            if len(calls) == 1:
                self.send_response(503)
                self.send_header("Retry-After", "1")
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error": {"type": "unavailable", "message": "busy"}}')
                return
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"default": "x", "adapters": []}).encode())

        def log_message(self, *a):
            pass

    port = free_port()
    httpd = HTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        import time

        t = time.monotonic()
        with Client(f"http://127.0.0.1:{port}", retries=2) as c:
            assert c.adapters().default == "x"
        assert len(calls) == 2 and time.monotonic() - t >= 0.9  # waited the server's Retry-After
    finally:
        httpd.shutdown()


def test_router_both_paths_and_feedback(server):
    def before():
        return server.metric("dalorra_calibration_predictions_total")

    with Client(server.url) as c:
        sure = AbstainRouter(c, fallback=lambda q, ch, p: 1 / 0, min_confidence=0.0)
        r = sure.route(Q, CH)
        assert r.path == "model" and sure.counts["model"] == 1
        n0 = before()
        unsure = AbstainRouter(c, fallback=lambda q, ch, p: 2, min_confidence=1.0)
        r = unsure.route(Q, CH)
        assert r.path == "fallback" and r.answer == "a mirror" and r.feedback_sent
        assert before() == n0 + 1  # the fallback's answer reached the calibration counters

    async def go():
        async def fb(q, ch, p):
            return 1

        async with AsyncClient(server.url) as ac:
            return await AsyncAbstainRouter(ac, fallback=fb, min_confidence=1.0).route(Q, CH)

    assert asyncio.run(go()).answer == "the Moon"


def test_cli_table_json_and_batch(server, tmp_path):
    base = [sys.executable, "-m", "dalorra", "predict", "--url", server.url]
    args = ["--question", Q] + sum((["--choice", c] for c in CH), [])
    table = subprocess.run(base + args, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "decision:" in table.stdout and "the Sun" in table.stdout and "confidence" in table.stdout
    js = subprocess.run(base + args + ["--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(js.stdout)["answer"] in CH
    ada = subprocess.run(
        base + args + ["--json", "--adaptive", "--samples", "10"], capture_output=True, text=True, timeout=120
    )
    assert ada.returncode == 0, ada.stderr
    assert json.loads(ada.stdout)["samples"] in (4, 7, 10)  # the flag is accepted; semantics: test_server.py
    data = tmp_path / "items.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{Q} ({i})", "choices": CH, "label": 0}) + "\n" for i in range(5))
    )
    out = tmp_path / "out.jsonl"
    n0 = server.metric("dalorra_calibration_predictions_total")
    b = subprocess.run(
        base + ["--file", str(data), "--out", str(out), "--batch", "2", "--feedback"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert b.returncode == 0, b.stderr
    summary = json.loads(b.stdout.strip().splitlines()[-1])
    assert summary["items"] == 5 and summary["answered"] + summary["abstained"] == 5
    assert 0 <= summary["accuracy"] <= 1 and "ece" in summary
    assert len(out.read_text().splitlines()) == 5
    assert summary["feedback"] == {"accepted": 5}  # the file's labels reached the live calibration
    assert server.metric("dalorra_calibration_predictions_total") == n0 + 5
    bad = subprocess.run(base + ["--question", "q", "--choice", "a"], capture_output=True, text=True)
    assert bad.returncode == 2
