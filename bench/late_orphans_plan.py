"""The plan of the query every reconciliation pass starts with (`orphans_with_a_delta`)
on a large PostgreSQL ledger: 1,000,000 deltas, 5,000 orphan events, 50,000 others.
tests/test_query_plans.py checks it on a small ledger, where PostgreSQL may hash the
deltas instead; this shows what it does at scale.

    flock /tmp/bench.lock .venv/bin/python bench/late_orphans_plan.py [ADMIN_URL]
"""
import sys, uuid
from datetime import UTC, datetime, timedelta
sys.path.insert(0, "/work/main/bench"); sys.path.insert(0, "/work/main")
import ledgers
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.engine import make_url
from storage.engine import make_engine
from storage.models import WebhookEvent
from storage.session import LedgerSession
admin = sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/test"
name = f"plan_{uuid.uuid4().hex[:8]}"
eng = make_engine(admin).execution_options(isolation_level="AUTOCOMMIT")
with eng.connect() as c: c.execute(text(f'CREATE DATABASE "{name}"'))
url = make_url(admin).set(database=name).render_as_string(hide_password=False)
try:
    now = datetime.now(UTC)
    ledgers.seed(url, ledgers.history(1_000_000, set(), now))
    e = make_engine(url)
    with e.begin() as c:
        rows = [dict(event_id=f"evt_{n}", event_type="delta.verified", raw_body=b"{}", signature_timestamp=0,
                     received_at=now - timedelta(hours=1), outcome="orphan", anchor_id=f"a_orphan_{n}") for n in range(5000)]
        rows += [dict(event_id=f"evt_ok_{n}", event_type="delta.verified", raw_body=b"{}", signature_timestamp=0,
                      received_at=now - timedelta(hours=1), outcome="applied", anchor_id=f"a_x{n}") for n in range(50000)]
        c.execute(WebhookEvent.__table__.insert(), rows)
    with e.connect() as c:
        c.execute(text("ANALYZE"))
        captured = []
        session = Session(bind=c)
        original = session.scalars
        session.scalars = lambda statement, *a, **k: captured.append(statement) or original(statement, *a, **k)  # type: ignore[method-assign]
        LedgerSession(session).orphans_with_a_delta(1000)  # the statement the pass runs, as it builds it
        sql = str(captured[-1].compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        for row in c.exec_driver_sql("EXPLAIN ANALYZE " + sql):
            print(row[0])
    e.dispose()
finally:
    with eng.connect() as c: c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
