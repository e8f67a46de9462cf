"""structlog for everything, uvicorn's loggers included: JSON lines in production,
readable lines on a terminal. Configured secrets are scrubbed from every line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from functools import partial
from typing import Any

import structlog

REDACTED = "[redacted]"


_PLAIN = frozenset({int, float, bool, type(None)})  # values that cannot hold a secret


class SecretScrubber:
    """Replaces any configured secret found in a log event's values (defence in depth:
    nothing logs a secret on purpose)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, _: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        if not self._secrets:
            return event
        # runs on every line: plain values are skipped by type, strings searched in C;
        # only a container is walked
        for key, value in event.items():
            kind = type(value)
            if kind is str:
                for secret in self._secrets:
                    if secret in value:
                        event[key] = self._scrub(value)
                        break
            elif kind not in _PLAIN:
                event[key] = self._scrub(value)
        return event

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {key: self._scrub(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._scrub(item) for item in value]
        return value


def configure_logging(level: str = "info", fmt: str | None = None, secrets: Iterable[str] = ()) -> None:
    use_json = fmt == "json" or (fmt is None and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    scrubber = SecretScrubber(secrets)
    handler = logging.StreamHandler(sys.stderr)
    # our own lines skip stdlib logging (a LogRecord, findCaller, a formatter: most of a
    # line's cost, and logged on every request); the same stream, the same lock
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, scrubber, renderer],
        logger_factory=partial(_LineLogger, handler),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,  # a later configure_logging (tests) applies everywhere
    )
    # everything else (uvicorn, SQLAlchemy, httpx, ...) comes through stdlib logging
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared, _drop_color_message],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # tracebacks become text first, so that the scrubber sees them too
            structlog.processors.format_exc_info,
            scrubber,
            renderer,
        ],
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # SQLAlchemy logs statements with parameters at INFO: never let them through;
    # alembic announces its dialect at every schema check
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request is noise
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


class _LineLogger:
    """structlog's output for our own loggers: a rendered line to the root handler's stream,
    under the handler's lock, so that it never interleaves with a stdlib line."""

    def __init__(self, handler: logging.StreamHandler[Any], name: str = "", *_: Any) -> None:
        self._handler, self.name = handler, name  # `name`: for add_logger_name

    def msg(self, message: str) -> None:
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(message + "\n")
            handler.stream.flush()
        finally:
            handler.release()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _drop_color_message(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    event.pop("color_message", None)  # uvicorn's ANSI-coloured copy of the message
    return event
