"""How an OpenAI-compatible stream ends: [DONE], or an error event then [DONE]; never a cut body (issue #28).

A failure after the first event (an error inside the generation, the server stopping) is an SSE error event the
`openai` client raises; SIGTERM with streams open is tested on a real uvicorn process (tests/fake_server.py).
"""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from bench import fuzz
from tests import fake_server


def _events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture
def slow_server(tmp_path):
    """A real server process whose generations emit a token every 0.2 s; 1 s of graceful shutdown."""
    with fake_server.running(tmp_path, grace_s=1.0, token_s=0.2) as (url, proc):
        yield url, proc
    text = (
        tmp_path / "server.log"
    ).read_text()  # the only tracebacks: uvicorn's report of the tasks it cancelled
    assert text.count("Traceback") == text.count("CancelledError: Task cancelled, timeout graceful"), text[
        -3000:
    ]


def test_sigterm_ends_open_streams_with_an_error_event_then_done(slow_server):
    url, proc = slow_server
    bodies = [
        ("/v1/completions", {"model": "fake", "prompt": "Once", "max_tokens": 500, "stream": True}),
        (
            "/v1/chat/completions",
            {
                "model": "fake",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 500,
                "stream": True,
            },
        ),
    ]
    with httpx.Client(timeout=60) as client:
        streams = [client.stream("POST", url + path, json=body) for path, body in bodies]
        responses = [s.__enter__() for s in streams]
        lines = [r.iter_lines() for r in responses]
        firsts = [next(line for line in it if line.startswith("data: ")) for it in lines]  # both streaming
        proc.send_signal(signal.SIGTERM)
        rests = []
        for it in lines:  # a cut body would raise httpx.RemoteProtocolError (incomplete chunked read) here
            rests.append([line[6:] for line in it if line.startswith("data: ")])
        for s in streams:
            s.__exit__(None, None, None)
    for first, rest in zip(firsts, rests, strict=True):
        assert json.loads(first[6:])["choices"]
        assert rest[-1] == "[DONE]", rest[-3:]
        err = json.loads(rest[-2])["error"]  # 500 tokens take 100 s: the grace period (1 s) ends them first
        assert err["type"] == "unavailable" and "shutting down" in err["message"]
        assert all(json.loads(e) for e in rest[:-1])  # every event strict JSON
    # uvicorn re-raises the SIGTERM it caught once shutdown is complete: the exit status is that signal's
    assert proc.wait(60) in (0, -signal.SIGTERM)


def test_a_failure_after_the_first_event_is_an_error_event(tmp_path, monkeypatch):
    """The generation fails after streaming its first token: the stream ends with an error event and [DONE]."""
    with fuzz.client_for(tmp_path) as c:
        backend = c.app.state.service.backend
        real = backend.generate

        def failing(request, on_token=None, cancelled=None, gate=None):
            if on_token is not None:
                on_token(0, " a", None)
            raise RuntimeError("the backend broke mid-generation")

        monkeypatch.setattr(backend, "generate", failing)
        body = {"model": "fake", "prompt": "Once", "max_tokens": 4, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            events = _events(r.read().decode())
        assert r.status_code == 200
        assert json.loads(events[0])["choices"][0]["text"] == " a"
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["type"] == "internal_error" and set(err) == {"message", "type", "param", "code"}
        monkeypatch.setattr(backend, "generate", real)
        metrics = c.get("/metrics").text
        assert 'dalorra_generation_requests_total{adapter="fake",outcome="error"} 1.0' in metrics
