"""ledger rollup: running aggregates kept by triggers

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 10:25:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

from storage.rollup_sql import (
    POSTGRES_DROP,
    POSTGRES_TRIGGERS,
    SQLITE_DROP,
    SQLITE_TRIGGERS,
    backfill_sql,
    lag_bucket_bounds,
)

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('lag_bucket',
    sa.Column('lower_ms', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.PrimaryKeyConstraint('lower_ms')
    )
    op.create_table('ledger_rollup',
    sa.Column('metric', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.Column('whole', sa.BigInteger(), nullable=False),
    sa.Column('nanos', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('metric', 'key')
    )
    op.create_table('ledger_rollup_journal',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('metric', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.Column('whole', sa.BigInteger(), nullable=False),
    sa.Column('nanos', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    bucket = sa.table('lag_bucket', sa.column('lower_ms', sa.BigInteger()))
    op.bulk_insert(bucket, [{'lower_ms': b} for b in lag_bucket_bounds()])
    dialect = op.get_bind().dialect.name
    # the backfill and the triggers in one transaction, writers held off: no change falls between them
    if dialect != 'sqlite':
        op.execute("LOCK TABLE local_delta, webhook_event IN SHARE ROW EXCLUSIVE MODE")
    for statement in backfill_sql(dialect):
        op.execute(statement)
    for statement in (SQLITE_TRIGGERS if dialect == 'sqlite' else POSTGRES_TRIGGERS):
        op.execute(statement)


def downgrade() -> None:
    for statement in (SQLITE_DROP if op.get_bind().dialect.name == 'sqlite' else POSTGRES_DROP):
        op.execute(statement)
    op.drop_table('ledger_rollup_journal')
    op.drop_table('ledger_rollup')
    op.drop_table('lag_bucket')
