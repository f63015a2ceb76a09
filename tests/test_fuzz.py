"""Fuzzing every route (issue #28 deliverable 2): requests generated from the app's OpenAPI schemas, the structure
valid and the values hostile (bench/fuzz.py builds them), against the app on a fake backend. Every response must
be < 500 and strict JSON (every SSE event JSON or [DONE], a stream ending in [DONE] or an error event).

A bounded, derandomized run per route; `python -m bench.fuzz` is the long one. Defects already known (in routes
this test does not own) are listed in KNOWN with an exact reproduction each, marked xfail(strict=True): when one
is fixed its reproduction passes, the xfail turns into a failure, and its entry is removed from KNOWN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from bench import fuzz


@dataclass(frozen=True)
class Known:
    """A defect in a route this test does not own: what it is, which generated requests it explains, and one
    exact request that shows it."""

    name: str
    routes: tuple[str, ...]
    explains: Callable[[Any], bool]
    url: str
    body: Any


KNOWN: list[Known] = []  # every defect the fuzzing found is fixed; add a reproduction here for a new one
hits: dict[str, int] = {}  # known defect → generated requests it explained (printed in the summary below)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with fuzz.client_for(tmp_path_factory.mktemp("fuzz")) as c:
        yield c


def _routes() -> list[fuzz.Route]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return fuzz.routes(fuzz.make_app(Path(tmp)).openapi())


ROUTES = _routes()


@pytest.mark.parametrize("route", ROUTES, ids=[r.key for r in ROUTES])
def test_no_server_error_and_only_json(client, route):
    components = client.app.openapi()["components"]["schemas"]
    cases = 150 if route.body is not None else 40 if route.params else 3
    unexplained: list = []

    @settings(
        max_examples=cases,
        derandomize=True,  # the same cases every run: the suite never flakes; bench/fuzz.py explores
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(fuzz.requests_for(route, components))
    def check(req: tuple[str, Any]) -> None:
        url, body = req
        status, found = fuzz.call(client, route, url, body)
        if not found:
            return
        known = [k for k in KNOWN if route.key in k.routes and k.explains(body)]
        if known:
            hits[known[0].name] = hits.get(known[0].name, 0) + 1
            return
        unexplained.append((url, fuzz.encode(body).decode()[:300] if body is not None else None, found))

    check()
    assert not unexplained, unexplained[:3]


@pytest.mark.parametrize(
    "known",
    [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=k.name), id=k.name[:60]) for k in KNOWN],
)
def test_known_defect_reproduction(client, known):
    route = next(r for r in ROUTES if r.key in known.routes and r.path.split("{")[0] in known.url)
    status, found = fuzz.call(client, route, known.url, known.body)
    assert not found, (status, found)


def test_the_checks_catch_what_they_must():
    """problems() itself: a 5xx, a non-strict JSON body, a bare Infinity in an event, a cut stream."""
    route = fuzz.Route("POST", "/v1/completions", (), {})
    assert fuzz.problems(route, 200, "application/json", '{"a": 1}') == []
    assert fuzz.problems(route, 500, "application/json", '{"a": 1}') == ["status 500"]
    assert fuzz.problems(route, 200, "application/json", '{"a": Infinity}')
    assert fuzz.problems(route, 200, "text/event-stream", 'data: {"a": 1}\n\ndata: [DONE]\n\n') == []
    assert fuzz.problems(route, 200, "text/event-stream", 'data: {"a": NaN}\n\ndata: [DONE]\n\n')
    assert fuzz.problems(route, 200, "text/event-stream", 'data: {"a": 1}\n\n')  # cut: no [DONE], no error
    assert fuzz.problems(route, 200, "text/event-stream", 'data: {"error": {"type": "x"}}\n\n') == []
    assert fuzz.problems(route, 200, "text/html", "<html>")  # an API route must answer JSON
