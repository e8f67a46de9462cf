"""PacSpace's published rules for an emitted delta, as a pure check.

Used by the sandbox (which must refuse what PacSpace refuses) and by the outbox
(which must refuse it before anything is sent).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

CUSTOMER_ID = re.compile(r"[A-Za-z0-9_\-.:]{1,128}")
DELTA_LIMIT = Decimal(1_000_000_000)
REASON_MAX = 500
BATCH_MAX = 100


@dataclass(frozen=True)
class FieldError:
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


def delta_errors(item: Any, prefix: str = "") -> list[FieldError]:
    """Every rule `item` (one parsed delta request, numbers as Decimal) breaks."""
    if not isinstance(item, dict):
        return [FieldError(prefix.rstrip(".") or "body", "must be a JSON object")]
    errors = []
    customer_id = item.get("customerId")
    if customer_id is None:
        errors.append(FieldError(f"{prefix}customerId", "is required"))
    elif not isinstance(customer_id, str) or not CUSTOMER_ID.fullmatch(customer_id):
        errors.append(
            FieldError(f"{prefix}customerId", "must be 1 to 128 letters, digits, '_', '-', '.' or ':'")
        )
    amount = item.get("delta")
    if amount is None:
        errors.append(FieldError(f"{prefix}delta", "is required"))
    elif isinstance(amount, bool) or not isinstance(amount, (int, Decimal)):
        errors.append(FieldError(f"{prefix}delta", "must be a number"))
    else:
        value = Decimal(amount)
        if not value.is_finite():
            errors.append(FieldError(f"{prefix}delta", "must be finite"))
        elif value.is_zero():
            errors.append(FieldError(f"{prefix}delta", "must not be zero"))
        elif abs(value) > DELTA_LIMIT:
            errors.append(FieldError(f"{prefix}delta", "must be between -1000000000 and 1000000000"))
    reason = item.get("reason")
    if reason is None or reason == "":
        errors.append(FieldError(f"{prefix}reason", "is required"))
    elif not isinstance(reason, str):
        errors.append(FieldError(f"{prefix}reason", "must be a string"))
    elif len(reason) > REASON_MAX:
        errors.append(FieldError(f"{prefix}reason", f"must be at most {REASON_MAX} characters"))
    if "referenceId" in item and item["referenceId"] is not None and not isinstance(item["referenceId"], str):
        errors.append(FieldError(f"{prefix}referenceId", "must be a string"))
    if "metadata" in item and item["metadata"] is not None and not isinstance(item["metadata"], dict):
        errors.append(FieldError(f"{prefix}metadata", "must be an object"))
    return errors


def batch_shape_error(body: Any) -> FieldError | None:
    """The error of a batch body whose `deltas` is not a list of 1 to 100 items."""
    deltas = body.get("deltas") if isinstance(body, dict) else None
    if not isinstance(deltas, list):
        return FieldError("deltas", "is required and must be an array")
    if not 1 <= len(deltas) <= BATCH_MAX:
        return FieldError("deltas", f"must hold 1 to {BATCH_MAX} deltas, not {len(deltas)}")
    return None
