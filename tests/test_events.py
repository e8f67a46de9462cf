"""Parsing PacSpace bodies: both envelope shapes, exact amounts, tolerant of odd fields."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

import pytest

from reconciler.claims import ClaimedStatus
from reconciler.errors import InvalidEvent
from reconciler.events import parse_event


def test_sdk_shape_delta_verified() -> None:
    raw = json.dumps(
        {
            "id": "evt_1",
            "event": "delta.verified",
            "tenantId": "ten_1",
            "createdAt": "2026-11-27T10:00:00Z",
            "data": {
                "recordId": "a_1",
                "receiptId": "0xabc",
                "verificationReference": "vr_1",
                "customerId": "cust_1",
                "delta": -42.50,
                "sequenceNumber": "7",
                "referenceId": "inv_1",
                "blockTimestamp": "2026-11-27T10:00:00Z",
                "itemsRoot": "0xabc",
                "itemHashes": ["0x01", "0x02"],
                "txHash": "0xfeed",
            },
        }
    ).encode()
    event = parse_event(raw)
    assert (event.event_id, event.event_type) == ("evt_1", "delta.verified")
    claim = event.claim
    assert claim is not None and claim.status is ClaimedStatus.VERIFIED
    assert (claim.anchor_id, claim.receipt_id, claim.items_root) == ("a_1", "0xabc", "0xabc")
    assert claim.item_hashes == ("0x01", "0x02")
    assert (claim.customer_id, claim.sequence_number, claim.verification_reference, claim.tx_hash) == (
        "cust_1",
        "7",
        "vr_1",
        "0xfeed",
    )


def test_amounts_never_pass_through_binary_floating_point() -> None:
    raw = b'{"id":"e","event":"delta.verified","data":{"recordId":"a","delta":0.1000000000000000055511151231257827}}'
    claim = parse_event(raw).claim
    assert claim is not None and claim.amount == Decimal("0.1000000000000000055511151231257827")
    claim = parse_event(b'{"id":"e","event":"delta.verified","data":{"recordId":"a","delta":-42.50}}').claim
    assert claim is not None and str(claim.amount) == "-42.50"


def test_documentation_shape_with_a_proof_object_and_no_id() -> None:
    raw = json.dumps(
        {
            "event": "delta.verified",
            "timestamp": "2026-11-27T10:00:00Z",
            "data": {
                "anchorId": "a_9",
                "proof": {
                    "proofHash": "0xroot",
                    "contentHash": "0xitem",
                    "itemHashes": ["0xitem", "0xother"],
                    "previousProofHash": "0xprev",
                },
            },
        }
    ).encode()
    event = parse_event(raw)
    assert event.event_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    claim = event.claim
    assert claim is not None
    assert (claim.anchor_id, claim.receipt_id, claim.content_hash, claim.previous_proof_hash) == (
        "a_9",
        "0xroot",
        "0xitem",
        "0xprev",
    )
    assert claim.item_hashes == ("0xitem", "0xother")


def test_delta_failed_carries_its_error() -> None:
    raw = b'{"id":"e2","event":"delta.failed","data":{"recordId":"a","customerId":"c","delta":5,"error":"chain rejected","failedAt":"x"}}'
    claim = parse_event(raw).claim
    assert claim is not None and claim.status is ClaimedStatus.FAILED
    assert (claim.error, claim.amount) == ("chain rejected", Decimal(5))


@pytest.mark.parametrize("event_type", ["record.committed", "record.failed", "something.new"])
def test_other_event_types_carry_no_claim(event_type: str) -> None:
    event = parse_event(json.dumps({"id": "e", "event": event_type, "data": {"x": 1}}).encode())
    assert (event.event_type, event.claim) == (event_type, None)


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": 17, "event": "delta.verified", "data": "not an object"}',
        b'{"event": ["odd"], "data": {"recordId": {"nested": true}, "delta": "abc", "itemHashes": "x"}}',
        b'{"id": "e", "event": "delta.verified", "data": {"delta": NaN, "sequenceNumber": 12}}',
        b"{}",
    ],
)
def test_odd_fields_never_fail_a_genuine_event(body: bytes) -> None:
    event = parse_event(body)
    assert event.event_id


def test_an_unusable_amount_is_kept_as_text_for_the_evidence() -> None:
    claim = parse_event(b'{"id":"e","event":"delta.verified","data":{"recordId":"a","delta":NaN}}').claim
    assert claim is not None and claim.amount is None and claim.amount_unreadable == "NaN"


def test_a_numeric_id_and_an_over_long_id() -> None:
    assert parse_event(b'{"id": 17, "event": "x"}').event_id == "17"
    raw = json.dumps({"id": "e" * 300, "event": "x"}).encode()
    assert parse_event(raw).event_id == "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not JSON"),
        (b"[1, 2]", "not an array"),
        (b'"text"', "not a string"),
        (b"null", "not null"),
        (b"42", "not a number"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'\xef\xbb\xbf{"id": "e"}', "not JSON"),  # a BOM is not silently skipped
        (b'{"id": ', "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not usable JSON"),
        (b'{"n": ' + b"9" * 5000 + b"}", "not usable JSON"),
    ],
)
def test_bodies_that_are_no_json_object(body: bytes, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message.replace("not ", "(not |must be a JSON object, not )")):
        parse_event(body)
