"""One error type for every failure the API reports; app.py maps it to {"error": {"type", "message"}}."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}
