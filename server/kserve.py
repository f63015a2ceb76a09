"""KServe v2 / Open Inference Protocol: server and model metadata, and inference with named tensors.

POST /v2/models/{adapter}/infer maps a batch of B questions onto /predict's path:
  inputs   question BYTES [B]; choices BYTES [B, K] (a row with fewer choices ends in "" padding);
           context BYTES [B] (optional; "" for none). Request parameters: samples, seed.
  outputs  answer BYTES [B], answer_index INT64 [B], probabilities FP64 [B, K] (0 for padding), confidence,
           entropy, entropy_norm, aleatoric, epistemic, epistemic_norm FP64 [B], decision BYTES [B],
           abstain_reason BYTES [B] ("" when answering). `outputs` in the request selects a subset.
Tensor data may be flat (row-major) or nested, as the protocol allows. Errors: {"error": "<message>"}.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .disconnect import until_disconnected
from .errors import ApiError
from .openai_protocol import InferRequest, InferTensor
from .protocol import PredictItem

INPUTS = [
    {"name": "question", "datatype": "BYTES", "shape": [-1]},
    {"name": "choices", "datatype": "BYTES", "shape": [-1, -1]},
    {"name": "context", "datatype": "BYTES", "shape": [-1], "parameters": {"optional": True}},
]
SCALARS = ("confidence", "entropy", "entropy_norm", "aleatoric", "epistemic", "epistemic_norm")
OUTPUTS = (
    [
        {"name": "answer", "datatype": "BYTES", "shape": [-1]},
        {"name": "answer_index", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP64", "shape": [-1, -1]},
    ]
    + [{"name": n, "datatype": "FP64", "shape": [-1]} for n in SCALARS]
    + [
        {"name": "decision", "datatype": "BYTES", "shape": [-1]},
        {"name": "abstain_reason", "datatype": "BYTES", "shape": [-1]},
    ]
)


def _err(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _flat(data: list) -> list:
    out = []
    for x in data:
        out.extend(_flat(x) if isinstance(x, list) else [x])
    return out


def _tensor(t: InferTensor, rank: int) -> list:
    if t.datatype != "BYTES":
        raise ApiError(400, "invalid_request", f"input {t.name!r}: datatype must be BYTES, got {t.datatype}")
    if len(t.shape) != rank or any(d < 0 for d in t.shape):
        raise ApiError(400, "invalid_request", f"input {t.name!r}: shape must have {rank} non-negative dims")
    data = _flat(t.data)
    size = 1
    for d in t.shape:
        size *= d
    if len(data) != size:
        raise ApiError(
            400,
            "invalid_request",
            f"input {t.name!r}: shape {t.shape} holds {size} elements, data has {len(data)}",
        )
    if not all(isinstance(x, str) for x in data):
        raise ApiError(400, "invalid_request", f"input {t.name!r}: BYTES elements must be strings")
    return data


def items_from(body: InferRequest, adapter: str) -> list[PredictItem]:
    named = {t.name: t for t in body.inputs}
    unknown = set(named) - {"question", "choices", "context"}
    if unknown or "question" not in named or "choices" not in named:
        raise ApiError(
            400,
            "invalid_request",
            f"inputs: question [B] and choices [B, K] (BYTES), optional context [B]; got {sorted(named)}",
        )
    qs = _tensor(named["question"], 1)
    ch = _tensor(named["choices"], 2)
    B, K = named["choices"].shape
    if len(qs) != B:
        raise ApiError(400, "invalid_request", f"question has {len(qs)} rows, choices {B}")
    ctx = _tensor(named["context"], 1) if "context" in named else [""] * B
    if len(ctx) != B:
        raise ApiError(400, "invalid_request", f"context has {len(ctx)} rows, question {B}")
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
            e = exc.errors()[0]
            raise ApiError(
                400, "invalid_request", f"row {b}: {'.'.join(map(str, e['loc']))}: {e['msg']}"
            ) from None
    return items


def router() -> APIRouter:
    r = APIRouter(tags=["kserve-v2"])

    @r.get("/v2", response_model=None)
    async def server_metadata(request: Request) -> dict:
        return {"name": "dalorra", "version": request.app.version, "extensions": []}

    @r.get("/v2/models/{name}", response_model=None)
    async def model_metadata(name: str, request: Request) -> JSONResponse | dict:
        svc = request.app.state.service
        if name not in svc.registry:
            return _err(404, f"model {name!r} is not loaded")
        return {"name": name, "versions": [], "platform": "dalorra", "inputs": INPUTS, "outputs": OUTPUTS}

    @r.post("/v2/models/{name}/infer", response_model=None)
    async def infer(name: str, body: InferRequest, request: Request) -> JSONResponse | dict:
        svc = request.app.state.service
        if name not in svc.registry:
            return _err(404, f"model {name!r} is not loaded")
        want = [o.name for o in body.outputs] if body.outputs else [o["name"] for o in OUTPUTS]
        known = {o["name"]: o for o in OUTPUTS}
        if any(w not in known for w in want):
            return _err(
                400, f"unknown outputs {[w for w in want if w not in known]}; see GET /v2/models/{name}"
            )
        try:
            res = await until_disconnected(request, svc.predict(items_from(body, name)))
        except ApiError as exc:
            return _err(exc.status, exc.message, exc.headers)
        B = len(res)
        K = max(len(x.probabilities) for x in res)
        values = {
            "answer": [x.answer for x in res],
            "answer_index": [x.answer_index for x in res],
            "probabilities": [p for x in res for p in x.probabilities + [0.0] * (K - len(x.probabilities))],
            "decision": [x.decision for x in res],
            "abstain_reason": [x.abstain_reason or "" for x in res],
            **{n: [getattr(x, n) for x in res] for n in SCALARS},
        }
        outs = [
            {
                "name": w,
                "datatype": known[w]["datatype"],
                "shape": [B, K] if w == "probabilities" else [B],
                "data": values[w],
            }
            for w in want
        ]
        out = {"model_name": name, "outputs": outs}
        if body.id is not None:
            out["id"] = body.id
        return out

    return r
