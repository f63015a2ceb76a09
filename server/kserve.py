"""KServe v2 / Open Inference Protocol (HTTP/REST), as tritonclient speaks it with its defaults.

POST /v2/models/{adapter}[/versions/1]/infer maps a batch of B questions onto /predict's path:
  inputs   question BYTES [B]; choices BYTES [B, K] (a row with fewer choices ends in "" padding);
           context BYTES [B] (optional; "" for none). Request parameters: samples, seed.
  outputs  answer BYTES [B], answer_index INT64 [B], probabilities FP64 [B, K] (0 for padding), confidence,
           entropy, entropy_norm, aleatoric, epistemic, epistemic_norm FP64 [B], decision BYTES [B],
           abstain_reason BYTES [B] ("" when answering). `outputs` in the request selects a subset.

The body is read here, not by FastAPI, because the protocol's clients send what FastAPI would refuse:
- no Content-Type (tritonclient's `infer`), or application/octet-stream;
- the binary tensor data extension (tritonclient's default): an `Inference-Header-Content-Length` header gives
  the length of the JSON header; the rest of the body is the tensors whose `parameters.binary_data_size` says
  how many bytes each takes, in input order. BYTES elements are a little-endian uint32 length, then the bytes
  (UTF-8 here). Outputs come back binary when requested (`binary_data` on an output, else the request's
  `binary_data_output`), after the JSON header, in output order, with the same header;
- a gzip or deflate `Content-Encoding` (tritonclient's request_compression_algorithm), and Accept-Encoding.
Tensor data in JSON may be flat (row-major) or nested rows, as the protocol allows.

Versions: a model is an adapter by name, and it has one version, "1": the adapter as loaded now (a reload
replaces it in place, as it does for /predict). /versions/1/... answers as the route without a version; any other
version is a 404. Responses carry "model_version": "1".

Errors on every /v2 path are {"error": "<message>"}: 400 for a bad request (a FastAPI validation error included),
404 for an unknown model, version or route, 413/415/429/503/504 as /predict. A refused inference is counted in
dalorra_requests_total with /predict's outcome labels; app.py's exception handlers delegate /v2 paths here.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import struct
import zlib
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from .disconnect import until_disconnected
from .errors import ApiError
from .metrics import Metrics
from .protocol import PredictItem, PredictResponse
from .service import OUTCOMES, not_unicode

log = logging.getLogger("dalorra.kserve")
VERSION = "1"  # the one version of every model: the adapter as loaded now
HEADER_LENGTH = "Inference-Header-Content-Length"
INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
INPUTS = [
    {"name": "question", "datatype": "BYTES", "shape": [-1]},
    {"name": "choices", "datatype": "BYTES", "shape": [-1, -1]},
    {"name": "context", "datatype": "BYTES", "shape": [-1], "parameters": {"optional": True}},
]
RANKS = {"question": 1, "choices": 2, "context": 1}
SCALARS = ("confidence", "entropy", "entropy_norm", "aleatoric", "epistemic", "epistemic_norm")
OUTPUTS = (
    [
        {"name": "answer", "datatype": "BYTES", "shape": [-1]},
        {"name": "answer_index", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP64", "shape": [-1, -1]},
    ]
    + [{"name": n, "datatype": "FP64", "shape": [-1]} for n in SCALARS]
    # the conformal unfamiliarity p-value; −1 where the adapter stores no calibration reference (a tensor has no null)
    + [{"name": "unfamiliarity", "datatype": "FP64", "shape": [-1]}]
    + [
        {"name": "decision", "datatype": "BYTES", "shape": [-1]},
        {"name": "abstain_reason", "datatype": "BYTES", "shape": [-1]},
    ]
)
DATATYPES = {o["name"]: o["datatype"] for o in OUTPUTS}


# ---- the request's JSON header (types only; the handler checks the meaning) ---------------------------------
Dim = Annotated[int, Field(strict=True, ge=0)]


class TensorIn(BaseModel):
    name: str
    shape: list[Dim]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="Absent when parameters.binary_data_size is given.")


class OutputIn(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferBody(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorIn] = Field(..., min_length=1)
    outputs: list[OutputIn] | None = None


def _inlined(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs inlined (the OpenAPI document then needs no extra components)."""
    defs = schema.pop("$defs", {})

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "$ref" in x:
                return walk(defs[x["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in x.items()}
        return [walk(v) for v in x] if isinstance(x, list) else x

    return walk(schema)


INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined(InferBody.model_json_schema())},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": f"The JSON header ({HEADER_LENGTH} bytes), then the binary tensor data",
                }
            },
        },
    }
}


# ---- errors and counting ------------------------------------------------------------------------------------
def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The protocol's error body. A validation error (422 elsewhere in the API) is a 400 here. A message that
    echoes a lone surrogate shows it escaped, so the body can always be encoded."""
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": text}, status_code=400 if status == 422 else status, headers=headers)


def count_refused(metrics: Metrics, path: str, status: int, adapter: str = "unknown") -> None:
    """A refused inference request counts in dalorra_requests_total as /predict's do (one per request: its
    items are unknown). Other /v2 routes answer metadata and health, which are not predictions."""
    if INFER_PATH.match(path):
        outcome = OUTCOMES.get(status, "error" if status >= 500 else "invalid")
        metrics.requests.labels(adapter, outcome).inc()


def http_error(request: Request, status: int, detail: str, headers: dict | None) -> JSONResponse:
    """app.py's HTTPException handler for /v2 paths: an unknown route is a 404 that says which; 405 keeps Allow."""
    count_refused(request.app.state.metrics, request.url.path, status)
    if status == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path} (see GET /v2 and GET /v2/models/{{model}})"
    return error(status, detail, headers)


def validation_error(errors: list[dict]) -> JSONResponse:
    """app.py's RequestValidationError handler for /v2 paths (it counts the refusal): a 400 with one string."""
    return error(400, _describe(errors) or "invalid request")


def _describe(errors: list[dict]) -> str:
    def where(loc: Any) -> str:
        return ".".join(str(x) for x in loc if x != "body") or "body"

    return "; ".join(f"{where(e.get('loc', ()))}: {e.get('msg')}" for e in errors[:3])


def _bad(message: str, status: int = 400) -> ApiError:
    return ApiError(status, "invalid_request", message)


# ---- reading a request ----------------------------------------------------------------------------------------
async def read_body(request: Request) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of an inference request."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("", "application/json", "application/octet-stream") and not ctype.endswith("+json"):
        raise _bad(
            f"Content-Type {ctype!r}: send application/json, application/octet-stream (binary tensor data) "
            "or no Content-Type",
            415,
        )
    raw = await request.body()
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "deflate"):
        raw = _inflate(raw, encoding, request.app.state.settings.max_body_bytes)
    elif encoding not in ("", "identity"):
        raise _bad(f"Content-Encoding {encoding!r}: send gzip, deflate or none", 415)
    size = request.headers.get(HEADER_LENGTH)
    if size is None:
        return raw, b""
    if not re.fullmatch(r"[0-9]{1,15}", size.strip()):
        raise _bad(f"{HEADER_LENGTH} must be a byte count, got {size[:40]!r}")
    n = int(size)
    if n == 0:
        raise _bad(
            f"{HEADER_LENGTH}: 0 (a raw binary request) needs a model with one input; this one takes "
            "question and choices: send the JSON header first"
        )
    if n > len(raw):
        raise _bad(f"{HEADER_LENGTH} is {n}, but the body has {len(raw)} bytes")
    return raw[:n], raw[n:]


def _inflate(raw: bytes, encoding: str, limit: int) -> bytes:
    """A compressed body, decompressed to at most `limit` bytes (the body limit holds after decompression)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise _bad(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise _bad(f"the decompressed body exceeds {limit} bytes", 413)
    if not d.eof:
        raise _bad(f"the {encoding} body is truncated")
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _surrogate_at(value: Any) -> str | None:
    """Where the first string (or key) holding a lone surrogate is, as a path, or None. Such a string is a valid
    JSON escape but not text: it can be neither tokenized nor echoed back in a response."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not_unicode(v):
                return path or "body"
        elif isinstance(v, dict):
            for k, x in v.items():
                if not_unicode(k):
                    return f"{path}.{k!a}" if path else ascii(k)
                stack.append((f"{path}.{k}" if path else k, x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
    return None


def parse_header(header: bytes) -> InferBody:
    try:
        obj = json.loads(header.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise _bad(f"the JSON header is not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise _bad(f"the body is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except ValueError as exc:  # NaN / Infinity
        raise _bad(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _bad("the JSON body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise _bad("the body must be a JSON object (the inference request)")
    where = _surrogate_at(obj)
    if where is not None:
        raise _bad(
            f"{where} contains a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text: "
            "send valid UTF-8"
        )
    try:
        return InferBody.model_validate(obj)
    except ValidationError as exc:
        raise _bad(_describe(exc.errors(include_url=False))) from None


def _binary_chunks(body: InferBody, binary: bytes) -> dict[str, bytes]:
    """Each binary input's bytes, cut from the data after the JSON header in input order."""
    chunks, pos = {}, 0
    for t in body.inputs:
        p = t.parameters or {}
        if "shared_memory_region" in p:
            raise _bad(f"input {t.name!r}: shared memory is not supported; send the data in the body")
        size = p.get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"input {t.name!r}: binary_data_size must be a byte count, got {size!r}")
        if t.data is not None:
            raise _bad(f"input {t.name!r}: give either data or binary_data_size, not both")
        if pos + size > len(binary):
            raise _bad(
                f"input {t.name!r}: binary_data_size {size}, but only {len(binary) - pos} bytes of binary "
                f"data are left after the JSON header ({HEADER_LENGTH})"
            )
        chunks[t.name] = binary[pos : pos + size]
        pos += size
    if pos != len(binary):
        raise _bad(
            f"{len(binary)} bytes follow the JSON header, but the inputs' binary_data_size add up to {pos}"
        )
    return chunks


def _unpack_bytes(name: str, chunk: bytes) -> list[str]:
    """BYTES tensor data: per element a little-endian uint32 length, then that many bytes of UTF-8."""
    out, i = [], 0
    while i < len(chunk):
        if i + 4 > len(chunk):
            raise _bad(f"input {name!r}: binary data ends inside the length of element {len(out)}")
        (n,) = struct.unpack_from("<I", chunk, i)
        i += 4
        if i + n > len(chunk):
            raise _bad(f"input {name!r}: element {len(out)} is {n} bytes, only {len(chunk) - i} are left")
        try:
            out.append(chunk[i : i + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise _bad(f"input {name!r}: element {len(out)} is not UTF-8 text") from None
        i += n
    return out


def _strings(t: TensorIn, chunk: bytes | None) -> list[str]:
    """A BYTES input's elements, row-major, checked against its shape."""
    rank = RANKS[t.name]
    if t.datatype != "BYTES":
        raise _bad(f"input {t.name!r}: datatype must be BYTES, got {t.datatype!r}")
    if len(t.shape) != rank:
        raise _bad(f"input {t.name!r}: shape must have {rank} dims, got {t.shape}")
    size = math.prod(t.shape)
    if chunk is not None:
        data: list = _unpack_bytes(t.name, chunk)
    elif t.data is None:
        raise _bad(f"input {t.name!r}: no data (give data, or binary_data_size and the bytes after the JSON)")
    else:
        data = t.data
        if any(isinstance(x, list) for x in data):  # nested: exactly shape[0] rows of shape[1]
            if (
                rank != 2
                or len(data) != t.shape[0]
                or not all(isinstance(x, list) and len(x) == t.shape[1] for x in data)
            ):
                raise _bad(f"input {t.name!r}: nested data must be {t.shape[0]} rows as its shape {t.shape}")
            data = [y for x in data for y in x]
    if len(data) != size:
        raise _bad(f"input {t.name!r}: shape {t.shape} holds {size} elements, data has {len(data)}")
    if not all(isinstance(x, str) for x in data):
        raise _bad(f"input {t.name!r}: BYTES elements must be strings")
    return data


def items_from(body: InferBody, binary: bytes, adapter: str) -> list[PredictItem]:
    names = [t.name for t in body.inputs]
    named = {t.name: t for t in body.inputs}
    if len(named) != len(names):
        raise _bad(f"inputs: each name once; got {names}")
    if set(named) - set(RANKS) or "question" not in named or "choices" not in named:
        raise _bad(
            f"inputs: question [B] and choices [B, K] (BYTES), optional context [B]; got {sorted(named)}"
        )
    chunks = _binary_chunks(body, binary)
    qs = _strings(named["question"], chunks.get("question"))
    ch = _strings(named["choices"], chunks.get("choices"))
    B, K = named["choices"].shape
    if len(qs) != B:
        raise _bad(f"question has {len(qs)} rows, choices {B}")
    ctx = _strings(named["context"], chunks.get("context")) if "context" in named else [""] * B
    if len(ctx) != B:
        raise _bad(f"context has {len(ctx)} rows, question {B}")
    p = body.parameters or {}
    items = []
    for b in range(B):
        row = ch[b * K : (b + 1) * K]
        while row and row[-1] == "":
            row.pop()  # trailing "" pads a row with fewer choices
        try:
            items.append(
                PredictItem(
                    question=qs[b],
                    choices=row,
                    context=ctx[b] or None,
                    adapter=adapter,
                    samples=p.get("samples"),
                    seed=p.get("seed"),
                )
            )
        except ValidationError as exc:
            raise _bad(f"row {b}: {_describe(exc.errors(include_url=False))}") from None
    return items


def outputs_wanted(body: InferBody) -> list[tuple[str, bool]]:
    """(output name, binary?) in the order to return them."""
    default = (body.parameters or {}).get("binary_data_output", False)
    if not isinstance(default, bool):
        raise _bad(f"parameters.binary_data_output must be true or false, got {default!r}")
    if not body.outputs:
        return [(o["name"], default) for o in OUTPUTS]
    wanted: list[tuple[str, bool]] = []
    for o in body.outputs:
        if o.name not in DATATYPES:
            raise _bad(f"unknown output {o.name!r}; outputs are {list(DATATYPES)}")
        if any(o.name == w for w, _ in wanted):
            raise _bad(f"output {o.name!r} requested twice")
        p = o.parameters or {}
        for unsupported in ("shared_memory_region", "classification"):
            if unsupported in p:
                raise _bad(f"output {o.name!r}: {unsupported} is not supported")
        binary = p.get("binary_data", default)
        if not isinstance(binary, bool):
            raise _bad(f"output {o.name!r}: binary_data must be true or false, got {binary!r}")
        wanted.append((o.name, binary))
    return wanted


# ---- writing a response -----------------------------------------------------------------------------------------
def _pack(datatype: str, values: list) -> bytes:
    """Binary tensor data, little-endian, row-major (BYTES: uint32 length + UTF-8 per element)."""
    if datatype == "BYTES":
        parts = []
        for v in values:
            b = v.encode("utf-8")
            parts += [struct.pack("<I", len(b)), b]
        return b"".join(parts)
    return np.asarray(values, dtype="<i8" if datatype == "INT64" else "<f8").tobytes()


def _compress(request: Request, body: bytes, headers: dict) -> bytes:
    """gzip or deflate when the client accepts it (tritonclient's response_compression_algorithm)."""
    accepted = {
        part.split(";")[0].strip().lower()
        for part in request.headers.get("accept-encoding", "").split(",")
        if not re.search(r";\s*q=0(\.0*)?\s*$", part)
    }
    headers["Vary"] = "Accept-Encoding"
    if "gzip" in accepted:
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(body)
    if "deflate" in accepted:
        headers["Content-Encoding"] = "deflate"
        return zlib.compress(body)
    return body


def respond(
    request: Request, name: str, rid: str | None, res: list[PredictResponse], wanted: list[tuple[str, bool]]
) -> Response:
    B = len(res)
    K = max((len(x.probabilities) for x in res), default=0)
    values = {
        "answer": [x.answer for x in res],
        "answer_index": [x.answer_index for x in res],
        "probabilities": [p for x in res for p in x.probabilities + [0.0] * (K - len(x.probabilities))],
        "decision": [x.decision for x in res],
        "abstain_reason": [x.abstain_reason or "" for x in res],
        "unfamiliarity": [-1.0 if x.unfamiliarity is None else x.unfamiliarity for x in res],
        **{n: [getattr(x, n) for x in res] for n in SCALARS},
    }
    outputs, blobs = [], []
    for w, binary in wanted:
        out: dict[str, Any] = {
            "name": w,
            "datatype": DATATYPES[w],
            "shape": [B, K] if w == "probabilities" else [B],
        }
        if binary:
            blob = _pack(DATATYPES[w], values[w])
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = values[w]
        outputs.append(out)
    head: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": outputs}
    if rid is not None:
        head["id"] = rid
    header = json.dumps(head, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    headers: dict[str, str] = {}
    if blobs:
        headers[HEADER_LENGTH] = str(len(header))
        media = "application/octet-stream"
    else:
        media = "application/json"
    body = _compress(request, header + b"".join(blobs), headers)
    return Response(body, media_type=media, headers=headers)


# ---- routes -------------------------------------------------------------------------------------------------------
def _model(request: Request, name: str, version: str | None) -> None:
    """404 unless `name` is a loaded adapter and `version` is absent or VERSION."""
    request.app.state.service.registry.get(name)  # ApiError 404: not loaded / unknown, with what to do
    if version is not None and version != VERSION:
        raise ApiError(
            404,
            "unknown_version",
            f"model {name!r} has no version {version!r}; its one version is {VERSION!r}",
        )


async def infer(request: Request, name: str, version: str | None) -> Response:
    svc = request.app.state.service
    metrics = request.app.state.metrics
    path = request.url.path
    try:
        _model(request, name, version)
        header, binary = await read_body(request)
        body = parse_header(header)
        items = items_from(body, binary, name)
        wanted = outputs_wanted(body)
    except ApiError as exc:  # refused before the service saw it: counted here
        count_refused(metrics, path, exc.status, svc.registry.label(name))
        return error(exc.status, exc.message, exc.headers)
    except Exception:  # a bug here, not the caller's fault: this request fails alone, in the protocol's shape
        log.exception("kserve request failed on %s", path)
        count_refused(metrics, path, 500, svc.registry.label(name))
        return error(500, "the server failed on this request; it has been logged")
    try:  # the service counts every outcome from here on
        res = await until_disconnected(request, svc.predict(items))
        return respond(request, name, body.id, res, wanted)
    except ApiError as exc:
        return error(exc.status, exc.message, exc.headers)
    except Exception:
        log.exception("kserve response failed on %s", path)
        return error(500, "the server failed on this request; it has been logged")


def metadata(request: Request, name: str, version: str | None) -> JSONResponse | dict:
    try:
        _model(request, name, version)
    except ApiError as exc:
        return error(exc.status, exc.message, exc.headers)
    return {"name": name, "versions": [VERSION], "platform": "dalorra", "inputs": INPUTS, "outputs": OUTPUTS}


def ready(request: Request, name: str, version: str | None) -> JSONResponse | dict:
    """200 when the adapter is loaded and the server ready; 404 for an unknown model or version; 503 while the
    server starts or drains (tritonclient's is_model_ready reads any non-200 as not ready)."""
    try:
        _model(request, name, version)
    except ApiError as exc:
        return error(exc.status, exc.message, exc.headers)
    if not request.app.state.service.ready():
        return error(
            503, f"model {name!r} is not ready: the server is starting or draining", {"Retry-After": "5"}
        )
    return {"name": name, "ready": True}


def router() -> APIRouter:
    r = APIRouter(tags=["kserve-v2"])

    @r.get("/v2", response_model=None)
    async def server_metadata(request: Request) -> dict:
        return {"name": "dalorra", "version": request.app.version, "extensions": ["binary_tensor_data"]}

    @r.get("/v2/models/{name}", response_model=None)
    async def model_metadata(name: str, request: Request) -> JSONResponse | dict:
        return metadata(request, name, None)

    @r.get("/v2/models/{name}/versions/{version}", response_model=None)
    async def model_version_metadata(name: str, version: str, request: Request) -> JSONResponse | dict:
        return metadata(request, name, version)

    @r.get("/v2/models/{name}/ready", response_model=None)
    async def model_ready(name: str, request: Request) -> JSONResponse | dict:
        return ready(request, name, None)

    @r.get("/v2/models/{name}/versions/{version}/ready", response_model=None)
    async def model_version_ready(name: str, version: str, request: Request) -> JSONResponse | dict:
        return ready(request, name, version)

    @r.post("/v2/models/{name}/infer", response_model=None, openapi_extra=INFER_OPENAPI)
    async def model_infer(name: str, request: Request) -> Response:
        """Inference with named tensors (JSON, or the binary tensor data extension)."""
        return await infer(request, name, None)

    @r.post("/v2/models/{name}/versions/{version}/infer", response_model=None, openapi_extra=INFER_OPENAPI)
    async def model_version_infer(name: str, version: str, request: Request) -> Response:
        return await infer(request, name, version)

    return r
