"""`dalorra serve`: uvicorn on the embedded default model and adapter unless told otherwise."""

from __future__ import annotations

import argparse
import os


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="start the HTTP server (settings also from DALORRA_* env vars)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default=None, help="bind address (DALORRA_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (DALORRA_PORT, default 8000)")
    p.add_argument("--adapters-dir", default=None, help="directory adapters load from by name")
    p.add_argument("--adapter", default=None, help="default adapter name (DALORRA_DEFAULT_ADAPTER)")
    p.add_argument("--base-model", default=None, help="HF id or directory (default: embedded SmolLM2)")
    p.add_argument(
        "--backend",
        choices=["hf", "vllm"],
        default=None,
        help="scoring backend: hf (transformers, CPU/GPU) or vllm (mask bank; DALORRA_VLLM_* settings)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default=None,
        help="HF backend precision of the base model (DALORRA_DTYPE, default auto: bf16 on CUDA and on CPUs "
        "with AVX512-BF16/AMX, else float32)",
    )
    p.add_argument(
        "--adaptive",
        action="store_true",
        default=None,
        help="adaptive sampling for every request (DALORRA_ADAPTIVE; requests may override)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="HF backend: torch.compile + warm-up at adapter load; ready only after it (DALORRA_COMPILE)",
    )
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    p.set_defaults(func=_serve)


def _serve(a: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .guards import head_timeout_protocol
    from .settings import Settings

    for key, val in (
        ("HOST", a.host),
        ("PORT", a.port),
        ("ADAPTERS_DIR", a.adapters_dir),
        ("DEFAULT_ADAPTER", a.adapter),
        ("BASE_MODEL", a.base_model),
        ("BACKEND", a.backend),
        ("DTYPE", a.dtype),
        ("ADAPTIVE", a.adaptive),
        ("COMPILE", a.compile),
    ):
        if val is not None:
            os.environ[f"DALORRA_{key}"] = str(val)
    settings = Settings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=a.log_level,
        timeout_graceful_shutdown=30,
        http=head_timeout_protocol(settings.head_timeout_s),
    )
    return 0
