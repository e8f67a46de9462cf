"""The report as one self-contained HTML page: inline CSS and server-drawn SVG charts,
nothing fetched from anywhere (it must work on an offline host)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from html import escape
from typing import Any

# the page may load nothing at all: no script, no font, no image from outside
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2433;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.verdict{padding:10px 14px;border-radius:6px;margin:12px 0;font-weight:600}
.ok{background:#e6f4ea;color:#14532d}.bad{background:#fdecea;color:#7f1d1d}
table{border-collapse:collapse;margin:4px 0}td,th{padding:4px 10px;border-bottom:1px solid #e3e6ec;text-align:left}
th{background:#f5f6f8;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:32px}.muted{color:#667085}code{font-size:12px}
svg text{font:11px system-ui,sans-serif;fill:#1d2433}
"""


def render_report_html(report: dict[str, Any]) -> str:
    summary = report["summary"]
    ok = summary["all_accounted_for"]
    verdict = "Every delta is accounted for." if ok else (
        f"{summary['unsettled']} deltas not settled yet, {summary['open_discrepancies']} open discrepancies.")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>pacrecon reconciliation report</title><style>{_STYLE}</style></head><body>",
        "<h1>Reconciliation report</h1>",
        f"<div class=muted>generated {_text(report['generated_at'])}{_filters(report['filters'])}</div>",
        f"<div id=verdict class='verdict {'ok' if ok else 'bad'}'>{escape(verdict)}</div>",
        "<div class=grid><div><h2>Deltas by status</h2>",
        _table(["status", "deltas", "amount"],
               [[s, t["count"], t["amount"]] for s, t in report["totals"].items()], table_id="totals"),
        "</div><div><h2>Open discrepancies by kind</h2>",
        _table(["kind", "open"], [[k, n] for k, n in report["discrepancies"]["open_by_kind"].items()], table_id="open-by-kind"),
        "</div><div><h2>Last reconciliation run</h2>", _run(report["last_run"]), "</div></div>",
        "<div class=grid><div><h2>Emit to verified</h2>", _lag(report["lag"]), "</div>",
        "<div><h2>Discrepancies found per day</h2>", _per_day_chart(report["discrepancies"]["per_day"]), "</div>",
        "<div><h2>Webhooks</h2>", _webhooks(report["webhooks"]), "</div></div>",
        "<h2>Open discrepancies</h2>",
        _table(
            ["id", "kind", "subject", "anchor", "customer", "field", "ours", "PacSpace's", "seen", "last seen"],
            [[r["id"], r["kind"], r["subject"], r["anchor_id"], r["customer_id"], *(_evidence(r, k) for k in ("field", "ours", "theirs")),
              r["occurrences"], r["last_seen_at"]] for r in report["discrepancies"]["rows"]],
            table_id="discrepancies",
        ),
        _more(report["discrepancies"]["next_cursor"], "discrepancy_cursor"),
        "<h2>Customers</h2>",
        _table(
            ["customer", "deltas", "local amount", "verified deltas", "verified amount", "not yet verified"],
            [[c["customer_id"], c["deltas"], c["local_amount"], c["verified_deltas"], c["verified_amount"], c["unverified_amount"]]
             for c in report["customers"]["rows"]],
            table_id="customers",
        ),
        _more(report["customers"]["next_cursor"], "customer_cursor"),
        "</body></html>",
    ]
    return "".join(parts)


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        return escape(value.isoformat(timespec="seconds"))
    return escape(str(value))


def _filters(filters: dict[str, Any]) -> str:
    shown = [f"{k} = {_text(v)}" for k, v in filters.items() if v is not None]
    return f"; {', '.join(shown)}" if shown else ""


def _table(header: list[str], rows: list[list[Any]], table_id: str) -> str:
    if not rows:
        return f"<p id={table_id} class=muted>none</p>"
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class=n>{_text(c)}</td>" if isinstance(c, (int, Decimal)) else f"<td>{_text(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table id={table_id}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _evidence(row: dict[str, Any], key: str) -> str:
    value = (row.get("evidence") or {}).get(key)
    text = "" if value is None else str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _more(cursor: str | None, parameter: str) -> str:
    return f"<p class=muted>more: add <code>{escape(parameter)}={escape(cursor)}</code> to the address</p>" if cursor else ""


def _run(run: dict[str, Any] | None) -> str:
    if run is None:
        return "<p class=muted>none yet</p>"
    found = ", ".join(f"{k} {v}" for k, v in (run["found"] or {}).items()) or "nothing"
    return _table(["", ""], [["run", f"#{run['id']} {run['status']}"], ["started", run["started_at"]],
                             ["duration (s)", run["duration_seconds"]], ["checked", run["checked"]],
                             ["fixed", run["fixed"]], ["errors", run["errors"]], ["found", found]], table_id="last-run")


def _webhooks(hooks: dict[str, Any]) -> str:
    rows = [["recorded", hooks["received"]], ["duplicates", hooks["duplicates"]], ["orphans waiting", hooks["orphans_waiting"]],
            ["refused: ledger unavailable", hooks["unavailable"]], ["rejected", hooks["rejected"]]]
    rows += [[f"rejected: {reason}", n] for reason, n in hooks["rejected_by_reason"].items()]
    return _table(["", ""], rows, table_id="webhooks")


def _lag(lag: dict[str, Any]) -> str:
    facts = f"<p>{lag['verified']} verified; p50 {_text(lag['p50_seconds'])} s, p95 {_text(lag['p95_seconds'])} s, " \
            f"p99 {_text(lag['p99_seconds'])} s, max {_text(lag['max_seconds'])} s</p>"
    bars = [(f"< {_seconds_label(b['below_seconds'])}" if b["below_seconds"] is not None else "more", b["count"]) for b in lag["histogram"]]
    return facts + _bar_chart(bars, "lag-chart", "deltas by time from emit to verified")


def _seconds_label(seconds: Decimal) -> str:
    value = float(seconds)
    return f"{value / 3600:g} h" if value >= 3600 else f"{value / 60:g} min" if value >= 60 else f"{value:g} s"


def _per_day_chart(days: list[dict[str, Any]]) -> str:
    return _bar_chart([(d["day"][5:], d["found"]) for d in days], "discrepancy-chart",
                      "discrepancies first seen per day (last 30 days)", highlight=[d["still_open"] for d in days])


def _bar_chart(bars: list[tuple[str, int]], chart_id: str, title: str, highlight: list[int] | None = None) -> str:
    """Vertical bars with labels; `highlight` draws a darker part of each bar (e.g. still open)."""
    if not bars or not any(count for _, count in bars):
        return f"<p id={chart_id} class=muted>no data</p>"
    width, height, left, bottom = max(320, 46 * len(bars)), 180, 36, 40
    step = (width - left) / len(bars)
    top = max(count for _, count in bars)
    shapes = [f"<line x1={left} y1={height - bottom} x2={width} y2={height - bottom} stroke='#98a2b3'/>",
              f"<text x=2 y=12>{top}</text><text x=2 y={height - bottom}>0</text>"]
    for i, (label, count) in enumerate(bars):
        x = left + i * step + 3
        h = (height - bottom - 16) * count / top
        y = height - bottom - h
        shapes.append(f"<rect class=bar x={x:.1f} y={y:.1f} width={step - 6:.1f} height={h:.1f} fill='#7aa2f7'><title>{escape(label)}: {count}</title></rect>")
        if highlight is not None and highlight[i]:
            hh = (height - bottom - 16) * highlight[i] / top
            shapes.append(f"<rect x={x:.1f} y={height - bottom - hh:.1f} width={step - 6:.1f} height={hh:.1f} fill='#c2410c'/>")
        shapes.append(f"<text x={x + (step - 6) / 2:.1f} y={height - bottom + 14} text-anchor=middle>{escape(label)}</text>")
    return (f"<svg id={chart_id} role=img aria-label='{escape(title)}' width={width} height={height} "
            f"viewBox='0 0 {width} {height}' xmlns='http://www.w3.org/2000/svg'><title>{escape(title)}</title>{''.join(shapes)}</svg>")
