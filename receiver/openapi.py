"""`GET /openapi.json`: every route the daemon serves, described as it behaves.

Written by hand next to the routes it describes (a generator would need a framework
we do not use); `openapi_routes` refuses to start a daemon whose routes and document
disagree, and the tests check the answers against the schemas.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from storage.vocabulary import DeltaStatus, DiscrepancyKind

JSON = "application/json"
ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {400: "invalid request", 401: "missing or wrong bearer token", 404: "not found", 409: "conflict",
             413: "body too large", 503: "unavailable (ledger, PacSpace or routes disabled)"}
    return {str(s): _json(ERROR, words[s]) for s in statuses}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


OBJECT = {"type": "object"}
ID_PATTERN = {"type": "string", "pattern": "^[0-9]{1,10}$"}
ROW_ID = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
FREE_TEXT = {"type": "string", "maxLength": 300, "pattern": "^[^\\x00]*$"}
CUSTOMER_ID = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}
TEXT = "^[^\\x00]*$"  # no NUL: PostgreSQL cannot store it
TIME = {"type": "string", "description": "ISO 8601 date or time; UTC when no offset is given"}
PAGE = {"type": "integer", "minimum": 1, "maximum": 1000}
ADMIN = [{"admin": []}]
API = [{"api": []}]
EMIT_BODY = {
    "type": "object",
    "required": ["customerId", "delta", "reason"],
    "properties": {
        "customerId": CUSTOMER_ID,
        "delta": {"type": "number", "minimum": -1_000_000_000, "maximum": 1_000_000_000, "not": {"const": 0},
                  "description": "exact decimal, e.g. -42.50, at most 9 decimal places, not zero"},
        "reason": {"type": "string", "minLength": 1, "maxLength": 500, "pattern": TEXT},
        "referenceId": {"type": ["string", "null"], "maxLength": 256, "pattern": TEXT},
        "metadata": {"type": ["object", "null"], "description": "at most 16 KiB as JSON"},
    },
}
IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255}}

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/healthz", "get"): {
        "summary": "The process answers (no database involved)",
        "responses": {"200": _json(OBJECT, "alive")},
    },
    ("/readyz", "get"): {
        "summary": "The ledger is reachable and its schema current",
        "responses": {"200": _json(OBJECT, "ready"), **_errors(503)},
    },
    ("/webhooks/pacspace", "post"): {
        "summary": "A signed PacSpace webhook: verified, recorded durably once, then acknowledged",
        "parameters": [
            {"name": "X-PacSpace-Signature", "in": "header", "required": True, "schema": {"type": "string"}},
            {"name": "X-PacSpace-Timestamp", "in": "header", "required": True, "schema": {"type": "string"}},
        ],
        "requestBody": {"required": True, "content": {JSON: {"schema": OBJECT}}},
        "responses": {
            "200": _json({"type": "object", "required": ["status"],
                          "properties": {"status": {"enum": ["recorded", "duplicate", "ignored"]}}}, "recorded (or already)"),
            **_errors(400, 401, 413, 503),
        },
    },
    ("/v1/deltas", "post"): {
        "summary": "Emit one delta through the outbox",
        "security": API,
        "parameters": [IDEMPOTENCY],
        "requestBody": {"required": True, "content": {JSON: {"schema": EMIT_BODY}}},
        "responses": {"200": _json(OBJECT, "accepted by PacSpace"), "202": _json(OBJECT, "committed; not yet answered"),
                      **_errors(400, 401, 409, 413, 503)},
    },
    ("/v1/deltas", "get"): {
        "summary": "Deltas in the ledger, by id (keyset pages)",
        "security": API,
        "parameters": [
            _query("customer_id", CUSTOMER_ID, "one customer"),
            _query("status", {"enum": [s.value for s in DeltaStatus]}, "one status"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "page size (100)"),
            _query("cursor", {"type": "string"}, "next_cursor of the previous page, exactly (anything else is 400)"),
        ],
        "responses": {"200": _json({"type": "object", "required": ["deltas", "next_cursor"]}, "a page"), **_errors(400, 401, 503)},
    },
    ("/v1/deltas/batch", "post"): {
        "summary": "Emit up to 100 deltas through the outbox as one batch",
        "security": API,
        "parameters": [IDEMPOTENCY],
        "requestBody": {"required": True, "content": {JSON: {"schema": {"type": "object", "required": ["deltas"],
                        "properties": {"deltas": {"type": "array", "items": EMIT_BODY, "minItems": 1, "maxItems": 100}}}}}},
        "responses": {"200": _json(OBJECT, "answered by PacSpace"), "202": _json(OBJECT, "committed; not yet answered"),
                      **_errors(400, 401, 409, 413, 503)},
    },
    ("/v1/deltas/import", "post"): {
        "summary": "Register deltas emitted elsewhere, from their PacSpace emit answers",
        "security": API,
        "requestBody": {"required": True, "content": {JSON: {"schema": {"oneOf": [
            {"type": "array", "minItems": 1,
             "description": "1 to 10,000 emit answers; a record that is not one is reported in `invalid`, the rest imported"},
            {"type": "object", "required": ["records"], "properties": {"records": {"type": "array", "minItems": 1}}},
        ]}}}},
        "responses": {"200": _json(OBJECT, "what was imported"), **_errors(400, 401, 413, 503)},
    },
    ("/v1/deltas/{anchor_id}", "get"): {
        "summary": "The deltas of one anchor",
        "security": API,
        "parameters": [_path("anchor_id", {"type": "string"})],
        "responses": {"200": _json({"type": "object", "required": ["anchorId", "deltas"]}, "found"), **_errors(401, 404, 503)},
    },
    ("/admin/reconciliation/report", "get"): {
        "summary": "The reconciliation report: JSON (default), CSV of the discrepancy rows, or HTML for a browser",
        "security": ADMIN,
        "parameters": [
            _query("format", {"enum": ["json", "csv", "html"]},
                   "default: html when Accept has text/html, else json; csv: every open discrepancy row the filters select"),
            _query("customer_id", FREE_TEXT, "one customer"),
            _query("since", TIME, "deltas created (discrepancies first seen, webhooks received) from"),
            _query("until", TIME, "… before"),
            _query("discrepancy_limit", PAGE, "open discrepancy rows per page (100)"),
            _query("discrepancy_cursor", ROW_ID, "next_cursor of the rows"),
            _query("customer_limit", PAGE, "customers per page (100)"),
            _query("customer_cursor", FREE_TEXT, "next_cursor of the customers"),
        ],
        "responses": {
            "200": {"description": "the report", "content": {
                JSON: {"schema": {"$ref": "#/components/schemas/Report"}},
                "text/csv": {"schema": {"type": "string"}},
                "text/html": {"schema": {"type": "string"}},
            }},
            **_errors(400, 401, 503),
        },
    },
    ("/admin/reconciliation/runs", "post"): {
        "summary": "Start a reconciliation pass now",
        "security": ADMIN,
        "responses": {"202": _json({"type": "object", "required": ["run_id", "status", "href"]}, "started"),
                      **_errors(401, 409, 503)},
    },
    ("/admin/reconciliation/runs", "get"): {
        "summary": "Reconciliation runs, newest first",
        "security": ADMIN,
        "parameters": [_query("limit", PAGE, "page size (50)"), _query("cursor", {**ROW_ID, "minimum": 1}, "next_cursor")],
        "responses": {"200": _json({"type": "object", "required": ["runs", "next_cursor"]}, "a page"), **_errors(400, 401, 503)},
    },
    ("/admin/reconciliation/runs/{run_id}", "get"): {
        "summary": "One reconciliation run",
        "security": ADMIN,
        "parameters": [_path("run_id", ID_PATTERN)],
        "responses": {"200": _json({"$ref": "#/components/schemas/Run"}, "the run"), **_errors(401, 404, 503)},
    },
    ("/admin/discrepancies", "get"): {
        "summary": "Discrepancies, by id",
        "security": ADMIN,
        "parameters": [
            _query("kind", {"enum": [k.value for k in DiscrepancyKind]}, "one kind"),
            _query("status", {"enum": ["open", "resolved", "all"]}, "default open"),
            _query("customer_id", FREE_TEXT, "one customer"),
            _query("limit", PAGE, "page size (100)"),
            _query("cursor", ROW_ID, "next_cursor"),
        ],
        "responses": {"200": _json({"type": "object", "required": ["discrepancies", "next_cursor"]}, "a page"),
                      **_errors(400, 401, 503)},
    },
    ("/admin/discrepancies/{discrepancy_id}/resolve", "post"): {
        "summary": "Resolve an open discrepancy, with a note for the audit trail",
        "security": ADMIN,
        "parameters": [_path("discrepancy_id", ID_PATTERN)],
        "requestBody": {"required": True, "content": {JSON: {"schema": {
            "type": "object", "required": ["note"], "properties": {"note": {"type": "string", "minLength": 1, "maxLength": 2000}}}}}},
        "responses": {"200": _json(OBJECT, "resolved"), **_errors(400, 401, 404, 409, 413, 503)},
    },
    ("/metrics", "get"): {
        "summary": "Prometheus metrics",
        "responses": {"200": {"description": "text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
    },
    ("/openapi.json", "get"): {
        "summary": "This document",
        "responses": {"200": _json(OBJECT, "OpenAPI 3.1")},
    },
}

COMPONENTS = {
    "securitySchemes": {
        "api": {"type": "http", "scheme": "bearer", "description": "PACRECON_API_TOKEN"},
        "admin": {"type": "http", "scheme": "bearer", "description": "PACRECON_ADMIN_TOKEN"},
    },
    "schemas": {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
        "Run": {"type": "object", "required": ["id", "status", "dry_run", "started_at", "checked", "fixed", "errors", "found"]},
        "Report": {"type": "object", "required": ["generated_at", "summary", "totals", "discrepancies", "last_run", "lag",
                                                  "webhooks", "customers"]},
    },
}


def openapi_document(routes: list[BaseRoute]) -> dict[str, Any]:
    """The document for exactly `routes`; refuses a route it does not describe, or a
    description of a route that is not served."""
    served = {(r.path, method.lower()) for r in routes if isinstance(r, Route) for method in (r.methods or ()) if method != "HEAD"}
    served.add(("/openapi.json", "get"))
    if served != set(OPERATIONS):
        raise RuntimeError(f"the OpenAPI document and the routes disagree: {sorted(served ^ set(OPERATIONS))}")
    paths: dict[str, dict[str, Any]] = {}
    for (path, method), operation in OPERATIONS.items():
        paths.setdefault(path, {})[method] = {"operationId": f"{method}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}", **operation}
    return {
        "openapi": "3.1.0",
        "info": {"title": "pacrecon", "version": "0.1.0", "description": "The tenant's side of the PacSpace Balance API contract."},
        "paths": paths,
        "components": COMPONENTS,
    }


def openapi_routes(routes: list[BaseRoute]) -> list[Route]:
    document = openapi_document(routes)

    async def serve(_: Request) -> Response:
        return JSONResponse(document)

    return [Route("/openapi.json", serve, methods=["GET"])]
