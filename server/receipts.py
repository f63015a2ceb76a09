"""Signed prediction receipts: any replica with the same key verifies feedback without a shared store.

receipt = base64url(JSON payload) "." base64url(HMAC-SHA256(key, payload))
payload: id, adapter, predicted index, confidence, K, issue time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections import OrderedDict


class ReceiptError(ValueError):
    """Forged, malformed or expired receipt."""


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class Receipts:
    def __init__(self, key: str, ttl_s: float, remember: int = 100_000):
        self.key, self.ttl = key.encode(), ttl_s
        self.seen: OrderedDict[str, None] = OrderedDict()  # ids already counted on this replica (bounded)
        self.remember = remember

    def sign(self, payload: dict) -> str:
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return f"{_b64(body)}.{_b64(hmac.new(self.key, body, hashlib.sha256).digest())}"

    def verify(self, receipt: str) -> dict:
        try:
            body_s, sig_s = receipt.split(".")
            body, sig = _unb64(body_s), _unb64(sig_s)
        except ValueError:
            raise ReceiptError("malformed receipt") from None
        if not hmac.compare_digest(sig, hmac.new(self.key, body, hashlib.sha256).digest()):
            raise ReceiptError("receipt signature does not verify")
        payload = json.loads(body)
        if time.time() - payload["t"] > self.ttl:
            raise ReceiptError("receipt expired")
        return payload

    def first_time(self, rid: str) -> bool:
        """True the first time this replica sees `rid` (repeats count once)."""
        if rid in self.seen:
            return False
        self.seen[rid] = None
        if len(self.seen) > self.remember:
            self.seen.popitem(last=False)
        return True
