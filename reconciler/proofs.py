"""PacSpace's proof hashes: item leaves, Merkle roots, one versioned choice.

The specification (UPSTREAM.md): leaf = keccak256("pacspace:item:v1:" + canonical
JSON of the item: keys sorted at every level, no whitespace); node =
keccak256("pacspace:node:v1:" + left + right); leaves paired left to right in
insertion order; an odd node at any level is paired with itself; an empty batch
is 32 zero bytes; a single item's root is its leaf hash. keccak256 is the
original Keccak (padding 0x01), not SHA3-256.

Two details are not published; `PROOF_VERSION` names our choice:
  * a node joins the two children's raw 32-byte digests (not their hex text);
  * an item's canonical JSON holds `anchorId`, `index` (its position in the
    submission), `customerId`, `delta`, `reason`, and `referenceId` and
    `metadata` when present. Numbers are written in plain decimal notation with
    no exponent and no trailing zeros (-42.50 is -42.5).
The sandbox computes its proofs with these same functions, so a sandbox receipt
verifies here and a corrupted one does not. A root that cannot be recomputed is
"unverifiable" (`ProofUnverifiable`), never a crash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from Crypto.Hash import keccak

from storage import jsonio

PROOF_VERSION = "pacspace-merkle-v1/raw-digests/item-fields-v1"
ITEM_PREFIX = b"pacspace:item:v1:"
NODE_PREFIX = b"pacspace:node:v1:"
EMPTY_ROOT = "0x" + "00" * 32


class ProofUnverifiable(ValueError):
    """A hash or item we cannot recompute a proof from; the message names it."""


def keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


def canonical_json(value: Any) -> bytes:
    """Keys sorted at every level, no whitespace, numbers in plain decimal, UTF-8."""
    try:
        return jsonio.dumps_bytes(value, canonical=True)
    except (ValueError, TypeError) as exc:
        raise ProofUnverifiable(f"no canonical JSON form: {exc}") from None


def proof_item(
    *,
    anchor_id: str,
    index: int,
    customer_id: str,
    delta: Decimal,
    reason: str,
    reference_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fields of one item that its leaf hash covers (see `PROOF_VERSION`)."""
    item: dict[str, Any] = {
        "anchorId": anchor_id,
        "index": index,
        "customerId": customer_id,
        "delta": delta,
        "reason": reason,
    }
    if reference_id is not None:
        item["referenceId"] = reference_id
    if metadata is not None:
        item["metadata"] = dict(metadata)
    return item


def item_hash(item: Mapping[str, Any]) -> str:
    return "0x" + keccak256(ITEM_PREFIX + canonical_json(item)).hex()


def merkle_root(item_hashes: Sequence[str]) -> str:
    """The root over leaf hashes in insertion order; `ProofUnverifiable` for a malformed hash."""
    level = [_digest(h) for h in item_hashes]
    if not level:
        return EMPTY_ROOT
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])  # an odd node is paired with itself
        level = [keccak256(NODE_PREFIX + level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return "0x" + level[0].hex()


def _digest(text: str) -> bytes:
    if not isinstance(text, str) or not text.lower().startswith("0x") or len(text) != 66:
        raise ProofUnverifiable(f"{str(text)[:80]!r} is not a 32-byte hex hash (0x + 64 hex digits)")
    try:
        return bytes.fromhex(text[2:])
    except ValueError:
        raise ProofUnverifiable(f"{text[:80]!r} is not hexadecimal") from None
