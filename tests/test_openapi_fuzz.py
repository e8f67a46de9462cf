"""Schemathesis over the daemon's own /openapi.json, with valid credentials: no 5xx, and
every answer as the document says (status, content type, headers, body schema)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import migrated_sqlite_url
from tests.daemon import SANDBOX_KEY, Daemon, SandboxProcess

TOKEN = "fuzz_token_both_apis"
CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance", "negative_data_rejection", "unsupported_method", "allow_header_conformance",
    "missing_required_header",
])


@pytest.mark.skipif(shutil.which("st", path=str(Path(sys.executable).parent)) is None, reason="schemathesis is not installed")
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    sandbox = SandboxProcess(tmp_path, "--verify-delay", "0.2").start()
    daemon = Daemon(migrated_sqlite_url(tmp_path / "fuzz.db"), tmp_path, PACRECON_API_TOKEN=TOKEN, PACRECON_ADMIN_TOKEN=TOKEN,
                    PACRECON_PACSPACE_BASE_URL=sandbox.url, PACRECON_PACSPACE_API_KEY=SANDBOX_KEY).start()
    try:
        run = subprocess.run(
            [str(Path(sys.executable).parent / "st"), "run", f"{daemon.url}/openapi.json", "-H", f"Authorization: Bearer {TOKEN}",
             "-c", CHECKS, "-n", "40", "--generation-deterministic", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
    finally:
        assert daemon.stop() == 0
        assert sandbox.stop() == 0
    summary = run.stdout[-4000:]
    assert run.returncode == 0, summary
    generated = re.search(r"(\d+) generated", summary)
    assert generated and int(generated[1]) >= 300, summary  # it really exercised the API
    assert "Traceback" not in daemon.log_text()
