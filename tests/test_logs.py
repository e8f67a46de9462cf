"""Logging: secrets never reach a line, not even inside a traceback."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from pacrecon.logs import REDACTED, configure_logging

SECRET = "whsec_must_never_be_logged_123"


@pytest.fixture(autouse=True)
def restore_logging() -> None:
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = []


def test_a_secret_inside_a_traceback_and_a_nested_value_is_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json", [SECRET])
    log = structlog.get_logger("test")
    try:
        raise RuntimeError(f"connecting with {SECRET} failed")
    except RuntimeError:
        log.exception("failure", nested={"list": [f"x{SECRET}x"]})
    logging.getLogger("uvicorn.error").error("stdlib line with %s", SECRET)
    output = capsys.readouterr().err
    assert SECRET not in output and REDACTED in output
    lines = [json.loads(line) for line in output.splitlines()]
    assert "RuntimeError" in lines[0]["exception"] and lines[0]["nested"] == {"list": [f"x{REDACTED}x"]}


def test_console_format_is_scrubbed_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "console", [SECRET])
    structlog.get_logger("test").info("hello", token=SECRET)
    output = capsys.readouterr().err
    assert "hello" in output and SECRET not in output
