"""outbox submissions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 04:07:46.429850
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import storage.types


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('outbox_submission',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('client_key', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('fingerprint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('request_body', sa.LargeBinary(), nullable=False),
    sa.Column('credit_pool_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
    sa.Column('next_attempt_at', storage.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('answer', sa.LargeBinary(), nullable=True),
    sa.Column('answer_status', sa.Integer(), nullable=True),
    sa.Column('created_at', storage.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('sent_at', storage.types.UtcDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('client_key'),
    sa.UniqueConstraint('idempotency_key')
    )
    with op.batch_alter_table('outbox_submission', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_submission_due', ['status', 'next_attempt_at'], unique=False)

    with op.batch_alter_table('local_delta', schema=None) as batch_op:
        batch_op.add_column(sa.Column('submission_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('submission_index', sa.Integer(), nullable=True))
        batch_op.create_index('ix_local_delta_status_id', ['status', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_local_delta_submission_id'), ['submission_id'], unique=False)
        batch_op.create_index('ux_local_delta_anchor_item', ['anchor_id', 'item_hash'], unique=True)
        batch_op.drop_index('ix_local_delta_anchor_id')  # the unique index above leads with anchor_id
        batch_op.create_foreign_key('fk_local_delta_submission', 'outbox_submission', ['submission_id'], ['id'])



def downgrade() -> None:
    with op.batch_alter_table('local_delta', schema=None) as batch_op:
        batch_op.drop_constraint('fk_local_delta_submission', type_='foreignkey')
        batch_op.create_index('ix_local_delta_anchor_id', ['anchor_id'], unique=False)
        batch_op.drop_index('ux_local_delta_anchor_item')
        batch_op.drop_index(batch_op.f('ix_local_delta_submission_id'))
        batch_op.drop_index('ix_local_delta_status_id')
        batch_op.drop_column('submission_index')
        batch_op.drop_column('submission_id')

    with op.batch_alter_table('outbox_submission', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_submission_due')

    op.drop_table('outbox_submission')
