"""Errors of the reconciler's pure functions."""

from __future__ import annotations

from typing import Any


class InvalidEvent(ValueError):
    """A genuine (signed) body that is not a usable PacSpace event: not UTF-8, not JSON,
    or not a JSON object. The message says which, without echoing the body."""


class PacSpaceError(Exception):
    """PacSpace answered with an error, or could not be reached.

    `status` is the HTTP status (None when no answer came), `code` PacSpace's own
    code (`VALIDATION_ERROR`, `INSUFFICIENT_CREDITS`, …, or `NETWORK_ERROR` /
    `TIMEOUT` of ours), `retryable` whether sending the same request again later
    may succeed, `retry_after` the seconds PacSpace asked us to wait.
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        customer_id: str | None = None,
    ) -> None:
        super().__init__(f"PacSpace {status or 'unreachable'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.customer_id = customer_id

    def __reduce__(self) -> tuple[Any, ...]:
        # a pass's answers cross to its page writer process (pickled); Exception's own
        # reduce would call __init__ with the message alone
        return (_pacspace_error, (self.status, self.code, self.message, self.retryable, self.retry_after, self.customer_id))

    @property
    def final(self) -> bool:
        """PacSpace itself refused the request for good: a validation error (400), no credits
        (402), no contract (412), or our key reused with another body (409). Anything else
        (a wrong API key, a proxy's error page, an odd answer) may change: send it again later."""
        if self.code.startswith("HTTP_") or self.code == "INVALID_RESPONSE":
            return False  # not PacSpace's own word: a proxy, a load balancer, a broken answer
        return self.status in (400, 402, 412) or self.code == "IDEMPOTENCY_CONFLICT"


def _pacspace_error(
    status: int | None, code: str, message: str, retryable: bool, retry_after: float | None, customer_id: str | None
) -> PacSpaceError:
    return PacSpaceError(status, code, message, retryable=retryable, retry_after=retry_after, customer_id=customer_id)
