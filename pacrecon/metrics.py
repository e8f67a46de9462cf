"""Prometheus metrics: counters the daemon updates as it works, and gauges of the ledger
read at scrape time. One registry per app, so several apps in one process (tests) do
not share counters; one uvicorn worker per process, so one registry sees everything."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from storage.errors import StorageUnavailable
from storage.ledger import Ledger
from storage.report_queries import ReportFilter
from storage.session import LedgerSession
from storage.vocabulary import DeltaStatus, DiscrepancyKind

LEDGER_REFRESH_SECONDS = 10.0  # ledger gauges are re-read at most this often, however often it is scraped


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.webhooks_received = Counter("pacrecon_webhooks_received", "Webhook deliveries by outcome", ["outcome"], registry=r)
        self.webhooks_rejected = Counter("pacrecon_webhooks_rejected", "Webhook deliveries refused, by reason", ["reason"], registry=r)
        self.webhook_seconds = Histogram(
            "pacrecon_webhook_handling_seconds", "Time to handle one webhook delivery, durable commit included", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.deltas = Gauge("pacrecon_deltas", "Deltas in the ledger by status", ["status"], registry=r)
        self.open_discrepancies = Gauge("pacrecon_open_discrepancies", "Open discrepancies by kind", ["kind"], registry=r)
        self.runs = Counter("pacrecon_reconciliation_runs", "Reconciliation passes run by this process, by status", ["status"], registry=r)
        self.run_seconds = Histogram(
            "pacrecon_reconciliation_run_duration_seconds", "Duration of reconciliation passes", registry=r,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        self.last_completed = Gauge(
            "pacrecon_last_completed_reconciliation_timestamp_seconds",
            "Unix time the latest completed reconciliation pass (of any replica) finished; 0 if none", registry=r,
        )
        self.upstream = Counter("pacrecon_upstream_requests", "Requests to PacSpace by endpoint and answer", ["endpoint", "status"], registry=r)
        self.ledger_up = Gauge("pacrecon_ledger_up", "1 when the last read of the ledger's gauges succeeded", registry=r)
        self._received_by_outcome: dict[str, Any] = {}
        for status in DeltaStatus:
            self.deltas.labels(status.value)
        for kind in DiscrepancyKind:
            self.open_discrepancies.labels(kind.value)

    def webhook(self, outcome: str, reason: str, seconds: float) -> None:
        received = self._received_by_outcome.get(outcome)
        if received is None:  # a label lookup per webhook was a visible share of its cost
            received = self._received_by_outcome[outcome] = self.webhooks_received.labels(outcome)
        received.inc()
        if outcome == "rejected":
            self.webhooks_rejected.labels(reason or "unknown").inc()
        self.webhook_seconds.observe(seconds)

    def upstream_request(self, endpoint: str, status: str) -> None:
        self.upstream.labels(endpoint, status).inc()

    def run(self, status: str, seconds: float | None) -> None:
        self.runs.labels(status).inc()
        if seconds is not None:
            self.run_seconds.observe(seconds)


def _ledger_gauges(session: LedgerSession) -> tuple[dict[str, int], dict[str, int], float | None]:
    queries = session.report()
    finished = queries.latest_completed_run_finish()
    return queries.delta_counts(), queries.open_by_kind(ReportFilter()), finished.timestamp() if finished else None


@dataclass
class MetricsEndpoint:
    metrics: Metrics
    ledger: Ledger
    _read_at: float = field(default=float("-inf"))

    async def scrape(self, _: Request) -> Response:
        if time.monotonic() - self._read_at >= LEDGER_REFRESH_SECONDS:
            await self._refresh()
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _refresh(self) -> None:
        try:
            deltas, kinds, finished = await self.ledger.read(_ledger_gauges)
        except StorageUnavailable:
            self.metrics.ledger_up.set(0)  # the last values stay; the scrape itself still answers
            return
        self._read_at = time.monotonic()
        self.metrics.ledger_up.set(1)
        for status in DeltaStatus:
            self.metrics.deltas.labels(status.value).set(deltas.get(status.value, 0))
        for kind in DiscrepancyKind:
            self.metrics.open_discrepancies.labels(kind.value).set(kinds.get(kind.value, 0))
        self.metrics.last_completed.set(finished or 0)

    def routes(self) -> list[Route]:
        return [Route("/metrics", self.scrape, methods=["GET"])]
