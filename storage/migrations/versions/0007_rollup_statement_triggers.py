"""PostgreSQL: rows inserted or deleted are journaled for the rollup once per statement

0005's row triggers appended one `ledger_rollup_journal` row per row inserted or deleted:
a batch of webhooks inserted in one statement wrote as many journal rows again, and the
fold moved them all a second time, in one transaction every 10 s (bench/RESULTS.md).
Statement triggers read the statement's rows as a transition table and append one row per
(metric, key) touched. Updates keep 0005's row triggers. SQLite is unchanged (its triggers
update the rollup in place; it has no statement triggers).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 11:00:00
"""
from collections.abc import Sequence

from alembic import op

from storage.rollup_sql import POSTGRES_STATEMENT_DROP, POSTGRES_STATEMENT_TRIGGERS

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# One transaction: no write falls between the old triggers and the new. Both tables are
# locked first, in the order the ledger's writers take them (deltas, then events), so a
# writer holding the deltas finishes before the migration goes on. A transaction taking
# them the other way round can deadlock with it; PostgreSQL then aborts one of the two
# (run the migration again; a webhook answered 503 is delivered again). Readers and
# writers wait for the migration; the engine's lock_timeout bounds its own wait.
LOCK = "LOCK TABLE local_delta, webhook_event IN ACCESS EXCLUSIVE MODE"


def upgrade() -> None:
    if op.get_bind().dialect.name != 'sqlite':
        for statement in (LOCK, *POSTGRES_STATEMENT_TRIGGERS):
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'sqlite':
        for statement in (LOCK, *POSTGRES_STATEMENT_DROP):
            op.execute(statement)
