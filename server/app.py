"""FastAPI glue: create_app(settings) builds the app; routes only translate HTTP to Service calls."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.basemodel import resolve_dtype

from . import kserve
from .backend import Backend
from .disconnect import until_disconnected
from .errors import ApiError
from .guards import RequestGuard, host_name
from .headers import uncertainty_headers
from .kserve import router as kserve_router
from .metrics import Metrics
from .openai_api import router as openai_router
from .protocol import (
    AdapterInfo,
    AdapterList,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    PredictItem,
    PredictResponse,
)
from .registry import Registry
from .service import Service
from .settings import Settings

log = logging.getLogger("dalorra.app")
VERSION = "0.1.0"  # pyproject.toml's version; also the OpenAPI document's
STATIC = Path(__file__).parent / "static"
ERRORS = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    413: {"model": ErrorResponse},
    415: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    429: {"model": ErrorResponse},
    500: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
    504: {"model": ErrorResponse},
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _service(request: Request) -> Service:
    return request.app.state.service


def _registry(request: Request) -> Registry:
    return request.app.state.service.registry


Svc = Annotated[Service, Depends(_service)]
Adapters = Annotated[Registry, Depends(_registry)]


def _error(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def make_backend(settings: Settings) -> Backend:
    """The configured backend; torch and vllm are imported here, never by routes, the batcher or the interface."""
    if settings.backend == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(settings)
    from .hf_backend import HFBackend

    return HFBackend(settings)


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    dtype = (
        settings.vllm_dtype if settings.backend == "vllm" else resolve_dtype(settings.dtype, settings.device)
    )
    metrics.build_info.labels(VERSION, settings.backend, dtype).set(1)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        be = backend or make_backend(settings)
        app.state.service = Service(settings, be, metrics)
        await app.state.service.start()
        try:
            yield
        finally:  # SIGTERM: readiness false, no new work, in-flight finishes, then exit
            await app.state.service.stop()

    app = FastAPI(
        title="dalorra",
        version=VERSION,
        lifespan=lifespan,
        description="Calibrated multiple-choice answers with epistemic uncertainty (DALorRA).",
    )

    def _check_token(request: Request, expected: str | None) -> None:
        if not expected:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), expected.encode()):  # constant time; never logged
            raise ApiError(
                401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    def user(request: Request) -> None:
        _check_token(request, settings.api_token)

    def admin(request: Request) -> None:
        """Loading and unloading change what every user gets. With a token set, the token decides. Without
        one, only a client on loopback that also addresses the server by a loopback name (a DNS-rebound
        page has a foreign Host) may call them. A JSON content type keeps cross-site HTML forms out."""
        expected = settings.admin_token or settings.api_token
        if expected:
            _check_token(request, expected)
        elif not (
            _loopback(request.client.host if request.client else None)
            and host_name(request.headers.get("host", "")) in LOOPBACK_NAMES
        ):
            raise ApiError(
                403,
                "admin_forbidden",
                "adapter management needs DALORRA_ADMIN_TOKEN (Authorization: "
                "Bearer ...) unless called on loopback (127.0.0.1/localhost)",
            )
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(
                415,
                "unsupported_media_type",
                "adapter management needs Content-Type: application/json (send {} as the body)",
            )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.type, exc.message, exc.headers)

    def _count_refused(path: str, status: int) -> None:
        """/predict and KServe inference refusals that never reach the service still count in
        dalorra_requests_total, and /feedback's in dalorra_feedback_total."""
        if path == "/predict":
            metrics.requests.labels("unknown", "rejected" if status == 429 else "invalid").inc()
        elif path == "/feedback":
            metrics.feedback.labels("invalid" if status == 422 else "rejected").inc()
        kserve.count_refused(metrics, path, status)  # /v2/models/{m}[/versions/{v}]/infer only

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        _count_refused(request.url.path, 422)
        if request.url.path.startswith("/v2"):  # the Open Inference Protocol's shape: 400, {"error": "..."}
            return kserve.validation_error(errs)
        bad_json = [e for e in errs if e.get("type") == "json_invalid"]
        if bad_json:
            e = bad_json[0]
            where = e.get("loc", (None, None))[-1]
            return _error(
                400,
                "malformed_json",
                f"the body is not valid JSON: {(e.get('ctx') or {}).get('error', '')} at character {where}",
            )
        # A body that is one object is reported against the one-item form only, a list against the list form.
        branch = "list[" if isinstance(exc.body, list) else "PredictItem"
        mine = [
            e
            for e in errs
            if not (
                len(e.get("loc", ())) > 1
                and isinstance(e["loc"][1], str)
                and ("PredictItem" in e["loc"][1])
                and not e["loc"][1].startswith(branch)
            )
        ]
        errs = mine or errs

        def where(loc: Sequence[int | str]) -> str:
            return ".".join(
                str(x) for x in loc if x != "body" and not (isinstance(x, str) and "PredictItem" in x)
            )

        msg = "; ".join(f"{where(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errs[:5])
        return _error(422, "invalid_request", msg or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith("/v2"):  # {"error": "..."}: an object there breaks KServe clients
            return kserve.http_error(request, exc.status_code, str(exc.detail), exc.headers)
        return _error(exc.status_code, "http_error", str(exc.detail), exc.headers)  # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        _count_refused(request.url.path, 500)
        return _error(500, "internal_error", "the server failed on this request; it has been logged")

    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        allowed_hosts=settings.allowed_hosts,
        on_reject=_count_refused,
    )

    @app.post(
        "/predict",
        response_model=PredictResponse | list[PredictResponse],
        responses=ERRORS,
        dependencies=[Depends(user)],
    )
    async def predict(
        body: PredictItem | list[PredictItem], svc: Svc, request: Request, response: Response
    ) -> PredictResponse | list[PredictResponse]:
        """One item → one response; a list → a list, in order. A client that disconnects stops its work.
        A single item's uncertainty is also in x-dalorra-* headers (server/headers.py)."""
        if isinstance(body, list):
            return await until_disconnected(request, svc.predict(body))
        pr = (await until_disconnected(request, svc.predict([body])))[0]
        response.headers.update(uncertainty_headers([pr.model_dump()]))
        return pr

    @app.post("/feedback", response_model=FeedbackResponse, responses=ERRORS, dependencies=[Depends(user)])
    async def feedback(body: FeedbackRequest, svc: Svc) -> FeedbackResponse:
        """The true label of an earlier prediction (by its receipt); feeds the calibration counters."""
        return svc.feedback(body)

    @app.get("/v1/adapters", response_model=AdapterList)
    async def list_adapters(reg: Adapters) -> AdapterList:
        return AdapterList(
            default=settings.default_adapter, adapters=[reg.describe(n) for n in reg.available()]
        )

    @app.get("/v1/adapters/{name}", response_model=AdapterInfo, responses=ERRORS)
    async def describe_adapter(name: str, reg: Adapters) -> AdapterInfo:
        if name not in reg:
            reg.path(name)  # 404 / 422 when it does not exist at all
        return reg.describe(name)

    @app.post(
        "/v1/adapters/{name}/load",
        response_model=AdapterInfo,
        responses=ERRORS,
        dependencies=[Depends(admin)],
    )
    async def load_adapter(name: str, reg: Adapters) -> AdapterInfo:
        return (await reg.load(name)).info()

    @app.post(
        "/v1/adapters/{name}/unload",
        response_model=AdapterInfo,
        responses=ERRORS,
        dependencies=[Depends(admin)],
    )
    async def unload_adapter(name: str, reg: Adapters) -> AdapterInfo:
        await reg.unload(name)
        return reg.describe(name)

    @app.get("/health/live", response_model=None)
    @app.get("/v2/health/live", response_model=None)
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/health/ready", response_model=None, responses={503: {"model": ErrorResponse}})
    @app.get("/v2/health/ready", response_model=None, responses={503: {"model": ErrorResponse}})
    async def ready(svc: Svc) -> JSONResponse | dict[str, bool]:
        if not svc.ready():
            return _error(503, "not_ready", "model or adapter not loaded, or draining", {"Retry-After": "5"})
        return {"ready": True}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    # OpenAI-compatible routes and KServe v2 inference (server/openai_api.py, server/kserve.py)
    app.include_router(openai_router(), dependencies=[Depends(user)])
    app.include_router(kserve_router(), dependencies=[Depends(user)])

    app.state.settings, app.state.metrics = settings, metrics
    return app
