"""Property-based fuzzing of every route (issue #28 deliverable 2): requests built from the app's own OpenAPI
schemas, with the structure valid and the values hostile, against the app on a fake backend (no model, fast).

Every schema leaf is, at random, a plausible value or a hostile one of the same JSON type: Unicode edge cases
(lone surrogates, NUL, BOM, bidi overrides, zero-width and combining runs, non-characters), empty and huge
strings, huge, negative and 2^63/2^64-boundary integers, NaN, ±Infinity, ±1e308, empty and huge lists. A few
fields get plausible values a schema cannot express (adapter names, signed receipts, KServe tensors), so that
requests reach the handlers instead of stopping at validation. The invariant checked on every response:
status < 500, a JSON body that is strict JSON (no NaN/Infinity), and for a stream every `data:` event strict
JSON or `[DONE]`, ending in `[DONE]` or an error event.

    python -m bench.fuzz [--cases 400] [--seed 0]

writes bench/results/fuzz.json (route → {cases, status_5xx, invalid_json, statuses, failures}) and fuzz.md.
tests/test_fuzz.py runs the same cases, fewer of them, in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from server.backend import Backend, BackendError, ScoreRequest

ADAPTERS = ("fake", "spare", "gen-bad-json", "gen-bad-type")
NAMES = ("fake", "fake", "spare")  # plausible names: loaded adapters
KEY = "fuzz-feedback-key-123"
DECISION = {"confidence": {"valid": True, "threshold": 0.6}, "epistemic": {"valid": False}}
BAD_GENERATION_DECISIONS = {
    "gen-bad-json": "{not json",
    "gen-bad-type": '{"confidence": {"valid": true, "threshold": "high"}}',
}

OUTPUT_NAMES = (
    "answer",
    "answer_index",
    "probabilities",
    "confidence",
    "epistemic",
    "decision",
    "abstain_reason",
)

# ---- hostile values --------------------------------------------------------------------------------------
EDGE_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",  # lone high surrogate
    "a\udfffb",  # lone low surrogate inside text
    "\udbff\udfff\ud800",  # a valid pair, then a lone one
    "\ufeff",  # BOM
    "\u202eevil\u202c",  # bidi override
    "\u200b\u200c\u200d\u2060",  # zero-width only
    "e" + "\u0301" * 300,  # a combining run
    "👩‍👩‍👧‍👦" * 20,  # ZWJ sequences
    "\uffff\ufffe\U0010ffff",  # non-characters
    "\x1b[31m\r\n\t",
    "../../etc/passwd",
    "%00%ff",
    "{}",
    "null",
    "NaN",
    "x" * 70_000,  # beyond every per-field character limit, within the body limit
    "word " * 5_000,
]
EDGE_INTS = [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**200, -(2**63) - 1, -(10**30)]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 1e-9, 0.999999999]


def hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(EDGE_STRINGS),
        st.text(st.characters(categories=["Cs", "Cc", "Cf", "Mn"]), max_size=12),  # Cs: lone surrogates
        st.text(max_size=30),
    )


def plain_text(min_size: int = 1, max_size: int = 24) -> st.SearchStrategy[str]:
    return st.text(st.sampled_from("abcdefghij ?XYZ"), min_size=max(1, min_size), max_size=max_size)


def _mixed(valid: st.SearchStrategy, hostile: st.SearchStrategy, rate: float = 0.3) -> st.SearchStrategy:
    """`hostile` with probability about `rate`, else `valid`."""
    return st.integers(0, 99).flatmap(lambda r: hostile if r < 100 * rate else valid)


def json_scalar() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(EDGE_INTS),
        st.sampled_from(EDGE_FLOATS),
        hostile_text(),
    )


def json_value() -> st.SearchStrategy[Any]:
    return st.recursive(
        json_scalar(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(plain_text(max_size=8), inner, max_size=4)
        ),
        max_leaves=8,
    )


def _huge_list(item: st.SearchStrategy) -> st.SearchStrategy[list]:
    return st.builds(lambda x, n: [x] * n, item, st.sampled_from([0, 300, 5_000]))


# ---- strategies from the schemas -------------------------------------------------------------------------
@dataclass
class Schemas:
    """Strategies for the app's schemas; each leaf is hostile with probability `rate`. A request gets one of
    three rates (requests_for): all plausible, a few odd values, or many."""

    components: dict
    rate: float = 0.3
    hints: dict[str, st.SearchStrategy] = field(default_factory=dict)  # property name → plausible values

    def __post_init__(self) -> None:
        self.hints = {**hints(self.rate), **self.hints}

    def mixed(self, valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
        return _mixed(valid, hostile, self.rate)

    def resolve(self, s: dict) -> dict:
        while "$ref" in s:
            s = self.components[s["$ref"].rsplit("/", 1)[-1]]
        return s

    def of(self, schema: dict, name: str = "") -> st.SearchStrategy:
        s = self.resolve(schema)
        if name in self.hints:  # the hint mixes in hostile values itself
            return self.hints[name]
        return self._plain(s, name)

    def _plain(self, s: dict, name: str) -> st.SearchStrategy:
        for key in ("anyOf", "oneOf"):
            if key in s:
                return st.one_of([self.of(b, name) for b in s[key]])
        if "allOf" in s:
            return self.of(s["allOf"][0], name)
        if "const" in s:
            return st.just(s["const"])
        if "enum" in s:
            return self.mixed(st.sampled_from(s["enum"]), hostile_text())
        t = s.get("type")
        if t == "object" or "properties" in s:
            props = s.get("properties", {})
            required = set(s.get("required", []))
            strat = st.fixed_dictionaries(
                {k: self.of(v, k) for k, v in props.items() if k in required},
                optional={k: self.of(v, k) for k, v in props.items() if k not in required},
            )
            if s.get("additionalProperties") is True and not props:
                return st.dictionaries(plain_text(max_size=8), json_value(), max_size=4)
            return strat
        if t == "array":
            item = self.of(s.get("items", {}), name)
            lo, hi = s.get("minItems", 0), min(s.get("maxItems", 6), 6)
            return self.mixed(st.lists(item, min_size=lo, max_size=max(lo, hi)), _huge_list(item))
        if t == "string":
            return self.mixed(
                plain_text(s.get("minLength", 1), min(s.get("maxLength", 24), 24)), hostile_text()
            )
        if t == "integer":
            lo = int(s.get("minimum", s.get("exclusiveMinimum", -1) + 1))
            hi = int(s.get("maximum", lo + 3))
            return self.mixed(st.integers(lo, hi), st.sampled_from(EDGE_INTS))
        if t == "number":
            lo = s.get("minimum", s.get("exclusiveMinimum", 0.0))
            hi = s.get("maximum", lo + 1.0)
            valid = st.floats(lo, hi, exclude_min="exclusiveMinimum" in s)
            return self.mixed(valid, st.one_of(st.sampled_from(EDGE_FLOATS), st.sampled_from(EDGE_INTS)))
        if t == "boolean":
            return st.booleans()
        if t == "null":
            return st.none()
        return json_value()  # no type: any JSON value


def receipts(rate: float) -> st.SearchStrategy[str]:
    """Receipts signed with the app's key (valid, and validly signed odd payloads), tampered ones, and text."""
    from server.receipts import Receipts

    signer = Receipts(KEY, 3600)

    def sign(p: dict) -> str:
        return signer.sign({**p, "t": time.time() + p["t"]})

    payload = st.fixed_dictionaries(
        {
            "id": _mixed(st.just("r-1"), hostile_text(), rate),
            "a": _mixed(st.sampled_from(ADAPTERS), hostile_text(), rate),
            "p": _mixed(st.integers(0, 1), st.sampled_from(EDGE_INTS), rate),
            "c": _mixed(st.floats(0, 1), st.sampled_from(EDGE_FLOATS), rate),
            "k": _mixed(st.just(2), st.sampled_from(EDGE_INTS), rate),
            "t": _mixed(st.just(0.0), st.sampled_from([-1e7, 1e7, 1e300, math.nan]), rate),
        }
    )
    signed = payload.map(sign)
    return _mixed(signed, st.one_of(signed.map(lambda r: r[:-3] + "AAA"), hostile_text()), rate)


def kserve_inputs(rate: float) -> st.SearchStrategy[list]:
    """KServe tensors with the right names and consistent shapes, their strings and shapes sometimes hostile."""

    def build(b: int, k: int, texts: list[str], context: bool, shapes: list | None) -> list:
        q = {"name": "question", "datatype": "BYTES", "shape": [b], "data": texts[:b]}
        c = {"name": "choices", "datatype": "BYTES", "shape": [b, k], "data": texts[b : b + b * k]}
        out = [q, c]
        if context:
            out.append({"name": "context", "datatype": "BYTES", "shape": [b], "data": texts[:b]})
        if shapes is not None:
            q["shape"], c["shape"] = shapes[:1], shapes[1:3]
        return out

    text = _mixed(plain_text(), hostile_text(), rate)
    return st.integers(1, 3).flatmap(
        lambda b: st.integers(2, 4).flatmap(
            lambda k: st.builds(
                build,
                st.just(b),
                st.just(k),
                st.lists(text, min_size=b + b * k, max_size=b + b * k),
                st.booleans(),
                _mixed(st.none(), st.lists(st.sampled_from(EDGE_INTS), min_size=3, max_size=3), rate),
            )
        )
    )


def text_part(text: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    """An OpenAI chat content part of type text."""
    return st.builds(lambda t: {"type": "text", "text": t}, text)


def hints(rate: float) -> dict[str, st.SearchStrategy]:
    """Plausible values for fields whose valid values a schema cannot express, hostile at `rate`."""
    name = _mixed(st.sampled_from(NAMES), hostile_text(), rate)
    return {
        "model": name,
        "adapter": name,
        "receipt": receipts(rate),
        "inputs": kserve_inputs(rate),
        "question": _mixed(st.sampled_from(["Which is a source of light?", "2 + 2?"]), hostile_text(), rate),
        "prompt": _mixed(st.sampled_from(["Once upon a time", "Q: 2 + 2?\nA:"]), hostile_text(), rate),
        "content": _mixed(
            st.one_of(plain_text(), st.lists(text_part(plain_text()), min_size=1, max_size=2)),
            st.one_of(
                hostile_text(), st.lists(text_part(hostile_text()), min_size=1, max_size=2), json_value()
            ),
            rate,
        ),
        "outputs": st.lists(
            st.fixed_dictionaries({"name": _mixed(st.sampled_from(OUTPUT_NAMES), hostile_text(), rate)}),
            max_size=3,
        ),
        "parameters": st.fixed_dictionaries(
            {},
            optional={
                "samples": _mixed(st.integers(1, 4), st.sampled_from(EDGE_INTS), rate),
                "seed": _mixed(st.integers(0, 3), st.sampled_from(EDGE_INTS), rate),
            },
        ),
    }


PATH_VALUES = ["..", "a/b", "%2e%2e", "x" * 3000, "\ud800", "é", " ", "corrupt", "missing", "gen-bad-json"]


def path_value(rate: float, name: str) -> st.SearchStrategy[str]:
    odd = st.one_of(st.sampled_from(PATH_VALUES), hostile_text().map(lambda t: t[:3000]))  # URLs < 64 KiB
    plausible = (
        st.sampled_from(["1", "0"]) if name == "version" else st.sampled_from(NAMES)
    )  # KServe versions
    return _mixed(plausible, odd, rate)


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # the OpenAPI template, e.g. /v1/adapters/{name}/load
    params: tuple[str, ...]
    body: dict | None  # the request body's schema

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


def routes(openapi: dict) -> list[Route]:
    out = []
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            params = tuple(p["name"] for p in op.get("parameters", []) if p["in"] == "path")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            out.append(Route(method.upper(), path, params, body))
    return out


RATES = (0.1, 0.4)  # a few odd values, many


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every scalar, list and object inside a JSON value (the root excluded)."""
    out = [path] if path else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            out += _leaves(v, (*path, i))
    return out


def _hostile_like(value: Any) -> st.SearchStrategy:
    """A hostile value of the same JSON type as `value`."""
    if isinstance(value, bool) or value is None:
        return json_scalar()
    if isinstance(value, int):
        return st.sampled_from(EDGE_INTS)
    if isinstance(value, float):
        return st.one_of(st.sampled_from(EDGE_FLOATS), st.sampled_from(EDGE_INTS))
    if isinstance(value, str):
        return hostile_text()
    if isinstance(value, list):
        return st.one_of(st.just([]), _huge_list(st.just(value[0] if value else "x")))
    return st.one_of(st.just({}), st.dictionaries(plain_text(max_size=8), json_value(), max_size=4))


@st.composite
def _one_odd(draw: st.DrawFn, valid: st.SearchStrategy) -> Any:
    """A plausible value with exactly one part (a field, an element) made hostile: the input most likely to
    reach a handler with something it has not seen."""
    value = draw(valid)
    leaves = _leaves(value)
    if not leaves:
        return value
    path = draw(st.sampled_from(leaves))
    target = value
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = draw(_hostile_like(target[path[-1]]))
    return value


def requests_for(route: Route, components: dict) -> st.SearchStrategy[tuple[str, Any]]:
    """(url, body or None) for one route: all plausible (reaches the handler), one odd part, or hostile
    leaves at one of RATES."""
    plausible = _requests_at(route, Schemas(components, 0.0))
    odd = plausible.flatmap(lambda req: st.tuples(st.just(req[0]), _one_odd(st.just(copy.deepcopy(req[1])))))
    return st.one_of(plausible, odd, *[_requests_at(route, Schemas(components, rate)) for rate in RATES])


def _requests_at(route: Route, schemas: Schemas) -> st.SearchStrategy[tuple[str, Any]]:
    params = st.fixed_dictionaries({p: path_value(schemas.rate, p) for p in route.params})

    def url(values: dict) -> str:
        out = route.path
        for k, v in values.items():  # a lone surrogate goes out as the bytes UTF-8 would give it (invalid)
            out = out.replace("{" + k + "}", urllib.parse.quote(v.encode("utf-8", "surrogatepass"), safe=""))
        return out

    body = schemas.of(route.body) if route.body is not None else st.none()
    return st.tuples(params.map(url), body)


def encode(body: Any) -> bytes:
    """JSON as a hostile client writes it: NaN/Infinity literals, lone surrogates as \\u escapes, big ints."""
    return json.dumps(body, allow_nan=True, ensure_ascii=True).encode()


# ---- the invariant -------------------------------------------------------------------------------------
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def problems(route: Route, status: int, ctype: str, text: str) -> list[str]:
    """What is wrong with one response: a 5xx, a body that is not strict JSON, a bad or cut event stream."""
    out = [f"status {status}"] if status >= 500 else []
    ctype = ctype.split(";")[0].strip()
    if ctype == "text/event-stream":
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        for ev in events:
            if ev == "[DONE]":
                continue
            try:
                strict_json(ev)
            except ValueError:
                out.append(f"invalid SSE event {ev[:120]!r}")
        if not events or (events[-1] != "[DONE]" and '"error"' not in events[-1]):
            out.append("stream ended without [DONE] or an error event")
    elif ctype == "application/json":
        try:
            strict_json(text)
        except ValueError as exc:
            out.append(f"invalid JSON body ({exc}): {text[:120]!r}")
    elif route.path == "/metrics":
        from prometheus_client.parser import text_string_to_metric_families

        try:
            list(text_string_to_metric_families(text))
        except Exception as exc:  # noqa: BLE001 (any parse failure is the finding)
            out.append(f"unparsable metrics ({exc})")
    elif route.path not in ("/", "/docs", "/redoc") and status != 405:
        out.append(f"content type {ctype!r} where JSON was due")
    return out


# ---- the fake backend ----------------------------------------------------------------------------------
class FuzzBackend(Backend):
    """Reads each adapter's dalorra.json; scores with logits from the request's fields; generates with a real
    `tokenizers` tokenizer (so odd text fails as the HF backend's does), torch's seeded generator for `seed`
    (as adapters/generate.py) and adapters/masks.py's draw for `mask_seed`."""

    name = "fuzz"

    def __init__(self) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        self.tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        self.records: dict[str, dict] = {}
        self.lock = threading.Lock()

    def load_adapter(self, name: str, path: str) -> dict:
        rec = json.loads((Path(path) / "dalorra.json").read_text())
        with self.lock:
            self.records[name] = rec
        return rec

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self.records.pop(name, None)

    def adapter_names(self) -> list[str]:
        return list(self.records)

    def score(self, requests: list[ScoreRequest]) -> list:
        out = []
        for r in requests:
            if r.adapter not in self.records:
                out.append(BackendError(f"adapter {r.adapter!r} is not loaded"))
                continue
            self.tok.encode(r.question)  # what the HF backend's tokenizer does with the text first
            s = np.arange(r.first, r.first + r.samples)[:, None]
            k = np.arange(len(r.choices))[None, :]
            out.append(np.sin(0.7 * len(r.question) + 1.3 * (r.seed % 1000) + 0.9 * s + 2.1 * k) * 3.0)
        return out

    def tokenizer(self, adapter: str):  # noqa: ANN201 (a Hugging Face tokenizer, as the HF backend's)
        from transformers import PreTrainedTokenizerFast

        if adapter not in self.records:
            return None
        if not hasattr(self, "_hf_tok"):
            self._hf_tok = PreTrainedTokenizerFast(tokenizer_object=self.tok, eos_token="[UNK]")
        return self._hf_tok

    def prompt_logprobs(self, adapter, token_ids, top_k, gate=None):  # noqa: ANN001, ANN201 (the Backend contract)
        from server.backend import PromptLogprobs

        if adapter not in self.records:
            raise BackendError(f"adapter {adapter!r} is not loaded")
        with gate(1) if gate is not None else contextlib.nullcontext():
            n = len(token_ids)
        top = [[("[UNK]", -0.5)] * min(top_k, 1)] * (n - 1)
        return PromptLogprobs(["[UNK]"] * n, [None] + [-0.5] * (n - 1), [None, *top], "fake")

    def generate(self, request, on_token=None, cancelled=None, gate=None):  # noqa: ANN001, ANN201 (the Backend contract)
        import torch

        from adapters.generation import GeneratedChoice, GenerateResult, TokenScores
        from adapters.masks import draw_masks_from

        req = request
        turn = gate if gate is not None else (lambda rows: contextlib.nullcontext())
        text = req.prompt if req.prompt is not None else "\n".join(f"{r}: {c}" for r, c in req.messages)
        prompt = self.tok.encode(text).ids
        gen = torch.Generator().manual_seed(req.seed if req.seed is not None else 0)
        choices = []
        for i in range(req.n):
            pieces = []
            for _ in range(min(req.max_tokens, 6)):
                if cancelled is not None and cancelled():
                    break
                with turn(req.n):
                    piece = " " + "abc"[int(torch.randint(0, 3, (1,), generator=gen))]
                pieces.append(piece)
                if on_token is not None:
                    on_token(i, piece, None)
            T = len(pieces)
            c = GeneratedChoice("".join(pieces), "length", list(range(T)), pieces)
            if req.top_logprobs is not None:
                c.logprobs = [-0.5] * T
                c.top_logprobs = [[(p, -0.5)] * req.top_logprobs for p in pieces]
            if req.samples > 0:
                with turn(req.samples):
                    keep = {"m": torch.full((4,), 0.5)}
                    z = draw_masks_from({"m": 4}, keep, {}, req.samples, req.mask_seed)["m"]
                lp = -0.1 - 0.05 * z.sum(1, keepdim=True).double().numpy() * np.ones((req.samples, T))
                ent = np.full(T, 0.8)
                c.scores = TokenScores(ent, ent - 0.01, np.full(T, 0.01), lp, lp.mean(0))
            choices.append(c)
        return GenerateResult(len(prompt), choices, samples=req.samples)


def adapters_dir(root: Path) -> Path:
    """fake (default) and spare, two with a malformed generation_decision.json, one corrupt."""
    d = root / "adapters"
    for name in ADAPTERS:
        (d / name).mkdir(parents=True)
        (d / name / "adapter_config.json").write_text("{}")
        rec = {"method": "dalorra", "default_samples": 2, "decision": DECISION}
        (d / name / "dalorra.json").write_text(json.dumps(rec))
        if name in BAD_GENERATION_DECISIONS:
            (d / name / "generation_decision.json").write_text(BAD_GENERATION_DECISIONS[name])
    (d / "corrupt").mkdir()
    (d / "corrupt" / "adapter_config.json").write_text("{}")
    (d / "corrupt" / "dalorra.json").write_text("{not json")
    return d


def make_app(root: Path):  # noqa: ANN201 (FastAPI)
    from server.app import create_app
    from server.settings import Settings

    settings = Settings(
        adapters_dir=adapters_dir(root),
        default_adapter="fake",
        preload=[a for a in ADAPTERS if a != "fake"],
        feedback_key=KEY,
        max_samples=8,
        max_tokens=16,
        default_samples=2,
        max_wait_ms=0,
    )
    return create_app(settings, FuzzBackend())


LOCAL = {"client": ("127.0.0.1", 40000), "base_url": "http://127.0.0.1:8000"}  # loopback: admin routes open


def call(client, route: Route, url: str, body: Any) -> tuple[int, list[str]]:  # noqa: ANN001 (a TestClient)
    """Send one generated request; (status, problems with the response)."""
    if body is None and route.method == "POST":
        body = {}  # adapter load/unload: a JSON body, as the routes ask (cross-site forms cannot send one)
    kw = {} if body is None else {"content": encode(body), "headers": {"content-type": "application/json"}}
    r = client.request(route.method, url, **kw)
    found = problems(route, r.status_code, r.headers.get("content-type", ""), r.text)
    if route.path.endswith("/unload"):  # put the served adapters back, so later cases reach the handlers
        for name in ("fake", "spare"):
            client.post(f"/v1/adapters/{name}/load", json={})
    return r.status_code, found


def client_for(root: Path):  # noqa: ANN201 (a TestClient, to be entered)
    from fastapi.testclient import TestClient

    return TestClient(make_app(root), raise_server_exceptions=False, **LOCAL)


def fuzz_route(client, route: Route, components: dict, cases: int, seed: int, stats: dict) -> None:  # noqa: ANN001
    """Send `cases` generated requests to one route, counting statuses and problems into `stats`."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    @fixed_seed(seed)
    @settings(
        max_examples=cases,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests_for(route, components))
    def one(req: tuple[str, Any]) -> None:
        url, body = req
        status, found = call(client, route, url, body)
        stats["cases"] += 1
        stats["statuses"][str(status)] = stats["statuses"].get(str(status), 0) + 1
        stats["status_5xx"] += status >= 500
        stats["invalid_json"] += any(not f.startswith("status") for f in found)
        shown = encode(body).decode()[:400] if body is not None else None
        case = {"url": url[:200], "body": shown, "problems": found}
        if found and len(stats["failures"]) < 10 and case not in stats["failures"]:
            stats["failures"].append(case)

    one()


# ---- the long run --------------------------------------------------------------------------------------
def run(cases: int, seed: int) -> dict:
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, client_for(Path(tmp)) as c:
        components = c.app.openapi()["components"]["schemas"]
        for route in routes(c.app.openapi()):
            stats = {"cases": 0, "status_5xx": 0, "invalid_json": 0, "statuses": {}, "failures": []}
            out[route.key] = stats

            fuzz_route(c, route, components, cases, seed, stats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=400, help="generated requests per route")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = time.perf_counter()
    res = run(a.cases, a.seed)
    from bench.common import write

    total = {k: sum(v[k] for v in res.values()) for k in ("cases", "status_5xx", "invalid_json")}
    doc = {
        "cases_per_route": a.cases,
        "seed": a.seed,
        "seconds": round(time.perf_counter() - t, 1),
        "total": total,
        "fuzz": res,
    }
    md = [
        "# Fuzzing every route (bench/fuzz.py)",
        "",
        f"{total['cases']} requests, {a.cases} per route asked for, seed {a.seed}.",
        "",
        "| route | cases | status ≥ 500 | invalid JSON / SSE | statuses |",
        "|---|---|---|---|---|",
    ]
    for k, v in res.items():
        md.append(
            f"| `{k}` | {v['cases']} | {v['status_5xx']} | {v['invalid_json']} | {', '.join(f'{s}: {n}' for s, n in sorted(v['statuses'].items()))} |"
        )
    write("fuzz", doc, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
