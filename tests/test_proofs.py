"""Known answers for the proof function: keccak256, leaves, Merkle roots (empty, single, odd)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pacspace_sdk.keccak import keccak256 as sdk_keccak256  # an independent pure-Python Keccak

from reconciler.proofs import (
    EMPTY_ROOT,
    ProofUnverifiable,
    canonical_json,
    item_hash,
    keccak256,
    merkle_root,
    proof_item,
)


def test_keccak256_known_answers() -> None:
    # the original Keccak (padding 0x01), not SHA3-256 (whose empty digest is a7ffc6f8...)
    assert keccak256(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert keccak256(b"abc").hex() == "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"


@given(st.binary(max_size=600))
def test_keccak256_agrees_with_an_independent_implementation(data: bytes) -> None:
    assert keccak256(data) == sdk_keccak256(data)


def _leaf(n: int) -> str:
    return "0x" + sdk_keccak256(f"leaf {n}".encode()).hex()


def _node(left: str, right: str) -> str:
    return "0x" + sdk_keccak256(b"pacspace:node:v1:" + bytes.fromhex(left[2:]) + bytes.fromhex(right[2:])).hex()


def test_the_empty_root_is_32_zero_bytes() -> None:
    assert merkle_root([]) == EMPTY_ROOT == "0x" + "0" * 64


def test_a_single_items_root_is_its_leaf() -> None:
    assert merkle_root([_leaf(1)]) == _leaf(1)


def test_two_leaves() -> None:
    assert merkle_root([_leaf(1), _leaf(2)]) == _node(_leaf(1), _leaf(2))


def test_an_odd_node_is_paired_with_itself_at_every_level() -> None:
    a, b, c, d, e = (_leaf(n) for n in range(5))
    assert merkle_root([a, b, c]) == _node(_node(a, b), _node(c, c))
    level1 = [_node(a, b), _node(c, d), _node(e, e)]
    assert merkle_root([a, b, c, d, e]) == _node(_node(level1[0], level1[1]), _node(level1[2], level1[2]))


def test_order_matters() -> None:
    assert merkle_root([_leaf(1), _leaf(2)]) != merkle_root([_leaf(2), _leaf(1)])


def test_hex_case_does_not_change_the_root() -> None:
    assert merkle_root([_leaf(1).upper().replace("0X", "0x")]) == _leaf(1)


@pytest.mark.parametrize("bad", ["0x1234", "abc", "0x" + "zz" * 32, "", 42])
def test_a_malformed_hash_is_unverifiable_not_a_crash(bad: object) -> None:
    with pytest.raises(ProofUnverifiable):
        merkle_root([_leaf(1), bad])  # type: ignore[list-item]


def test_canonical_json() -> None:
    value = {"b": [1, Decimal("-42.50"), None, True], "a": {"z": "é", "y": Decimal("1E+3")}, "c": Decimal("0.000000001")}
    assert canonical_json(value) == '{"a":{"y":1000,"z":"é"},"b":[1,-42.5,null,true],"c":0.000000001}'.encode()


def test_canonical_json_never_rounds() -> None:
    long = Decimal("0.1000000000000000055511151231257827021181583404541015625")
    assert canonical_json(long) == b"0.1000000000000000055511151231257827021181583404541015625"
    assert canonical_json(Decimal("123456789012345678901234567890.10")) == b"123456789012345678901234567890.1"


def test_canonical_json_refuses_floats() -> None:
    with pytest.raises(ProofUnverifiable):
        canonical_json({"delta": 0.1})


def test_an_item_leaf_known_answer() -> None:
    """Pins our versioned choice of the item's fields; a change here is a new PROOF_VERSION."""
    item = proof_item(
        anchor_id="a_1",
        index=0,
        customer_id="cust_12345",
        delta=Decimal("-42.50"),
        reason="usage_charge",
        reference_id="inv_98765",
        metadata={"plan": "growth", "invoiceId": "inv_98765"},
    )
    expected_json = (
        b'{"anchorId":"a_1","customerId":"cust_12345","delta":-42.5,"index":0,'
        b'"metadata":{"invoiceId":"inv_98765","plan":"growth"},"reason":"usage_charge","referenceId":"inv_98765"}'
    )
    assert canonical_json(item) == expected_json
    assert item_hash(item) == "0x" + sdk_keccak256(b"pacspace:item:v1:" + expected_json).hex()


def test_optional_fields_are_left_out_when_absent() -> None:
    item = proof_item(anchor_id="a", index=1, customer_id="c", delta=Decimal(1), reason="r")
    assert set(item) == {"anchorId", "index", "customerId", "delta", "reason"}
