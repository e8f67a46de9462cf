"""The triggers that keep `ledger_rollup` (storage.models.LedgerRollup) in step with the
ledger, for SQLite and PostgreSQL. Used by migrations 0005 and 0007; kept here so that a
test can check the rollup against aggregates computed from the rows themselves."""

from __future__ import annotations

from collections.abc import Callable

LAG_LINEAR_UNTIL_MS = 100
LAG_STEP = 1.01
LAG_LIMIT_MS = 10**11  # about three years; larger lags share the last bucket


# the report's histogram edges are bucket edges too, so a histogram bar holds whole buckets
HISTOGRAM_EDGES_MS = (1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000)


def lag_bucket_bounds() -> list[int]:
    bounds = list(range(LAG_LINEAR_UNTIL_MS))
    while bounds[-1] < LAG_LIMIT_MS:
        bounds.append(max(bounds[-1] + 1, int(bounds[-1] * LAG_STEP + 0.999999)))
    return sorted(set(bounds) | set(HISTOGRAM_EDGES_MS))


# a lag below 0 (clock skew; never written by the daemon) counts in the first bucket
_BUCKET = "COALESCE((SELECT max(lower_ms) FROM lag_bucket WHERE lower_ms <= {lag}), 0)"

# -- SQLite: one writer at a time: the rollup itself, updated in place -------------------------------------------

_SQLITE_ADD = """
INSERT INTO ledger_rollup (metric, key, count, whole, nanos)
SELECT '{metric}', {key}, {sign}1, {sign}({whole}), {sign}({nanos}) WHERE {when}
ON CONFLICT (metric, key) DO UPDATE SET
  count = count + excluded.count, whole = whole + excluded.whole, nanos = nanos + excluded.nanos;
"""


def _sqlite_delta(row: str, sign: str) -> str:
    status = _SQLITE_ADD.format(metric="delta_status", key=f"{row}.status", sign=sign,
                                whole=f"{row}.amount / 1000000000", nanos=f"{row}.amount % 1000000000", when="1")
    lag = _SQLITE_ADD.format(metric="lag_bucket", key="CAST(" + _BUCKET.format(lag=f"{row}.verification_lag_ms") + " AS TEXT)",
                             sign=sign, whole="0", nanos="0", when=f"{row}.verification_lag_ms IS NOT NULL")
    return status + lag


def _sqlite_event(row: str, sign: str) -> str:
    return _SQLITE_ADD.format(metric="event_outcome", key=f"{row}.outcome", sign=sign, whole="0", nanos="0", when="1")


SQLITE_TRIGGERS = [
    f"CREATE TRIGGER rollup_delta_insert AFTER INSERT ON local_delta BEGIN {_sqlite_delta('NEW', '')} END",
    f"CREATE TRIGGER rollup_delta_delete AFTER DELETE ON local_delta BEGIN {_sqlite_delta('OLD', '-')} END",
    "CREATE TRIGGER rollup_delta_update AFTER UPDATE OF status, amount, verification_lag_ms ON local_delta "
    "WHEN OLD.status IS NOT NEW.status OR OLD.amount IS NOT NEW.amount OR OLD.verification_lag_ms IS NOT NEW.verification_lag_ms "
    f"BEGIN {_sqlite_delta('OLD', '-')} {_sqlite_delta('NEW', '')} END",
    f"CREATE TRIGGER rollup_event_insert AFTER INSERT ON webhook_event BEGIN {_sqlite_event('NEW', '')} END",
    f"CREATE TRIGGER rollup_event_delete AFTER DELETE ON webhook_event BEGIN {_sqlite_event('OLD', '-')} END",
    "CREATE TRIGGER rollup_event_update AFTER UPDATE OF outcome ON webhook_event WHEN OLD.outcome IS NOT NEW.outcome "
    f"BEGIN {_sqlite_event('OLD', '-')} {_sqlite_event('NEW', '')} END",
]
SQLITE_DROP = [f"DROP TRIGGER IF EXISTS {name}" for name in (
    "rollup_delta_insert", "rollup_delta_delete", "rollup_delta_update",
    "rollup_event_insert", "rollup_event_delete", "rollup_event_update")]

# -- PostgreSQL: an append-only journal, folded into the rollup now and then -------------
# Updating one rollup row per write would serialise concurrent writers on a hot row, and
# PostgreSQL slows down quadratically when one transaction updates the same row thousands
# of times (each new version is found by walking the old ones). Appending a journal row
# costs neither; the report adds the journal to the rollup, and a job folds it in.

def _pg_journal(metric: str, key: str, sign: str, whole: str = "0", nanos: str = "0") -> str:
    return f"""
    INSERT INTO ledger_rollup_journal (metric, key, count, whole, nanos)
    VALUES ('{metric}', {key}, {sign}1, {sign}({whole}), {sign}({nanos}));"""


def _pg_delta(row: str, sign: str) -> str:
    lag = _pg_journal("lag_bucket", _BUCKET.format(lag=f"{row}.verification_lag_ms") + "::text", sign)
    return (_pg_journal("delta_status", f"{row}.status", sign, f"trunc({row}.amount)::bigint",
                        f"(({row}.amount - trunc({row}.amount)) * 1000000000)::bigint")
            + f"\n    IF {row}.verification_lag_ms IS NOT NULL THEN {lag}\n    END IF;")


def _pg_event(row: str, sign: str) -> str:
    return _pg_journal("event_outcome", f"{row}.outcome", sign)


def _pg_function(name: str, body: Callable[[str, str], str]) -> str:
    return f"""
CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') THEN {body("OLD", "-")}
  END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') THEN {body("NEW", "")}
  END IF;
  RETURN NULL;
END $$"""


POSTGRES_TRIGGERS = [
    _pg_function("pacrecon_rollup_delta", _pg_delta),
    _pg_function("pacrecon_rollup_event", _pg_event),
    "CREATE TRIGGER rollup_local_delta_insert_delete AFTER INSERT OR DELETE ON local_delta "
    "FOR EACH ROW EXECUTE FUNCTION pacrecon_rollup_delta()",
    "CREATE TRIGGER rollup_local_delta_update AFTER UPDATE OF status, amount, verification_lag_ms ON local_delta FOR EACH ROW "
    "WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.amount IS DISTINCT FROM NEW.amount "
    "OR OLD.verification_lag_ms IS DISTINCT FROM NEW.verification_lag_ms) EXECUTE FUNCTION pacrecon_rollup_delta()",
    "CREATE TRIGGER rollup_webhook_event_insert_delete AFTER INSERT OR DELETE ON webhook_event "
    "FOR EACH ROW EXECUTE FUNCTION pacrecon_rollup_event()",
    "CREATE TRIGGER rollup_webhook_event_update AFTER UPDATE OF outcome ON webhook_event FOR EACH ROW "
    "WHEN (OLD.outcome IS DISTINCT FROM NEW.outcome) EXECUTE FUNCTION pacrecon_rollup_event()",
]

# -- PostgreSQL since 0007: inserted and deleted rows journaled per statement ------------
# A row trigger appends one journal row per row written: a batch of 50 webhooks inserted
# in one statement made 50 journal rows (heap, index, sequence), and the fold moved them all
# again. A statement trigger sees the statement's rows as a transition table and appends
# one row per (metric, key) they touch. Updates keep their row triggers: PostgreSQL allows
# no column list with a transition table, so a statement trigger would run for every
# UPDATE of the table, and the ledger's updates go one row per execution anyway.

def _pg_statement_journal(metric: str, key: str, rows: str, whole: str | None = None, nanos: str | None = None) -> str:
    sums = ", ".join(f"direction * sum({column})" if column else "0" for column in (whole, nanos))
    return f"""
    INSERT INTO ledger_rollup_journal (metric, key, count, whole, nanos)
    SELECT '{metric}', {key}, direction * count(*), {sums} FROM {rows} GROUP BY 2;"""


def _pg_statement_function(name: str, journal: str) -> str:
    return f"""
CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  direction bigint := CASE TG_OP WHEN 'DELETE' THEN -1 ELSE 1 END;
BEGIN {journal}
  RETURN NULL;
END $$"""


_STATEMENT_DELTAS = (
    _pg_statement_journal("delta_status", "status", "changed", "trunc(amount)::bigint",
                          "((amount - trunc(amount)) * 1000000000)::bigint")
    + _pg_statement_journal("lag_bucket", "bucket",
                            f"(SELECT {_BUCKET.format(lag='verification_lag_ms')}::text AS bucket FROM changed"
                            " WHERE verification_lag_ms IS NOT NULL) AS lags")
)
_STATEMENT_EVENTS = _pg_statement_journal("event_outcome", "outcome", "changed")
_ROW_INSERT_DELETE = [  # 0005's, replaced by 0007
    ("local_delta", "rollup_local_delta_insert_delete", "pacrecon_rollup_delta"),
    ("webhook_event", "rollup_webhook_event_insert_delete", "pacrecon_rollup_event"),
]

_STATEMENT_FUNCTIONS = {"local_delta": "pacrecon_rollup_delta_rows", "webhook_event": "pacrecon_rollup_event_rows"}
# one event a trigger: PostgreSQL refuses a transition table on a trigger of two
_STATEMENT_TRIGGERS = [(f"rollup_{table}_{verb.lower()}", table, verb, side)
                       for table in _STATEMENT_FUNCTIONS for verb, side in (("INSERT", "NEW"), ("DELETE", "OLD"))]

POSTGRES_STATEMENT_TRIGGERS = [
    *(f"DROP TRIGGER {trigger} ON {table}" for table, trigger, _ in _ROW_INSERT_DELETE),
    _pg_statement_function(_STATEMENT_FUNCTIONS["local_delta"], _STATEMENT_DELTAS),
    _pg_statement_function(_STATEMENT_FUNCTIONS["webhook_event"], _STATEMENT_EVENTS),
    *(f"CREATE TRIGGER {trigger} AFTER {verb} ON {table} REFERENCING {side} TABLE AS changed "
      f"FOR EACH STATEMENT EXECUTE FUNCTION {_STATEMENT_FUNCTIONS[table]}()"
      for trigger, table, verb, side in _STATEMENT_TRIGGERS),
]
POSTGRES_STATEMENT_DROP = [
    *(f"DROP TRIGGER {trigger} ON {table}" for trigger, table, _, _ in _STATEMENT_TRIGGERS),
    *(f"DROP FUNCTION {function}()" for function in _STATEMENT_FUNCTIONS.values()),
    *(f"CREATE TRIGGER {trigger} AFTER INSERT OR DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()"
      for table, trigger, function in _ROW_INSERT_DELETE),
]

POSTGRES_DROP = [
    "DROP TRIGGER IF EXISTS rollup_local_delta_insert_delete ON local_delta",
    "DROP TRIGGER IF EXISTS rollup_local_delta_update ON local_delta",
    "DROP TRIGGER IF EXISTS rollup_webhook_event_insert_delete ON webhook_event",
    "DROP TRIGGER IF EXISTS rollup_webhook_event_update ON webhook_event",
    "DROP FUNCTION IF EXISTS pacrecon_rollup_delta()",
    "DROP FUNCTION IF EXISTS pacrecon_rollup_event()",
]

# the rollup computed from the rows: the migration's starting point, and the tests' reference
def backfill_sql(dialect: str) -> list[str]:
    if dialect == "sqlite":
        whole, nanos = "amount / 1000000000", "amount % 1000000000"
    else:
        whole, nanos = "trunc(amount)::bigint", "((amount - trunc(amount)) * 1000000000)::bigint"
    return [
        "INSERT INTO ledger_rollup (metric, key, count, whole, nanos) "
        f"SELECT 'delta_status', status, count(*), coalesce(sum({whole}), 0), coalesce(sum({nanos}), 0) FROM local_delta GROUP BY status",
        "INSERT INTO ledger_rollup (metric, key, count, whole, nanos) "
        "SELECT 'lag_bucket', CAST(b AS TEXT), count(*), 0, 0 FROM "
        f"(SELECT {_BUCKET.format(lag='verification_lag_ms')} AS b FROM local_delta WHERE verification_lag_ms IS NOT NULL) AS lags GROUP BY b",
        "INSERT INTO ledger_rollup (metric, key, count, whole, nanos) "
        "SELECT 'event_outcome', outcome, count(*), 0, 0 FROM webhook_event GROUP BY outcome",
    ]


# PostgreSQL: move the journal into the rollup. Concurrent folds each take the rows they
# deleted; keys are upserted in one order, so two folds wait for each other, never deadlock.
POSTGRES_FOLD = """
WITH moved AS (DELETE FROM ledger_rollup_journal RETURNING metric, key, count, whole, nanos)
INSERT INTO ledger_rollup (metric, key, count, whole, nanos)
SELECT metric, key, sum(count), sum(whole), sum(nanos) FROM moved GROUP BY metric, key ORDER BY metric, key
ON CONFLICT (metric, key) DO UPDATE SET
  count = ledger_rollup.count + excluded.count,
  whole = ledger_rollup.whole + excluded.whole,
  nanos = ledger_rollup.nanos + excluded.nanos
"""
