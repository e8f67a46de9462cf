"""Signing deliveries as PacSpace does (UPSTREAM.md), written independently of our verifier."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence


def signature_headers(body: bytes, secrets: Sequence[str], timestamp: int) -> dict[str, str]:
    """Headers for one delivery; with two secrets (a rotation) both values, current first."""
    stamp = str(timestamp)
    values = [
        "v1=" + hmac.new(secret.encode("utf-8"), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        for secret in secrets
    ]
    return {
        "X-PacSpace-Signature": ",".join(values),
        "X-PacSpace-Timestamp": stamp,
        "Content-Type": "application/json",
        "User-Agent": "pacspace-sandbox",
    }
