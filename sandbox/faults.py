"""The ways the sandbox misbehaves on purpose, set as `name=value,...` or as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

FRACTIONS = {
    "drop_webhooks": "never deliver a webhook (listed as failed; the retry endpoint re-sends it)",
    "duplicate_webhooks": "deliver a webhook twice",
    "late_webhooks": "hold a webhook back up to late_seconds (so webhooks arrive out of order)",
    "bad_signature": "sign a delivery attempt with a wrong secret",
    "corrupt_webhook_receipt": "put a wrong receiptId/proofHash in the webhook",
    "corrupt_webhook_item_hash": "put a wrong item hash in the webhook",
    "corrupt_status_receipt": "answer a wrong receiptId on the status endpoint",
    "corrupt_status_item_hash": "answer a wrong item hash on the status endpoint",
    "fail_deltas": "fail a delta instead of verifying it (delta.failed)",
    "forget_deltas": "accept a delta, then forget it (404 on lookup, no webhook)",
    "rate_limit": "answer an API request 429 RATE_LIMITED with Retry-After",
    "cadence_limit": "answer an emit 429 CADENCE_LIMIT",
    "unavailable": "answer an API request 503 SERVICE_UNAVAILABLE",
    "insufficient_credits": "answer an emit 402 INSUFFICIENT_CREDITS",
    "contract_not_deployed": "answer an emit 412 CONTRACT_NOT_DEPLOYED",
    "slow": "answer an API request after slow_seconds",
    "reject_batch_items": "fail a valid batch item (ITEM_REJECTED) while the rest of the batch is accepted",
}
AMOUNTS = {
    "late_seconds": "how long a late webhook may be held back",
    "retry_after": "the Retry-After of a 429, in seconds",
    "slow_seconds": "how long a slow answer takes",
}


class FaultError(ValueError):
    """A fault specification that names an unknown fault or a value out of range."""


@dataclass(frozen=True)
class Faults:
    drop_webhooks: float = 0.0
    duplicate_webhooks: float = 0.0
    late_webhooks: float = 0.0
    bad_signature: float = 0.0
    corrupt_webhook_receipt: float = 0.0
    corrupt_webhook_item_hash: float = 0.0
    corrupt_status_receipt: float = 0.0
    corrupt_status_item_hash: float = 0.0
    fail_deltas: float = 0.0
    forget_deltas: float = 0.0
    rate_limit: float = 0.0
    cadence_limit: float = 0.0
    unavailable: float = 0.0
    insufficient_credits: float = 0.0
    contract_not_deployed: float = 0.0
    slow: float = 0.0
    reject_batch_items: float = 0.0
    late_seconds: float = 2.0
    retry_after: float = 1.0
    slow_seconds: float = 1.0

    def merged(self, changes: dict[str, Any]) -> Faults:
        return replace(self, **_checked(changes))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def parse_faults(text: str) -> Faults:
    """`"drop_webhooks=0.2,rate_limit=0.1"` to `Faults`; `FaultError` names what is wrong."""
    changes: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, separator, value = part.partition("=")
        if not separator:
            raise FaultError(f"fault {part!r} needs a value: name=value")
        changes[name.strip()] = value.strip()
    return Faults().merged(changes)


def _checked(changes: dict[str, Any]) -> dict[str, float]:
    known = {f.name for f in fields(Faults)}
    checked = {}
    for name, raw in changes.items():
        if name not in known:
            raise FaultError(f"unknown fault {name!r}; known: {', '.join(sorted(known))}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise FaultError(f"fault {name}={raw!r}: not a number") from None
        if name in FRACTIONS and not 0.0 <= value <= 1.0:
            raise FaultError(f"fault {name}={raw!r}: a fraction from 0 to 1")
        if name in AMOUNTS and not 0.0 <= value <= 3600:
            raise FaultError(f"fault {name}={raw!r}: seconds from 0 to 3600")
        checked[name] = value
    return checked
