"""The admin surface of a real daemon with the sandbox as PacSpace: the report in JSON,
CSV and HTML, runs on demand, discrepancies and their resolution, metrics, OpenAPI."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from reconciler.report import ReportPage, build_report
from storage import jsonio
from storage.report_queries import ReportFilter
from storage.sql_ledger import SqlLedger
from tests.conftest import migrated_sqlite_url
from tests.daemon import SANDBOX_KEY, Daemon, SandboxProcess, clean_environment, pacrecon
from tests.webhooks import TEST_SECRET, envelope, sign

ADMIN = "admin_token_for_tests"
API = "api_token_for_tests"
AMOUNTS = [Decimal("-42.50"), Decimal("10.25"), Decimal("0.000000001"), Decimal("999999.99"), Decimal("-0.1")]


@dataclass
class Stack:
    daemon: Daemon
    sandbox: SandboxProcess
    url: str  # the ledger's
    admin: httpx.Client
    upstream: httpx.Client


def _settings(sandbox: SandboxProcess, **more: str) -> dict[str, str]:
    return {
        "PACRECON_PACSPACE_BASE_URL": sandbox.url,
        "PACRECON_PACSPACE_API_KEY": SANDBOX_KEY,
        "PACRECON_API_TOKEN": API,
        "PACRECON_ADMIN_TOKEN": ADMIN,
        "PACRECON_STALE_AFTER_SECONDS": "1",
        "PACRECON_RECONCILE_INTERVAL_SECONDS": "3600",  # passes only when asked
        **more,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("admin")
    url = migrated_sqlite_url(workdir / "ledger.db")
    sandbox = SandboxProcess(workdir, "--webhook-secret", TEST_SECRET, "--seed", "9", "--verify-delay", "0.2")
    daemon = Daemon(url, workdir, **_settings(sandbox))
    sandbox.args += ["--webhook-url", f"{daemon.url}/webhooks/pacspace"]
    sandbox.start()
    daemon.start()
    with httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as admin, sandbox.api() as upstream:
        yield Stack(daemon, sandbox, url, admin, upstream)
    assert daemon.stop() == 0
    assert sandbox.stop() == 0


def emit(stack: Stack, customer: str, amount: Decimal) -> str:
    answer = httpx.post(f"{stack.daemon.url}/v1/deltas", content=f'{{"customerId":"{customer}","delta":{amount},"reason":"usage"}}',
                        headers={"Authorization": f"Bearer {API}", "Content-Type": "application/json"}, timeout=15)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["anchorId"])


def wait_for(condition: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def ledger_rows(url: str, sql: str) -> list[Any]:
    ledger = SqlLedger.from_url(url)
    try:
        return ledger.read_sync(lambda s: list(s._session.execute(text(sql))))
    finally:
        ledger.close()


def run_now(stack: Stack) -> dict[str, Any]:
    started = stack.admin.post("/admin/reconciliation/runs")
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    assert started.json()["href"] == f"/admin/reconciliation/runs/{run_id}"
    wait_for(lambda: stack.admin.get(f"/admin/reconciliation/runs/{run_id}").json()["status"] != "running")
    return dict(stack.admin.get(f"/admin/reconciliation/runs/{run_id}").json())


@pytest.fixture(scope="module")
def history(stack: Stack) -> dict[str, Any]:
    """Five deltas verified by webhook, two whose webhooks are lost, one PacSpace answers
    with a wrong receipt; then one pass asked for through the admin API."""
    anchors = [emit(stack, f"cust_{n % 2}", amount) for n, amount in enumerate(AMOUNTS)]
    wait_for(lambda: ledger_rows(stack.url, "SELECT count(*) FROM local_delta WHERE status = 'VERIFIED'")[0][0] == 5)
    stack.upstream.patch("/_sandbox/faults", json={"drop_webhooks": 1}).raise_for_status()
    lost = [emit(stack, "cust_lost", Decimal("7.77")) for _ in range(2)]
    stack.upstream.patch("/_sandbox/faults", json={"drop_webhooks": 1, "corrupt_status_receipt": 1}).raise_for_status()
    stack.upstream.post("/_sandbox/flush").raise_for_status()
    time.sleep(1.2)  # older than STALE_AFTER_SECONDS
    # lookups of the first two lost ones must answer truthfully: corrupt only the last
    stack.upstream.patch("/_sandbox/faults", json={"drop_webhooks": 1}).raise_for_status()
    corrupt = emit(stack, "cust_bad", Decimal("3"))
    stack.upstream.post("/_sandbox/flush").raise_for_status()
    time.sleep(1.2)
    stack.upstream.patch("/_sandbox/faults", json={"drop_webhooks": 1, "corrupt_status_receipt": 1}).raise_for_status()
    run = run_now(stack)
    stack.upstream.put("/_sandbox/faults", json={}).raise_for_status()
    # the pass asked PacSpace to redeliver the failed webhooks: the corrupt one's own webhook
    # (whose receipt is right) settles it; the mismatch the pass saw stays open for a person
    wait_for(lambda: ledger_rows(stack.url, "SELECT count(*) FROM local_delta WHERE status = 'VERIFIED'")[0][0] == 8)
    wait_for(lambda: ledger_rows(stack.url, "SELECT count(*) FROM webhook_event")[0][0] == 8)  # all three redelivered
    return {"anchors": anchors, "lost": lost, "corrupt": corrupt, "run": run}


def test_admin_routes_refuse_a_missing_or_wrong_token(stack: Stack) -> None:
    for method, path in [("GET", "/admin/reconciliation/report"), ("POST", "/admin/reconciliation/runs"),
                         ("GET", "/admin/reconciliation/runs"), ("GET", "/admin/discrepancies"),
                         ("POST", "/admin/discrepancies/1/resolve"), ("GET", "/admin/reconciliation/runs/1")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"}, {"Authorization": f"Bearer {API}"}):
            answer = httpx.request(method, f"{stack.daemon.url}{path}", headers=headers, timeout=10)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized", (method, path, headers)


def test_a_pass_asked_for_fixes_lost_webhooks_and_reports_a_wrong_receipt(stack: Stack, history: dict[str, Any]) -> None:
    run = history["run"]
    assert run["status"] == "completed" and run["fixed"] == 2, run
    assert run["found"] == {"missing_webhook": 2, "receipt_mismatch": 1}
    statuses = ledger_rows(stack.url, "SELECT anchor_id, status, verified_by FROM local_delta")
    by_anchor = {a: (s, v) for a, s, v in statuses}
    assert all(by_anchor[a] == ("VERIFIED", "reconciler") for a in history["lost"])
    assert by_anchor[history["corrupt"]] == ("VERIFIED", "webhook")  # redelivered on the pass's request
    listed = stack.admin.get("/admin/reconciliation/runs").json()
    assert listed["runs"][0]["id"] == run["id"] and listed["next_cursor"] is None


def test_the_json_report_matches_the_ledger(stack: Stack, history: dict[str, Any]) -> None:
    answer = stack.admin.get("/admin/reconciliation/report")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    report = jsonio.loads(answer.content)
    rows = ledger_rows(stack.url, "SELECT status, amount, customer_id FROM local_delta")
    verified = [Decimal(a).scaleb(-9) for s, a, _ in rows if s == "VERIFIED"]
    assert report["totals"]["VERIFIED"] == {"count": 8, "amount": sum(verified)}
    assert sum(verified) == sum(AMOUNTS) + Decimal("18.54")  # exact, to the last 1e-9
    assert report["totals"]["QUEUED"]["count"] == 0 and report["summary"]["deltas"] == 8
    assert report["summary"]["unsettled"] == 0 and report["summary"]["all_accounted_for"] is False
    assert report["discrepancies"]["open_by_kind"]["receipt_mismatch"] == 1 and report["discrepancies"]["open"] == 1
    row = report["discrepancies"]["rows"][0]
    assert row["kind"] == "receipt_mismatch" and row["anchor_id"] == history["corrupt"]
    assert row["evidence"]["ours"] != row["evidence"]["theirs"] and row["evidence"]["theirs"]
    assert report["last_run"]["id"] == history["run"]["id"]
    assert report["lag"]["verified"] == 8 and report["lag"]["p50_seconds"] is not None
    assert report["lag"]["p50_seconds"] <= report["lag"]["p99_seconds"] <= report["lag"]["max_seconds"]
    assert report["webhooks"]["received"] == 8 and report["webhooks"]["orphans_waiting"] == 0
    customers = {c["customer_id"]: c for c in report["customers"]["rows"]}
    assert customers["cust_0"]["local_amount"] == AMOUNTS[0] + AMOUNTS[2] + AMOUNTS[4]
    assert customers["cust_bad"] == {"customer_id": "cust_bad", "deltas": 1, "local_amount": 3, "verified_deltas": 1,
                                        "verified_amount": 3, "unverified_amount": 0}
    assert customers["cust_lost"]["verified_amount"] == Decimal("15.54")
    one = jsonio.loads(stack.admin.get("/admin/reconciliation/report", params={"customer_id": "cust_1"}).content)
    assert one["totals"]["VERIFIED"] == {"count": 2, "amount": AMOUNTS[1] + AMOUNTS[3]}
    future = jsonio.loads(stack.admin.get("/admin/reconciliation/report", params={"since": "2999-01-01"}).content)
    assert future["summary"]["deltas"] == 0 and future["discrepancies"]["rows"] == []


def test_bad_report_parameters_are_400(stack: Stack) -> None:
    for params in ({"format": "xml"}, {"since": "yesterday"}, {"since": "2026-02-01", "until": "2026-01-01"},
                   {"discrepancy_limit": "0"}, {"discrepancy_limit": "abc"}, {"customer_limit": "100000"},
                   {"since": "0001-01-01T00:00:00+01:00"}, {"until": "9999-12-31T23:59:59-01:00"},  # past the calendar
                   {"discrepancy_cursor": "99999999999"}, {"customer_id": "a\x00b"}, {"customer_cursor": "x" * 301},
                   {"discrepancy_cursor": ""}):
        answer = stack.admin.get("/admin/reconciliation/report", params=params)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_parameter", params
    for path in ("/admin/reconciliation/runs/99999999999", "/admin/reconciliation/runs/2147483648"):
        assert stack.admin.get(path).status_code == 404  # beyond a row id: not found, not a database error
    assert stack.admin.get("/admin/reconciliation/runs", params={"cursor": "2147483648"}).status_code == 400
    assert stack.admin.post("/admin/discrepancies/99999999999/resolve", json={"note": "x"}).status_code == 404
    deep = stack.admin.post("/admin/discrepancies/1/resolve", content=b"[" * 60_000)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"


def test_the_csv_and_the_html_report(stack: Stack, history: dict[str, Any]) -> None:
    csv_answer = stack.admin.get("/admin/reconciliation/report", params={"format": "csv"})
    assert csv_answer.headers["content-type"].startswith("text/csv")
    lines = csv_answer.text.splitlines()
    assert lines[0].startswith("id,kind,status,subject") and len(lines) == 2 and ",receipt_mismatch,open," in lines[1]
    # every open row, whatever the page size of the JSON report
    assert stack.admin.get("/admin/reconciliation/report", params={"format": "csv", "discrepancy_limit": "1"}).text == csv_answer.text
    page = stack.admin.get("/admin/reconciliation/report", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "Reconciliation report" in page.text and "<svg id=lag-chart" in page.text and history["corrupt"] in page.text
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page.text)  # nothing from outside


def test_discrepancies_are_listed_filtered_and_resolved_with_a_note(stack: Stack, history: dict[str, Any]) -> None:
    listed = stack.admin.get("/admin/discrepancies", params={"kind": "receipt_mismatch"}).json()["discrepancies"]
    assert len(listed) == 1 and listed[0]["customer_id"] == "cust_bad"
    assert stack.admin.get("/admin/discrepancies", params={"customer_id": "cust_0"}).json()["discrepancies"] == []
    assert stack.admin.get("/admin/discrepancies", params={"kind": "nonsense"}).status_code == 400
    fixed = stack.admin.get("/admin/discrepancies", params={"status": "resolved", "kind": "missing_webhook"}).json()
    assert len(fixed["discrepancies"]) == 2  # the fixes are on record, born resolved
    target = listed[0]["id"]
    for body in (b"", b"{}", b'{"note": "  "}', b"not json", b'{"note": 5}'):
        refused = stack.admin.post(f"/admin/discrepancies/{target}/resolve", content=body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] in ("note_required", "invalid_json")
    assert stack.admin.post("/admin/discrepancies/999999/resolve", json={"note": "x"}).status_code == 404
    assert stack.admin.post("/admin/discrepancies/abc/resolve", json={"note": "x"}).status_code == 404
    resolved = stack.admin.post(f"/admin/discrepancies/{target}/resolve", json={"note": "PacSpace support confirmed receipt 0xabc"})
    assert resolved.status_code == 200 and resolved.json()["status"] == "resolved"
    again = stack.admin.post(f"/admin/discrepancies/{target}/resolve", json={"note": "again"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_open"
    audit = ledger_rows(stack.url, f"SELECT actor, action, note, discrepancy_id FROM audit_entry WHERE discrepancy_id = {target}")
    assert [tuple(a) for a in audit] == [("admin", "resolve", "PacSpace support confirmed receipt 0xabc", target)]
    after = jsonio.loads(stack.admin.get("/admin/reconciliation/report").content)
    assert after["discrepancies"]["open"] == 0


def test_metrics_count_what_happened(stack: Stack, history: dict[str, Any]) -> None:
    forged = sign(envelope())
    httpx.post(f"{stack.daemon.url}/webhooks/pacspace", content=forged.body + b" ", headers=forged.headers, timeout=10)
    metrics = httpx.get(f"{stack.daemon.url}/metrics", timeout=10).text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    assert values['pacrecon_webhooks_received_total{outcome="applied"}'] == 8
    assert values['pacrecon_webhooks_rejected_total{reason="invalid_signature"}'] >= 1
    assert values['pacrecon_webhook_handling_seconds_count'] >= 6
    assert values['pacrecon_deltas{status="VERIFIED"}'] == 8 and values['pacrecon_deltas{status="QUEUED"}'] == 0
    assert values['pacrecon_reconciliation_runs_total{status="completed"}'] >= 1
    assert values['pacrecon_reconciliation_run_duration_seconds_count'] >= 1
    assert values['pacrecon_last_completed_reconciliation_timestamp_seconds'] > time.time() - 600
    assert values['pacrecon_upstream_requests_total{endpoint="emit",status="200"}'] == 8
    assert values['pacrecon_upstream_requests_total{endpoint="delta_status",status="200"}'] >= 3
    assert 'pacrecon_open_discrepancies{kind="receipt_mismatch"}' in values


def test_the_openapi_document_describes_every_route_as_it_answers(stack: Stack, history: dict[str, Any]) -> None:
    document = httpx.get(f"{stack.daemon.url}/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.")
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method != "get" or "{" in path:
                continue
            headers = {"Authorization": f"Bearer {ADMIN if path.startswith('/admin') else API}"}
            answer = httpx.get(f"{stack.daemon.url}{path}", headers=headers, timeout=30)
            assert str(answer.status_code) in operation["responses"], (path, answer.status_code)
            documented = operation["responses"][str(answer.status_code)]
            media = answer.headers["content-type"].split(";")[0]
            assert media in documented.get("content", {media: {}}), (path, media)
            schema = documented.get("content", {}).get(media, {}).get("schema", {})
            if "$ref" in schema:
                schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
            for key in schema.get("required", []):
                assert key in answer.json(), (path, key)


def test_the_command_line_prints_the_same_report(stack: Stack, history: dict[str, Any], tmp_path: Path) -> None:
    env = clean_environment(PACRECON_DATABASE_URL=stack.url)
    as_json = pacrecon(["report", "--format", "json"], env, tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    printed, served = jsonio.loads(as_json.stdout), jsonio.loads(stack.admin.get("/admin/reconciliation/report").content)
    printed.pop("generated_at"), served.pop("generated_at")
    assert printed == served
    table = pacrecon(["report"], env, tmp_path)
    assert table.returncode == 0 and "VERIFIED" in table.stdout and "deltas" in table.stdout.splitlines()[0]
    as_csv = pacrecon(["report", "--format", "csv"], env, tmp_path)
    assert as_csv.stdout.splitlines()[0].startswith("id,kind,status")
    bad = pacrecon(["report", "--since", "never"], env, tmp_path)
    assert bad.returncode == 2 and "since" in bad.stderr and "Traceback" not in bad.stderr


def test_without_an_admin_token_the_admin_routes_are_off(tmp_path: Path) -> None:
    daemon = Daemon(migrated_sqlite_url(tmp_path / "off.db"), tmp_path).start()
    try:
        answer = httpx.get(f"{daemon.url}/admin/reconciliation/report", headers={"Authorization": "Bearer x"}, timeout=10)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "admin_disabled"
    finally:
        assert daemon.stop() == 0


def test_uncounted_deliveries_are_tallied_in_the_ledger_by_shutdown(tmp_path: Path) -> None:
    url = migrated_sqlite_url(tmp_path / "tally.db")
    daemon = Daemon(url, tmp_path).start()
    webhook = sign(envelope())
    for _ in range(3):
        httpx.post(f"{daemon.url}/webhooks/pacspace", content=webhook.body, headers=webhook.headers, timeout=10)
    httpx.post(f"{daemon.url}/webhooks/pacspace", content=webhook.body, headers={**webhook.headers, "X-PacSpace-Signature": "v1=00"}, timeout=10)
    assert daemon.stop() == 0  # the last tallies are written on the way out
    tallies = {(o, r): n for o, r, n in ledger_rows(url, "SELECT outcome, reason, count FROM webhook_tally")}
    assert tallies == {("duplicate", ""): 2, ("rejected", "invalid_signature"): 1}
    ledger = SqlLedger.from_url(url)
    try:
        report = ledger.read_sync(lambda s: build_report(s, ReportFilter(), ReportPage(), datetime.now(UTC)))
    finally:
        ledger.close()
    assert report["webhooks"] == {"received": 1, "orphans_waiting": 1, "duplicates": 2, "unavailable": 0,
                                        "rejected": 1, "rejected_by_reason": {"invalid_signature": 1}}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_the_html_report_renders_in_headless_chromium(stack: Stack, history: dict[str, Any], tmp_path: Path) -> None:
    accounted = jsonio.loads(stack.admin.get("/admin/reconciliation/report").content)["summary"]["all_accounted_for"]
    page = stack.admin.get("/admin/reconciliation/report", headers={"Accept": "text/html"})
    saved = tmp_path / "report.html"
    saved.write_bytes(page.content)
    shot = tmp_path / "report.png"
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1280,1600",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]  # any request to elsewhere would fail
    dom = subprocess.run([*browser, "--dump-dom", saved.as_uri()], capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="verdict"' in dom.stdout and "<svg" in dom.stdout and 'class="bar"' in dom.stdout
    assert dom.stdout.count("<tr>") >= 10  # totals, kinds, run, webhooks, customers rows were parsed as tables
    taken = subprocess.run([*browser, f"--screenshot={shot}", saved.as_uri()], capture_output=True, text=True, timeout=90)
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) >= 8  # text, table rules, bars: not a blank page
    drawn = {colour for _, colour in colours}
    band = (230, 244, 234) if accounted else (253, 236, 234)
    assert band in drawn and (122, 162, 247) in drawn  # the verdict's band, in its colour, and the chart's bars
