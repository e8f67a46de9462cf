"""`pacrecon`: the command line. Exit codes: 0 done, 1 failed, 2 refused (configuration or schema)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pacrecon.settings import ConfigurationError, Settings, load_settings

EXIT_FAILED = 1
EXIT_REFUSED = 2


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
    from pacrecon.app import create_app, open_ledger
    from pacrecon.logs import configure_logging
    from pacrecon.server import serve_app
    from storage.errors import SchemaNotCurrent, StorageUnavailable

    if not settings.webhook_secrets:
        raise ConfigurationError("PACRECON_WEBHOOK_SECRETS: serve needs at least one webhook secret (comma-separated)")
    configure_logging(settings.log_level, settings.log_format, settings.secret_values())
    ledger = open_ledger(settings)
    try:
        ledger.check_schema()
    except SchemaNotCurrent as exc:
        ledger.close()
        raise Refusal(str(exc)) from None
    except StorageUnavailable as exc:
        ledger.close()
        print(f"pacrecon: {exc}", file=sys.stderr)
        return EXIT_FAILED
    serve_app(create_app(settings, ledger), settings.host, settings.port)
    return 0


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
