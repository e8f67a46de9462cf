"""Errors of the reconciler's pure functions."""


class InvalidEvent(ValueError):
    """A genuine (signed) body that is not a usable PacSpace event: not UTF-8, not JSON,
    or not a JSON object. The message says which, without echoing the body."""
