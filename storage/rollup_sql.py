"""The triggers that keep `ledger_rollup` (storage.models.LedgerRollup) in step with the
ledger, for SQLite and PostgreSQL. Used by migration 0005; kept here so that a test can
check the rollup against aggregates computed from the rows themselves."""

from __future__ import annotations

LAG_LINEAR_UNTIL_MS = 100
LAG_STEP = 1.01
LAG_LIMIT_MS = 10**11  # about three years; larger lags share the last bucket


def lag_bucket_bounds() -> list[int]:
    bounds = list(range(LAG_LINEAR_UNTIL_MS))
    while bounds[-1] < LAG_LIMIT_MS:
        bounds.append(max(bounds[-1] + 1, int(bounds[-1] * LAG_STEP + 0.999999)))
    return bounds


_BUCKET = "(SELECT max(lower_ms) FROM lag_bucket WHERE lower_ms <= {lag})"

# -- SQLite: one writer at a time, one shard -------------------------------------------

_SQLITE_ADD = """
INSERT INTO ledger_rollup (metric, key, shard, count, whole, nanos)
SELECT '{metric}', {key}, 0, {sign}1, {sign}({whole}), {sign}({nanos}) WHERE {when}
ON CONFLICT (metric, key, shard) DO UPDATE SET
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

# -- PostgreSQL: a shard per writing connection ---------------------------------------------

POSTGRES_TRIGGERS = [
    """
CREATE FUNCTION pacrecon_rollup_add(p_metric text, p_key text, p_count bigint, p_whole bigint, p_nanos bigint)
RETURNS void LANGUAGE sql AS $$
  INSERT INTO ledger_rollup (metric, key, shard, count, whole, nanos)
  VALUES (p_metric, p_key, pg_backend_pid(), p_count, p_whole, p_nanos)
  ON CONFLICT (metric, key, shard) DO UPDATE SET
    count = ledger_rollup.count + excluded.count,
    whole = ledger_rollup.whole + excluded.whole,
    nanos = ledger_rollup.nanos + excluded.nanos
$$""",
    """
CREATE FUNCTION pacrecon_rollup_delta(r local_delta, sign bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pacrecon_rollup_add('delta_status', r.status, sign, sign * trunc(r.amount)::bigint,
                              sign * ((r.amount - trunc(r.amount)) * 1000000000)::bigint);
  IF r.verification_lag_ms IS NOT NULL THEN
    PERFORM pacrecon_rollup_add('lag_bucket',
      (SELECT max(lower_ms) FROM lag_bucket WHERE lower_ms <= r.verification_lag_ms)::text, sign, 0, 0);
  END IF;
END $$""",
    """
CREATE FUNCTION pacrecon_rollup_delta_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') THEN PERFORM pacrecon_rollup_delta(OLD, -1); END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') THEN PERFORM pacrecon_rollup_delta(NEW, 1); END IF;
  RETURN NULL;
END $$""",
    """
CREATE FUNCTION pacrecon_rollup_event_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') THEN PERFORM pacrecon_rollup_add('event_outcome', OLD.outcome, -1, 0, 0); END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') THEN PERFORM pacrecon_rollup_add('event_outcome', NEW.outcome, 1, 0, 0); END IF;
  RETURN NULL;
END $$""",
    "CREATE TRIGGER rollup_delta_insert_delete AFTER INSERT OR DELETE ON local_delta "
    "FOR EACH ROW EXECUTE FUNCTION pacrecon_rollup_delta_trigger()",
    "CREATE TRIGGER rollup_delta_update AFTER UPDATE OF status, amount, verification_lag_ms ON local_delta FOR EACH ROW "
    "WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.amount IS DISTINCT FROM NEW.amount "
    "OR OLD.verification_lag_ms IS DISTINCT FROM NEW.verification_lag_ms) EXECUTE FUNCTION pacrecon_rollup_delta_trigger()",
    "CREATE TRIGGER rollup_event_insert_delete AFTER INSERT OR DELETE ON webhook_event "
    "FOR EACH ROW EXECUTE FUNCTION pacrecon_rollup_event_trigger()",
    "CREATE TRIGGER rollup_event_update AFTER UPDATE OF outcome ON webhook_event FOR EACH ROW "
    "WHEN (OLD.outcome IS DISTINCT FROM NEW.outcome) EXECUTE FUNCTION pacrecon_rollup_event_trigger()",
]
POSTGRES_DROP = [
    "DROP TRIGGER IF EXISTS rollup_delta_insert_delete ON local_delta",
    "DROP TRIGGER IF EXISTS rollup_delta_update ON local_delta",
    "DROP TRIGGER IF EXISTS rollup_event_insert_delete ON webhook_event",
    "DROP TRIGGER IF EXISTS rollup_event_update ON webhook_event",
    "DROP FUNCTION IF EXISTS pacrecon_rollup_event_trigger()",
    "DROP FUNCTION IF EXISTS pacrecon_rollup_delta_trigger()",
    "DROP FUNCTION IF EXISTS pacrecon_rollup_delta(local_delta, bigint)",
    "DROP FUNCTION IF EXISTS pacrecon_rollup_add(text, text, bigint, bigint, bigint)",
]

# the rollup computed from the rows: the migration's starting point, and the tests' reference
def backfill_sql(dialect: str) -> list[str]:
    if dialect == "sqlite":
        whole, nanos = "amount / 1000000000", "amount % 1000000000"
    else:
        whole, nanos = "trunc(amount)::bigint", "((amount - trunc(amount)) * 1000000000)::bigint"
    return [
        "INSERT INTO ledger_rollup (metric, key, shard, count, whole, nanos) "
        f"SELECT 'delta_status', status, 0, count(*), coalesce(sum({whole}), 0), coalesce(sum({nanos}), 0) FROM local_delta GROUP BY status",
        "INSERT INTO ledger_rollup (metric, key, shard, count, whole, nanos) "
        "SELECT 'lag_bucket', CAST(b AS TEXT), 0, count(*), 0, 0 FROM "
        f"(SELECT {_BUCKET.format(lag='verification_lag_ms')} AS b FROM local_delta WHERE verification_lag_ms IS NOT NULL) AS lags GROUP BY b",
        "INSERT INTO ledger_rollup (metric, key, shard, count, whole, nanos) "
        "SELECT 'event_outcome', outcome, 0, count(*), 0, 0 FROM webhook_event GROUP BY outcome",
    ]


# PostgreSQL: fold the shards of connections that are gone into shard 0
POSTGRES_FOLD = """
WITH gone AS (
  DELETE FROM ledger_rollup
  WHERE shard <> 0 AND shard NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)
  RETURNING metric, key, count, whole, nanos
)
INSERT INTO ledger_rollup (metric, key, shard, count, whole, nanos)
SELECT metric, key, 0, sum(count), sum(whole), sum(nanos) FROM gone GROUP BY metric, key
ON CONFLICT (metric, key, shard) DO UPDATE SET
  count = ledger_rollup.count + excluded.count,
  whole = ledger_rollup.whole + excluded.whole,
  nanos = ledger_rollup.nanos + excluded.nanos
"""
