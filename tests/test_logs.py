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


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_secret_is_scrubbed_wherever_the_line_holds_it(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    awkward = 'sk_"quoted"\\back\u00e9\u2603'  # JSON and repr() escape it: each form is searched for
    configure_logging("info", fmt, [SECRET, awkward])
    log = structlog.get_logger("test")
    log.info("as_key", **{SECRET: 1})
    log.info("awkward", value=awkward, nested={"list": [awkward, ("x", SECRET)]}, number=2**70)  # json.dumps fallback
    logging.getLogger("uvicorn.error").warning("stdlib %s %r", awkward, {"k": awkward})
    output = capsys.readouterr().err
    as_repr = repr(awkward)[1:-1]
    escaped = {form for text in (awkward, as_repr) for form in (text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1])}
    assert SECRET not in output and not any(form in output for form in escaped)
    assert output.count(REDACTED) >= 6 and "as_key" in output and "awkward" in output
    if fmt == "json":
        lines = [json.loads(line) for line in output.splitlines()]
        assert lines[0][REDACTED] == 1 and lines[1]["number"] == 2**70
        assert lines[1]["nested"] == {"list": [REDACTED, ["x", REDACTED]]}
