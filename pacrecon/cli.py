"""`pacrecon`: the command line. Exit codes: 0 done, 1 failed, 2 refused (configuration or schema)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import re
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any
from pathlib import Path

from pacrecon.settings import ConfigurationError, Settings, load_settings

EXIT_FAILED = 1
EXIT_REFUSED = 2
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")  # JSON's number grammar


class Refusal(Exception):
    """Stop with one line on stderr and exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.needs_settings:
            return int(args.run(load_settings(**_overrides(args)), args) or 0)
        return int(args.run(args) or 0)
    except (ConfigurationError, Refusal) as exc:
        print(f"pacrecon: {'configuration error: ' if isinstance(exc, ConfigurationError) else ''}{exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacrecon",
        description="Receive, record and reconcile PacSpace balance deltas. "
        "Configuration comes from PACRECON_* environment variables or a .env file.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon (webhook receiver, health endpoints)")
    serve.add_argument("--host", help="address to bind (default: PACRECON_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default: PACRECON_PORT, 8080)")
    serve.set_defaults(run=_serve, needs_settings=True)

    migrate = commands.add_parser("migrate", help="upgrade the ledger's schema to this version's head")
    migrate.set_defaults(run=_migrate, needs_settings=True)

    emit = commands.add_parser(
        "emit",
        help="emit one delta through the outbox and print the answer",
        description="Emit one delta. By default through the running daemon's POST /v1/deltas "
        "(needs PACRECON_API_TOKEN; --daemon-url, else http://PACRECON_HOST:PACRECON_PORT). With --direct, "
        "in this process: committed to the ledger at PACRECON_DATABASE_URL first, then sent to PacSpace "
        "(needs PACRECON_PACSPACE_API_KEY); if PacSpace does not answer, the daemon's retry job sends it later.",
    )
    emit.add_argument("customer_id", metavar="CUSTOMER_ID")
    emit.add_argument("delta", metavar="DELTA", help="the amount, e.g. -42.50 (exact decimal)")
    emit.add_argument("reason", metavar="REASON")
    emit.add_argument("--reference-id", help="your own reference for the delta")
    emit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    emit.add_argument("--idempotency-key", help="send again with the same key to get the same answer")
    emit.add_argument("--daemon-url", help="the daemon to emit through (default http://PACRECON_HOST:PACRECON_PORT)")
    emit.add_argument("--direct", action="store_true", help="emit from this process instead of through the daemon")
    emit.set_defaults(run=_emit, needs_settings=True)

    imports = commands.add_parser(
        "import",
        help="register deltas emitted elsewhere, from a file of their emit answers (one JSON per line)",
        description="Register deltas emitted by other means (the TypeScript SDK, curl) so the reconciler "
        "watches them: each line of FILE is one PacSpace emit answer (bare or in its {success, data} "
        "envelope) or batch answer. Writes to the ledger at PACRECON_DATABASE_URL directly; importing "
        "the same record again changes nothing. Exit 1 when any line could not be imported.",
    )
    imports.add_argument("file", metavar="FILE.jsonl", type=Path)
    imports.set_defaults(run=_import, needs_settings=True)

    reconcile = commands.add_parser(
        "reconcile",
        help="run one reconciliation pass now and print its summary",
        description="Look up every stale delta at PacSpace, compare, fix or report (the daemon does this "
        "every PACRECON_RECONCILE_INTERVAL_SECONDS). Exit 0 when no discrepancy is open afterwards (with "
        "--dry-run: would be open), 1 when some are or some lookups failed, 2 when the pass could not run.",
    )
    reconcile.add_argument("--once", action="store_true", required=True, help="one pass, then exit")
    reconcile.add_argument("--dry-run", action="store_true", help="change nothing: report what a pass would do")
    reconcile.add_argument("--json", action="store_true", help="print the summary as JSON")
    reconcile.set_defaults(run=_reconcile, needs_settings=True)

    demo = commands.add_parser(
        "demo",
        help="a one-minute tour: sandbox + daemon, a few hundred deltas, faults, a reconciliation, the report",
        description="Starts the PacSpace sandbox and the daemon on free loopback ports with a new SQLite "
        "ledger in a temporary directory, emits a few hundred deltas through the outbox while the sandbox "
        "drops, duplicates and reorders webhooks, corrupts a receipt, fails a delta, forgets one and answers "
        "a burst of 429s; then reconciles and prints the report. Needs no configuration (PACRECON_* is ignored).",
    )
    demo.add_argument("--seed", type=int, default=42, help="the same seed gives the same deltas and faults (default 42)")
    demo.add_argument("--keep", action="store_true", help="stay up afterwards and print the report's URL and admin token")
    demo.add_argument("--singles", type=int, default=150, help="deltas emitted one by one (default 150)")
    demo.add_argument("--batches", type=int, default=1, help="batches of 100 deltas (default 1)")
    demo.add_argument("--workdir", type=Path, help="keep the ledger and logs here instead of a temporary directory")
    demo.set_defaults(run=_demo, needs_settings=False)

    report = commands.add_parser(
        "report",
        help="print the reconciliation report from the ledger",
        description="The same report as GET /admin/reconciliation/report, read from the ledger at "
        "PACRECON_DATABASE_URL: a readable table (default), JSON, or the open discrepancy rows as CSV.",
    )
    report.add_argument("--format", choices=["table", "json", "csv"], default="table")
    report.add_argument("--customer-id", help="one customer only")
    report.add_argument("--since", help="from this date or time (ISO 8601; UTC unless an offset is given)")
    report.add_argument("--until", help="before this date or time")
    report.add_argument("--limit", type=int, default=100, help="open discrepancy rows and customers shown (default 100)")
    report.set_defaults(run=_report, needs_settings=True)

    sandbox = commands.add_parser(
        "sandbox",
        help="run a local PacSpace (API, webhooks, faults) for trying pacrecon without an account",
        description="A local PacSpace Balance API in memory, with fault injection. Its settings are "
        "these options only (not PACRECON_* variables); faults can also be changed at run time "
        "through /_sandbox/faults.",
    )
    sandbox.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sandbox.add_argument("--port", type=int, default=8090, help="port to bind (default 8090)")
    sandbox.add_argument("--api-key", default="sk_sandbox_local", help="the X-Api-Key it accepts")
    sandbox.add_argument("--webhook-url", help="where to deliver webhooks, e.g. http://127.0.0.1:8080/webhooks/pacspace")
    sandbox.add_argument(
        "--webhook-secret",
        action="append",
        default=[],
        help="secret to sign webhooks with; give it twice to sign with two (a rotation: current first)",
    )
    sandbox.add_argument("--seed", type=int, help="makes ids, hashes and fault choices repeatable")
    sandbox.add_argument("--verify-delay", type=float, default=2.0, help="seconds from QUEUED to VERIFIED (default 2)")
    sandbox.add_argument("--faults", default="", help="name=value,... e.g. drop_webhooks=0.1,rate_limit=0.05")
    sandbox.add_argument("--status-vocabulary", choices=["status", "sdk"], default="status",
                         help="status endpoint words: ANCHORING/ANCHORED (status) or PROCESSING/VERIFIED (sdk)")
    sandbox.add_argument("--webhook-shape", choices=["sdk", "docs"], default="sdk",
                         help="webhook envelope: the SDK's (with id) or the documentation pages' (with proof, no id)")
    sandbox.add_argument("--max-attempts", type=int, default=5, help="delivery attempts before a webhook is failed")
    sandbox.add_argument("--retry-backoff", type=float, default=1.0, help="seconds before the first redelivery (doubles)")
    sandbox.set_defaults(run=_sandbox, needs_settings=False)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {name: getattr(args, name) for name in ("host", "port") if getattr(args, name, None) is not None}


def _serve(settings: Settings, _: argparse.Namespace) -> int:
    if not settings.webhook_secrets:
        raise ConfigurationError("PACRECON_WEBHOOK_SECRETS: serve needs at least one webhook secret (comma-separated)")
    from pacrecon.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    from storage.errors import SchemaNotCurrent, StorageUnavailable

    writer = None
    if settings.webhook_writer == "process":  # first: its start overlaps the imports below
        from pacrecon.webhook_writer import spawn_writer

        try:
            writer = spawn_writer(settings, settings.write_deadline_seconds())
        except StorageUnavailable as exc:
            print(f"pacrecon: {exc}", file=sys.stderr)
            return EXIT_FAILED
    from pacrecon.app import create_app, open_ledger
    from pacrecon.server import serve_app
    from receiver.recorder import LedgerRecorder

    ledger = open_ledger(settings)
    recorder = writer if writer is not None else LedgerRecorder(ledger)
    try:
        ledger.check_schema()
        if writer is not None:
            writer.wait_until_ready()
    except (SchemaNotCurrent, StorageUnavailable) as exc:
        if writer is not None:
            writer.stop_now()
        ledger.close()
        if isinstance(exc, SchemaNotCurrent):
            raise Refusal(str(exc)) from None
        print(f"pacrecon: {exc}", file=sys.stderr)
        return EXIT_FAILED
    serve_app(create_app(settings, ledger, recorder), settings.host, settings.port)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pacrecon.demo import demo_directory, run_demo

    if args.singles < 10 or args.batches < 0:
        raise Refusal("--singles must be at least 10 and --batches at least 0")
    with demo_directory(args.workdir) as workdir:
        try:
            return run_demo(args.seed, args.singles, args.batches, sys.stdout, workdir, args.keep)
        except RuntimeError as exc:
            print(f"pacrecon demo: {exc}", file=sys.stderr)
            return EXIT_FAILED


def _report(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from pacrecon.app import open_ledger
    from receiver.admin import report_filter
    from receiver.errors import RequestError
    from reconciler.report import ReportPage, build_report, discrepancies_csv, report_table
    from storage import jsonio
    from storage.errors import SchemaNotCurrent, StorageUnavailable

    if not 1 <= args.limit <= 1000:
        raise Refusal("--limit must be between 1 and 1000")
    try:
        where = report_filter({"customer_id": args.customer_id, "since": args.since, "until": args.until})
    except RequestError as exc:
        raise Refusal(str(exc)) from None
    page = ReportPage(discrepancy_limit=args.limit, customer_limit=args.limit)
    ledger = open_ledger(settings)
    try:
        ledger.check_schema()
        report = ledger.read_sync(lambda s: build_report(s, where, page, datetime.now(UTC)))
    except StorageUnavailable as exc:
        print(f"pacrecon: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except SchemaNotCurrent as exc:
        raise Refusal(str(exc)) from None
    finally:
        ledger.close()
    if args.format == "json":
        print(jsonio.dumps(report))
    elif args.format == "csv":
        sys.stdout.write(discrepancies_csv(report["discrepancies"]["rows"]))
    else:
        sys.stdout.write(report_table(report))
    return 0


def _delta_request(args: argparse.Namespace) -> bytes:
    from decimal import Decimal, InvalidOperation

    from storage import jsonio

    if not NUMBER.fullmatch(args.delta):
        raise Refusal(f"DELTA {args.delta!r} is not a number (e.g. -42.50)")
    try:
        amount = Decimal(args.delta)
    except InvalidOperation:
        raise Refusal(f"DELTA {args.delta!r} is not a number (e.g. -42.50)") from None
    metadata = {}
    for pair in args.metadata:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise Refusal(f"--metadata {pair!r}: write KEY=VALUE")
        metadata[key] = value
    body: dict[str, object] = {"customerId": args.customer_id, "delta": amount, "reason": args.reason}
    if args.reference_id is not None:
        body["referenceId"] = args.reference_id
    if metadata:
        body["metadata"] = metadata
    return jsonio.dumps_bytes(body)


def _emit(settings: Settings, args: argparse.Namespace) -> int:
    raw = _delta_request(args)
    if args.direct:
        status, answer = asyncio.run(_emit_direct(settings, raw, args.idempotency_key))
    else:
        import httpx

        if settings.api_token is None:
            raise ConfigurationError("PACRECON_API_TOKEN: needed to emit through the daemon (or use --direct)")
        url = (args.daemon_url or f"http://{settings.host}:{settings.port}").rstrip("/") + "/v1/deltas"
        headers = {"Authorization": f"Bearer {settings.api_token.get_secret_value()}", "Content-Type": "application/json"}
        if args.idempotency_key:
            headers["Idempotency-Key"] = args.idempotency_key
        try:
            response = httpx.post(url, content=raw, headers=headers, timeout=60)
        except httpx.HTTPError as exc:
            print(f"pacrecon: the daemon at {url} did not answer: {type(exc).__name__}", file=sys.stderr)
            return EXIT_FAILED
        status, answer = response.status_code, response.content
    print(answer.decode("utf-8", "replace"))
    return 0 if status in (200, 202) else EXIT_FAILED


async def _emit_direct(settings: Settings, raw: bytes, idempotency_key: str | None) -> tuple[int, bytes]:
    from reconciler.outbox import InvalidRequest, Outbox, parse_request
    from storage import jsonio

    async with _connected(settings, "to emit directly") as (ledger, pacspace):
        try:
            request = parse_request(raw, "single", idempotency_key)
        except InvalidRequest as exc:
            return 400, jsonio.dumps_bytes({"error": {"code": "validation_error", "message": str(exc)}})
        answer = await Outbox(ledger, pacspace, lease_seconds=settings.outbox_lease_seconds).submit(request)
        return answer.status, answer.body


@contextlib.asynccontextmanager
async def _connected(settings: Settings, purpose: str) -> AsyncIterator[tuple[Any, Any]]:
    """The ledger (schema checked) and PacSpace, for a command that needs both; closed after."""
    import anyio.to_thread

    from pacrecon.app import open_ledger, open_pacspace

    http, pacspace = open_pacspace(settings)
    if pacspace is None:
        await http.aclose()
        raise ConfigurationError(f"PACRECON_PACSPACE_API_KEY: needed {purpose}")
    ledger = open_ledger(settings)
    try:
        await anyio.to_thread.run_sync(_check_schema, ledger)
        yield ledger, pacspace
    finally:
        await http.aclose()
        await anyio.to_thread.run_sync(ledger.close)


def _check_schema(ledger: Any) -> None:
    from storage.errors import SchemaNotCurrent, StorageUnavailable

    try:
        ledger.check_schema()
    except SchemaNotCurrent as exc:
        raise Refusal(str(exc)) from None
    except StorageUnavailable as exc:
        raise Refusal(f"the ledger is unreachable: {exc}") from None


def _import(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from pacrecon.app import open_ledger
    from reconciler.imports import import_records
    from storage import jsonio

    try:
        lines = args.file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise Refusal(f"{args.file}: cannot be read as UTF-8 text ({type(exc).__name__})") from None
    records, line_numbers, unreadable = [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(jsonio.loads(line))
            line_numbers.append(number)
        except (ValueError, RecursionError):
            unreadable.append({"line": number, "error": "not JSON"})
    ledger = open_ledger(settings)
    try:
        _check_schema(ledger)
        now = datetime.now(UTC)
        report = ledger.transact_sync(lambda session: import_records(session, records, now))
    finally:
        ledger.close()
    invalid = unreadable + [{"line": line_numbers[n - 1], "error": why} for n, why in report.invalid]
    summary = {"imported": len(report.imported), "already_known": report.known, "invalid": sorted(invalid, key=lambda i: i["line"])}
    print(jsonio.dumps(summary))
    return EXIT_FAILED if invalid else 0


def _reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from pacrecon.logs import configure_logging

    configure_logging("warning", settings.log_format, settings.secret_values())
    # the pass's page writer process logs as this process does
    summary = asyncio.run(_reconcile_once(settings.model_copy(update={"log_level": "warning"}), args.dry_run))
    if args.json:
        from storage import jsonio

        print(jsonio.dumps(summary))
    else:
        for key, value in summary.items():
            if key == "found":
                value = ", ".join(f"{kind} {count}" for kind, count in value.items()) or "nothing"
            print(f"{key.replace('_', ' '):<24} {'' if value is None else value}")
    if summary["status"] != "completed":
        return EXIT_REFUSED  # the pass could not run (or not to its end)
    return EXIT_FAILED if summary["open_discrepancies"] or summary["errors"] else 0


async def _reconcile_once(settings: Settings, dry_run: bool) -> dict[str, object]:
    from pacrecon.app import make_reconciler

    async with _connected(settings, "to look deltas up at PacSpace") as (ledger, pacspace):
        reconciler = make_reconciler(settings, ledger, pacspace)
        gc.freeze()  # the modules and the clients live as long as the pass: the collector need not walk them
        summary = await reconciler.run_pass(dry_run=dry_run)
        return summary.as_dict()


def _sandbox(args: argparse.Namespace) -> int:
    from pacrecon.logs import configure_logging
    from pacrecon.server import serve_app
    from sandbox.app import SandboxConfig, create_sandbox_app
    from sandbox.faults import FaultError, parse_faults

    if len(args.webhook_secret) > 2:
        raise Refusal("--webhook-secret: at most two (the current and the previous secret)")
    if not 0 <= args.verify_delay <= 3600:
        raise Refusal("--verify-delay: seconds from 0 to 3600")
    if not 1 <= args.max_attempts <= 100 or not 0 <= args.retry_backoff <= 3600:
        raise Refusal("--max-attempts: 1 to 100; --retry-backoff: 0 to 3600 seconds")
    try:
        faults = parse_faults(args.faults)
    except FaultError as exc:
        raise Refusal(f"--faults: {exc}") from None
    configure_logging("info", None, [args.api_key, *args.webhook_secret])
    app, _ = create_sandbox_app(
        SandboxConfig(
            api_key=args.api_key,
            webhook_url=args.webhook_url,
            webhook_secrets=tuple(args.webhook_secret),
            seed=args.seed,
            verify_delay=args.verify_delay,
            faults=faults,
            vocabulary=args.status_vocabulary,
            webhook_shape=args.webhook_shape,
            max_attempts=args.max_attempts,
            retry_backoff=args.retry_backoff,
        )
    )
    serve_app(app, args.host, args.port)
    return 0


def _migrate(settings: Settings, _: argparse.Namespace) -> int:
    from storage.engine import make_engine
    from storage.schema import current_revision, upgrade_to_head

    engine = make_engine(settings.database_url)
    try:
        before = current_revision(engine)
        upgrade_to_head(engine)
        after = current_revision(engine)
    except Exception as exc:  # the driver's message, not a traceback
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(exc, SQLAlchemyError):
            raise
        print(f"pacrecon: migration failed: {getattr(exc, 'orig', exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        engine.dispose()
    print(f"schema at revision {after}" + ("" if before == after else f" (was {before or 'empty'})"))
    return 0
