"""A real uvicorn server process on bench/fuzz.py's fake backend: no model, ready in seconds (loopback tests of
clients such as LangChain, and of what open streams see at shutdown).

    python -m tests.fake_server PORT ROOT GRACE_S [TOKEN_S]

The app is `dalorra serve`'s (create_app, the same uvicorn settings but a short graceful-shutdown period). With
TOKEN_S > 0 generation emits one token every TOKEN_S seconds until cancelled or max_tokens (a stream stays open
as long as a test needs); with 0, the fake backend's own quick generation with its uncertainty pass.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench import fuzz
from bench.loopback import free_port

REPO = Path(__file__).resolve().parents[1]


class SlowBackend(fuzz.FuzzBackend):
    def __init__(self, token_s: float):
        super().__init__()
        self.token_s = token_s

    def generate(self, request, on_token=None, cancelled=None, gate=None):  # noqa: ANN001, ANN201
        import contextlib

        from adapters.generation import GeneratedChoice, GenerateResult

        turn = gate if gate is not None else (lambda rows: contextlib.nullcontext())
        pieces: list[str] = []
        for _ in range(request.max_tokens):
            if cancelled is not None and cancelled():
                break
            with turn(1):
                time.sleep(self.token_s)
            pieces.append(" x")
            if on_token is not None:
                on_token(0, " x", None)
        finish = "cancelled" if cancelled is not None and cancelled() else "length"
        choice = GeneratedChoice("".join(pieces), finish, list(range(len(pieces))), pieces)
        return GenerateResult(3, [choice], samples=0)


@contextmanager
def running(root: Path, grace_s: float = 1.0, token_s: float = 0.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the server process on a free loopback port, wait until ready; yield (url, process); kill it after.
    Its log is root/server.log."""
    port = free_port()
    log = open(root / "server.log", "w")
    args = [sys.executable, "-m", "tests.fake_server", str(port), str(root), str(grace_s), str(token_s)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 120
        while True:
            if proc.poll() is not None or time.time() > end:
                raise RuntimeError(
                    f"the fake server did not start: {(root / 'server.log').read_text()[-2000:]}"
                )
            try:
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


def main() -> None:
    import uvicorn

    from server.app import create_app
    from server.guards import head_timeout_protocol
    from server.settings import Settings

    port, root, grace = int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    token_s = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    backend = SlowBackend(token_s) if token_s > 0 else fuzz.FuzzBackend()
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
        create_app(settings, backend),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=grace,
        http=head_timeout_protocol(settings.head_timeout_s),
    )


if __name__ == "__main__":
    main()
