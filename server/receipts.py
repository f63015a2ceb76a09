"""Signed prediction receipts: any replica with the same key verifies feedback without a shared store.

receipt = base64url(JSON payload) "." base64url(HMAC-SHA256(key, payload))
payload: id, adapter, predicted index, confidence, K, issue time; checked as a typed Payload after the
signature, so even a validly signed odd payload (made with a leaked key, or by a bug) is a 4xx, never a 500 or
a NaN in the calibration counters. A receipt lives `ttl_s` from its issue time; one dated further in the future
than replicas' clocks can disagree (`max_skew_s`) is refused, else it would never expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections import OrderedDict

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ReceiptError(ValueError):
    """Forged, malformed or expired receipt."""


class ReceiptInvalid(ValueError):
    """A receipt whose signature verifies but whose payload is not one this server issues."""


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: str = Field(min_length=1, max_length=128)
    a: str = Field(min_length=1, max_length=64, description="adapter")
    p: int = Field(ge=0, description="predicted index")
    c: float = Field(ge=0, le=1, allow_inf_nan=False, description="confidence")
    k: int = Field(ge=2, le=26, description="number of choices")
    t: float = Field(allow_inf_nan=False, description="issue time (Unix seconds)")

    @model_validator(mode="after")
    def _index(self) -> Payload:
        if self.p >= self.k:
            raise ValueError(f"predicted index {self.p} is not below K = {self.k}")
        return self


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


MAX_SKEW_S = 300.0  # how far another replica's clock may run ahead of ours


class Receipts:
    def __init__(self, key: str, ttl_s: float, remember: int = 100_000, max_skew_s: float = MAX_SKEW_S):
        self.key, self.ttl, self.skew = key.encode(), ttl_s, max_skew_s
        self.seen: OrderedDict[str, None] = OrderedDict()  # ids already counted on this replica (bounded)
        self.remember = remember

    def sign(self, payload: dict) -> str:
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return f"{_b64(body)}.{_b64(hmac.new(self.key, body, hashlib.sha256).digest())}"

    def verify(self, receipt: str) -> Payload:
        try:
            body_s, sig_s = receipt.split(".")
            body, sig = _unb64(body_s), _unb64(sig_s)
        except ValueError:
            raise ReceiptError("malformed receipt") from None
        if not hmac.compare_digest(sig, hmac.new(self.key, body, hashlib.sha256).digest()):
            raise ReceiptError("receipt signature does not verify")
        try:
            payload = Payload.model_validate_json(body)
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(x) for x in e.get("loc", ())) or "payload"
            raise ReceiptInvalid(f"receipt payload is not valid ({where}: {e.get('msg')})") from None
        age = time.time() - payload.t
        if age < -self.skew:  # issued "later than now": a skewed clock or a forged date, never valid
            raise ReceiptError(f"receipt is dated {-age:.0f} s in the future (more than {self.skew:g} s)")
        if age > self.ttl:
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
