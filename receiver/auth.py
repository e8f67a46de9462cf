"""Bearer tokens for our own API and admin routes, compared in constant time."""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.requests import Request

from receiver.errors import RequestError


def require_bearer(request: Request, token: SecretStr | None, *, disabled_code: str, setting: str) -> None:
    """Refuse the request unless it carries `Authorization: Bearer <token>`.

    503 `disabled_code` when no token is configured (the routes are off), 401
    `unauthorized` when the header is missing or wrong.
    """
    if token is None:
        raise RequestError(503, disabled_code, f"these routes are disabled: set {setting} to enable them")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode("utf-8")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected):
        raise RequestError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required")
