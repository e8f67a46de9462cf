"""deploy/prometheus/alerts.yaml names only metrics a real daemon exports, with their labels."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import migrated_sqlite_url
from tests.daemon import Daemon

ALERTS = Path(__file__).parent.parent / "deploy" / "prometheus" / "alerts.yaml"
# the metrics and labels the daemon exports (issue 6), which the rules are written against
EXPECTED: dict[str, set[str]] = {
    "pacrecon_webhooks_received_total": {"outcome"},
    "pacrecon_webhooks_rejected_total": {"reason"},
    "pacrecon_webhook_handling_seconds": set(),
    "pacrecon_deltas": {"status"},
    "pacrecon_open_discrepancies": {"kind"},
    "pacrecon_reconciliation_runs_total": {"status"},
    "pacrecon_reconciliation_run_duration_seconds": set(),
    "pacrecon_last_completed_reconciliation_timestamp_seconds": set(),
    "pacrecon_upstream_requests_total": {"endpoint", "status"},
}
GROUPING = {"instance", "job", "pod", "namespace"}  # added by Prometheus' scrape, not by us
SELECTOR = re.compile(r"\b(pacrecon_[a-z_]+)\s*(\{[^}]*\})?")
LABEL = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
AGGREGATION = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def expressions() -> list[tuple[str, str]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [(rule["alert"], rule["expr"]) for group in document["groups"] for rule in group["rules"]]


def exported_names(exposition: str) -> set[str]:
    """Every name a PromQL selector may use: samples, and families declared without samples yet."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")
            if kind in ("histogram", "summary"):
                names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def test_exported_names_reads_families_without_samples_yet() -> None:
    exposition = "\n".join([
        "# HELP pacrecon_webhooks_rejected_total Rejected.",
        "# TYPE pacrecon_webhooks_rejected_total counter",
        "# TYPE pacrecon_webhook_handling_seconds histogram",
        'pacrecon_webhook_handling_seconds_bucket{le="0.1"} 3.0',
        'pacrecon_deltas{status="PENDING"} 2.0',
    ])
    assert exported_names(exposition) == {
        "pacrecon_webhooks_rejected_total", "pacrecon_webhook_handling_seconds", "pacrecon_webhook_handling_seconds_bucket",
        "pacrecon_webhook_handling_seconds_sum", "pacrecon_webhook_handling_seconds_count", "pacrecon_deltas",
    }


def test_the_rules_cover_what_the_issue_asks_for() -> None:
    named = {name for _, expr in expressions() for name, _ in SELECTOR.findall(expr)}
    assert {"pacrecon_open_discrepancies", "pacrecon_last_completed_reconciliation_timestamp_seconds",
            "pacrecon_webhooks_rejected_total", "pacrecon_webhooks_received_total"} <= named
    assert any('outcome="unavailable"' in expr for _, expr in expressions())


@pytest.mark.parametrize(("alert", "expr"), expressions())
def test_each_rule_uses_known_metrics_and_labels(alert: str, expr: str) -> None:
    selectors = SELECTOR.findall(expr)
    assert selectors, f"{alert} names no pacrecon metric"
    for name, matchers in selectors:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert base in EXPECTED, f"{alert}: {name} is not a metric the daemon exports"
        unknown = set(LABEL.findall(matchers)) - EXPECTED[base]
        assert not unknown, f"{alert}: {name} has no label {unknown}"
    allowed = set().union(*(EXPECTED[re.sub(r"_(bucket|sum|count)$", "", n)] for n, _ in selectors)) | GROUPING
    for grouping in AGGREGATION.findall(expr):
        labels = {label.strip() for label in grouping.split(",") if label.strip()}
        assert labels <= allowed, f"{alert}: groups by unknown labels {labels - allowed}"


@pytest.fixture(scope="module")
def metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Response]:
    workdir = tmp_path_factory.mktemp("alerts")
    daemon = Daemon(migrated_sqlite_url(workdir / "ledger.db"), workdir).start()
    try:
        response = httpx.get(f"{daemon.url}/metrics", timeout=10)
    finally:
        assert daemon.stop() == 0
    yield response


def test_every_metric_the_rules_name_is_exported_by_a_running_daemon(metrics: httpx.Response) -> None:
    assert metrics.status_code == 200, f"GET /metrics answered {metrics.status_code}"
    exported = exported_names(metrics.text)
    for alert, expr in expressions():
        for name, _ in SELECTOR.findall(expr):
            assert name in exported, f"{alert}: {name} is not in the daemon's /metrics"
    missing = {name for name in EXPECTED if name not in exported and name + "_bucket" not in exported}
    assert not missing, f"the daemon does not export {sorted(missing)}"
