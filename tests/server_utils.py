"""The loopback server helper lives in bench/loopback.py (tests and benchmarks share it); tests import it here."""

from bench.loopback import ServerProcess, free_port

__all__ = ["ServerProcess", "free_port"]
