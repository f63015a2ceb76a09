"""Start real `dalorra serve` processes on loopback: the one helper for the integration tests and the benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, adapters_dir: Path, adapter: str, log_path: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = {
            **os.environ,
            "DALORRA_ADAPTERS_DIR": str(adapters_dir),
            "DALORRA_DEFAULT_ADAPTER": adapter,
            "DALORRA_PORT": str(self.port),
            "DALORRA_FEEDBACK_KEY": "test-key-123456",
            **env,
        }
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dalorra", "serve", "--log-level", "warning"],
            env=e,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 240) -> ServerProcess:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s; see {self.log.name}")

    def metric(self, name: str, labels: dict | None = None) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        total = 0.0
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, val = line.rpartition(" ")
            if head.split("{")[0] != name:
                continue
            if labels and not all(f'{k}="{v}"' in head for k, v in labels.items()):
                continue
            total += float(val)
        return total

    def stop(self, sig=None) -> int:
        if self.proc.poll() is None:
            self.proc.terminate() if sig is None else self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        return self.proc.returncode
