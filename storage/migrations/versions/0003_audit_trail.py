"""audit trail

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 04:21:33.588643
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import storage.types


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('audit_entry',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', storage.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('action', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('delta_id', sa.Integer(), nullable=True),
    sa.Column('discrepancy_id', sa.Integer(), nullable=True),
    sa.Column('before', sa.JSON(), nullable=False),
    sa.Column('after', sa.JSON(), nullable=False),
    sa.Column('note', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
    sa.ForeignKeyConstraint(['delta_id'], ['local_delta.id'], ),
    sa.ForeignKeyConstraint(['discrepancy_id'], ['discrepancy.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['reconciliation_run.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_entry', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_entry_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_entry_delta_id'), ['delta_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_entry_run_id'), ['run_id'], unique=False)

    with op.batch_alter_table('webhook_event', schema=None) as batch_op:
        batch_op.create_index('ix_webhook_event_orphan_age', ['received_at'], unique=False, sqlite_where=sa.text("outcome = 'orphan'"), postgresql_where=sa.text("outcome = 'orphan'"))



def downgrade() -> None:
    with op.batch_alter_table('webhook_event', schema=None) as batch_op:
        batch_op.drop_index('ix_webhook_event_orphan_age', sqlite_where=sa.text("outcome = 'orphan'"), postgresql_where=sa.text("outcome = 'orphan'"))

    with op.batch_alter_table('audit_entry', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_entry_run_id'))
        batch_op.drop_index(batch_op.f('ix_audit_entry_delta_id'))
        batch_op.drop_index(batch_op.f('ix_audit_entry_at'))

    op.drop_table('audit_entry')
