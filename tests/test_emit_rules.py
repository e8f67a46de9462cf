"""PacSpace's published emit rules."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from reconciler.emit_rules import batch_shape_error, delta_errors

VALID = {"customerId": "cust_1.a-b:c", "delta": Decimal("-42.50"), "reason": "usage"}


def test_a_valid_delta() -> None:
    assert delta_errors(VALID) == []
    assert delta_errors({**VALID, "referenceId": "inv_1", "metadata": {"a": 1}, "unknown": 1}) == []
    assert delta_errors({**VALID, "delta": 1_000_000_000}) == []
    assert delta_errors({**VALID, "customerId": "c" * 128, "reason": "r" * 500}) == []


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"customerId": None}, "customerId", "is required"),
        ({"customerId": "has space"}, "customerId", "letters"),
        ({"customerId": "c" * 129}, "customerId", "letters"),
        ({"customerId": 12}, "customerId", "letters"),
        ({"delta": None}, "delta", "is required"),
        ({"delta": "-42.50"}, "delta", "must be a number"),
        ({"delta": True}, "delta", "must be a number"),
        ({"delta": Decimal(0)}, "delta", "must not be zero"),
        ({"delta": Decimal("NaN")}, "delta", "must be finite"),
        ({"delta": Decimal("Infinity")}, "delta", "must be finite"),
        ({"delta": Decimal("1000000000.01")}, "delta", "between"),
        ({"delta": Decimal("-1000000001")}, "delta", "between"),
        ({"reason": None}, "reason", "is required"),
        ({"reason": ""}, "reason", "is required"),
        ({"reason": "r" * 501}, "reason", "at most 500"),
        ({"reason": 5}, "reason", "must be a string"),
        ({"referenceId": 5}, "referenceId", "must be a string"),
        ({"metadata": [1]}, "metadata", "must be an object"),
    ],
)
def test_each_broken_rule_names_its_field(change: dict[str, Any], field: str, reason: str) -> None:
    item = {**VALID, **change}
    if change.get(next(iter(change))) is None:
        item.pop(next(iter(change)))
    (error,) = delta_errors(item)
    assert error.field == field and reason in error.reason


def test_not_an_object() -> None:
    assert [str(e) for e in delta_errors([1], "deltas[3].")] == ["deltas[3]: must be a JSON object"]


def test_prefix_names_the_batch_item() -> None:
    assert delta_errors({**VALID, "reason": ""}, "deltas[7].")[0].field == "deltas[7].reason"


@pytest.mark.parametrize(
    ("body", "problem"),
    [({}, "is required"), ({"deltas": {}}, "is required"), ({"deltas": []}, "1 to 100"), ({"deltas": [VALID] * 101}, "1 to 100"), ([], "is required")],
)
def test_batch_shape(body: Any, problem: str) -> None:
    error = batch_shape_error(body)
    assert error is not None and problem in error.reason


def test_a_full_batch_is_fine() -> None:
    assert batch_shape_error({"deltas": [VALID] * 100}) is None
