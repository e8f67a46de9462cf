"""PostgreSQL: rows inserted or deleted are journaled for the rollup once per statement

0005's row triggers appended one `ledger_rollup_journal` row per row inserted or deleted:
a batch of webhooks inserted in one statement wrote as many journal rows again, and the
fold moved them all a second time, in one transaction every few seconds (bench/RESULTS.md).
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


def upgrade() -> None:
    # one transaction: CREATE and DROP TRIGGER lock the tables, so no write falls between
    if op.get_bind().dialect.name != 'sqlite':
        for statement in POSTGRES_STATEMENT_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'sqlite':
        for statement in POSTGRES_STATEMENT_DROP:
            op.execute(statement)
