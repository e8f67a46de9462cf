"""report: verification lag, covering indexes for totals, webhook tallies

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 10:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import storage.types


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LAG_PREDICATE = sa.text("verification_lag_ms IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table('local_delta', schema=None) as batch_op:
        batch_op.add_column(sa.Column('verification_lag_ms', sa.BigInteger(), nullable=True))
    # deltas verified before this revision: their lag from the times already recorded
    if op.get_bind().dialect.name == 'sqlite':
        lag = "MAX(0, CAST(ROUND((julianday(verified_at) - julianday(COALESCE(emitted_at, created_at))) * 86400000) AS INTEGER))"
    else:
        lag = "GREATEST(0, CAST(ROUND(EXTRACT(EPOCH FROM verified_at - COALESCE(emitted_at, created_at)) * 1000) AS BIGINT))"
    # never negative, as apply.verification_lag_ms: PacSpace's receivedAt may be ahead of our clock
    op.execute(f"UPDATE local_delta SET verification_lag_ms = {lag} WHERE status = 'VERIFIED' AND verified_at IS NOT NULL")
    with op.batch_alter_table('local_delta', schema=None) as batch_op:
        batch_op.create_index('ix_local_delta_status_amount', ['status', 'amount'], unique=False)
        batch_op.create_index('ix_local_delta_customer_status_amount', ['customer_id', 'status', 'amount'], unique=False)
        batch_op.create_index('ix_local_delta_verification_lag', ['verification_lag_ms'], unique=False,
                              sqlite_where=LAG_PREDICATE, postgresql_where=LAG_PREDICATE)
    op.create_table('webhook_tally',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('hour', storage.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('webhook_tally', schema=None) as batch_op:
        batch_op.create_index('ux_webhook_tally_hour_outcome_reason', ['hour', 'outcome', 'reason'], unique=True)


def downgrade() -> None:
    op.drop_table('webhook_tally')
    with op.batch_alter_table('local_delta', schema=None) as batch_op:
        batch_op.drop_index('ix_local_delta_verification_lag', sqlite_where=LAG_PREDICATE, postgresql_where=LAG_PREDICATE)
        batch_op.drop_index('ix_local_delta_customer_status_amount')
        batch_op.drop_index('ix_local_delta_status_amount')
        batch_op.drop_column('verification_lag_ms')
