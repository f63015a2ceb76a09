"""A real uvicorn server process whose generations are slow: tests of what open streams see at shutdown.

    python -m tests.slow_server PORT ROOT GRACE_S

The app is `dalorra serve`'s (create_app, the same uvicorn settings but a short graceful-shutdown period) on
bench/fuzz.py's fake backend, whose generate here emits one token every TOKEN_S until cancelled or max_tokens:
a stream stays open as long as a test needs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench import fuzz

TOKEN_S = 0.2


class SlowBackend(fuzz.FuzzBackend):
    def generate(self, request, on_token=None, cancelled=None, gate=None):  # noqa: ANN001, ANN201
        import contextlib

        from adapters.generation import GeneratedChoice, GenerateResult

        turn = gate if gate is not None else (lambda rows: contextlib.nullcontext())
        pieces: list[str] = []
        for _ in range(request.max_tokens):
            if cancelled is not None and cancelled():
                break
            with turn(1):
                time.sleep(TOKEN_S)
            pieces.append(" x")
            if on_token is not None:
                on_token(0, " x", None)
        finish = "cancelled" if cancelled is not None and cancelled() else "length"
        choice = GeneratedChoice("".join(pieces), finish, list(range(len(pieces))), pieces)
        return GenerateResult(3, [choice], samples=0)


def main() -> None:
    import uvicorn

    from server.app import create_app
    from server.guards import head_timeout_protocol
    from server.settings import Settings

    port, root, grace = int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    settings = Settings(
        adapters_dir=fuzz.adapters_dir(root),
        default_adapter="fake",
        feedback_key=fuzz.KEY,
        max_tokens=1000,
        default_samples=1,
        max_wait_ms=0,
        port=port,
    )
    uvicorn.run(
        create_app(settings, SlowBackend()),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=grace,
        http=head_timeout_protocol(settings.head_timeout_s),
    )


if __name__ == "__main__":
    main()
