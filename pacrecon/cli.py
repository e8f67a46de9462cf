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
        settings = load_settings(**_overrides(args))
        return int(args.run(settings, args) or 0)
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
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="upgrade the ledger's schema to this version's head")
    migrate.set_defaults(run=_migrate)
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
