"""structlog for everything, uvicorn's loggers included: JSON lines in production,
readable lines on a terminal. Configured secrets are scrubbed from every line."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from functools import partial
from typing import Any

import orjson
import structlog

REDACTED = "[redacted]"


class SecretScrubber:
    """Removes every configured secret from a rendered line (the renderer's last step), so a
    secret is gone from the text itself, wherever it was: a value, a key, a nested
    container, a traceback. Defence in depth: nothing logs a secret on purpose.

    The line is searched for each secret as it is written raw, repr()-escaped (a `%r` in a
    message), and either of those JSON-escaped (ASCII or not): the forms a renderer can give
    it. For the usual secrets all are the same text: one C search per line.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if len(secret) >= 4:
                for text in (secret, repr(secret)[1:-1]):
                    forms |= {text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, _: Any, __: str, line: str) -> str:
        for form in self._forms:
            if form in line:
                line = line.replace(form, REDACTED)
        return line


def _json_line(value: Any, **options: Any) -> str:
    """orjson where it can (a fifth of json.dumps' cost, on every line), json.dumps where it
    cannot (keys that are not strings, integers beyond 64 bits)."""
    try:
        return orjson.dumps(value, default=options.get("default")).decode("utf-8")
    except TypeError:
        return json.dumps(value, **options)


_SECOND: list[tuple[int, str]] = [(0, "1970-01-01T00:00:00")]  # the last second's text, swapped whole


def _timestamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog's `TimeStamper(fmt="iso", utc=True)` format, with the date and time text
    made once per second instead of once per line (the writer thread logs too: the cached
    pair is replaced as one tuple, never half)."""
    now = time.time()
    second = int(now)
    cached = _SECOND[0]
    if cached[0] != second:
        cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        _SECOND[0] = cached
    event["timestamp"] = f"{cached[1]}.{int((now - second) * 1_000_000):06d}Z"
    return event


def configure_logging(level: str = "info", fmt: str | None = None, secrets: Iterable[str] = ()) -> None:
    use_json = fmt == "json" or (fmt is None and not sys.stderr.isatty())
    shared: list[Any] = [structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, _timestamp]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json_line) if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    scrubber = SecretScrubber(secrets)
    handler = logging.StreamHandler(sys.stderr)
    # our own lines skip stdlib logging (a LogRecord, findCaller, a formatter: most of a
    # line's cost, and logged on every request); the same stream, the same lock
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer, scrubber],
        logger_factory=partial(_LineLogger, handler),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,  # a later configure_logging (tests) applies everywhere
    )
    # everything else (uvicorn, SQLAlchemy, httpx, ...) comes through stdlib logging
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared, _drop_color_message],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
            scrubber,  # last: it reads the rendered line, tracebacks included
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
