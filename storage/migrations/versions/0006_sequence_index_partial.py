"""local_delta: on SQLite, the (customer, sequence number) index holds numbered deltas only

A delta has no sequence number until it is verified. After an ANALYZE (`PRAGMA optimize`,
or an operator's), SQLite's statistics count every unnumbered delta of a customer as one
key of that index, and a customer with many unsettled deltas makes each lookup by number
look like a full scan: the planner then scans the table (measured: 40-64 ms instead of
0.1 ms on 600,000 unsettled deltas, for each batch of webhooks and each reconciler page).
Only equality lookups use the index, and they never look for a missing number. PostgreSQL
keeps the share of NULLs in its statistics apart: its index is unchanged.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 19:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NUMBERED = sa.text("sequence_number IS NOT NULL")
NAME, COLUMNS = 'ix_local_delta_customer_sequence', ['customer_id', 'sequence_number']


def upgrade() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        op.drop_index(NAME, table_name='local_delta')
        op.create_index(NAME, 'local_delta', COLUMNS, unique=False, sqlite_where=NUMBERED)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        op.drop_index(NAME, table_name='local_delta')
        op.create_index(NAME, 'local_delta', COLUMNS, unique=False)
