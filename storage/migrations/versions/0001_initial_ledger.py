"""initial ledger

Revision ID: 0001
Revises: 
Create Date: 2026-11-27 03:29:08.144029
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import storage.types


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('local_delta',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('anchor_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('item_hash', sqlmodel.sql.sqltypes.AutoString(length=130), nullable=True),
    sa.Column('customer_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('amount', storage.types.ExactAmount(), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
    sa.Column('reference_id', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('metadata', sa.JSON(), nullable=True),
    sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('status_reason', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
    sa.Column('receipt_id', sqlmodel.sql.sqltypes.AutoString(length=130), nullable=True),
    sa.Column('items_root', sqlmodel.sql.sqltypes.AutoString(length=130), nullable=True),
    sa.Column('item_hashes', sa.JSON(), nullable=True),
    sa.Column('tx_hash', sqlmodel.sql.sqltypes.AutoString(length=130), nullable=True),
    sa.Column('sequence_number', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('previous_proof_hash', sqlmodel.sql.sqltypes.AutoString(length=130), nullable=True),
    sa.Column('verification_reference', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('verified_by', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('created_at', storage.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('emitted_at', storage.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('verified_at', storage.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('failed_at', storage.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('updated_at', storage.types.UtcDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key')
    )
    with op.batch_alter_table('local_delta', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_local_delta_anchor_id'), ['anchor_id'], unique=False)
        batch_op.create_index('ix_local_delta_customer_id', ['customer_id', 'id'], unique=False)
        batch_op.create_index('ix_local_delta_customer_sequence', ['customer_id', 'sequence_number'], unique=False)
        batch_op.create_index(batch_op.f('ix_local_delta_item_hash'), ['item_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_local_delta_receipt_id'), ['receipt_id'], unique=False)
        batch_op.create_index('ix_local_delta_unsettled', ['emitted_at', 'id'], unique=False, sqlite_where=sa.text("status IN ('QUEUED', 'PROCESSING')"), postgresql_where=sa.text("status IN ('QUEUED', 'PROCESSING')"))

    op.create_table('reconciliation_run',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('dry_run', sa.Boolean(), nullable=False),
    sa.Column('started_at', storage.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', storage.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('checked', sa.Integer(), nullable=False),
    sa.Column('fixed', sa.Integer(), nullable=False),
    sa.Column('errors', sa.Integer(), nullable=False),
    sa.Column('found', sa.JSON(), nullable=False),
    sa.Column('error_detail', sqlmodel.sql.sqltypes.AutoString(length=4000), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('reconciliation_run', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reconciliation_run_started_at'), ['started_at'], unique=False)

    op.create_table('webhook_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('event_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('raw_body', sa.LargeBinary(), nullable=False),
    sa.Column('signature_timestamp', sa.BigInteger(), nullable=False),
    sa.Column('received_at', storage.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('anchor_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('item_hash', sqlmodel.sql.sqltypes.AutoString(length=130), nullable=True),
    sa.Column('receipt_id', sqlmodel.sql.sqltypes.AutoString(length=130), nullable=True),
    sa.Column('applied_at', storage.types.UtcDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('event_id')
    )
    with op.batch_alter_table('webhook_event', schema=None) as batch_op:
        batch_op.create_index('ix_webhook_event_orphan_anchor', ['anchor_id'], unique=False, sqlite_where=sa.text("outcome = 'orphan'"), postgresql_where=sa.text("outcome = 'orphan'"))
        batch_op.create_index('ix_webhook_event_orphan_item', ['item_hash'], unique=False, sqlite_where=sa.text("outcome = 'orphan'"), postgresql_where=sa.text("outcome = 'orphan'"))
        batch_op.create_index('ix_webhook_event_orphan_receipt', ['receipt_id'], unique=False, sqlite_where=sa.text("outcome = 'orphan'"), postgresql_where=sa.text("outcome = 'orphan'"))
        batch_op.create_index(batch_op.f('ix_webhook_event_received_at'), ['received_at'], unique=False)

    op.create_table('discrepancy',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
    sa.Column('delta_id', sa.Integer(), nullable=True),
    sa.Column('anchor_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('customer_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('detected_by', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('evidence', sa.JSON(), nullable=False),
    sa.Column('occurrences', sa.Integer(), nullable=False),
    sa.Column('first_seen_at', storage.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', storage.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', storage.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('resolution_note', sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
    sa.ForeignKeyConstraint(['delta_id'], ['local_delta.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['reconciliation_run.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('discrepancy', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_discrepancy_delta_id'), ['delta_id'], unique=False)
        batch_op.create_index('ix_discrepancy_status_kind', ['status', 'kind', 'id'], unique=False)
        batch_op.create_index('ux_discrepancy_open_subject', ['kind', 'subject'], unique=True, sqlite_where=sa.text("status = 'open'"), postgresql_where=sa.text("status = 'open'"))



def downgrade() -> None:
    with op.batch_alter_table('discrepancy', schema=None) as batch_op:
        batch_op.drop_index('ux_discrepancy_open_subject', sqlite_where=sa.text("status = 'open'"), postgresql_where=sa.text("status = 'open'"))
        batch_op.drop_index('ix_discrepancy_status_kind')
        batch_op.drop_index(batch_op.f('ix_discrepancy_delta_id'))

    op.drop_table('discrepancy')
    with op.batch_alter_table('webhook_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhook_event_received_at'))
        batch_op.drop_index('ix_webhook_event_orphan_receipt', sqlite_where=sa.text("outcome = 'orphan'"), postgresql_where=sa.text("outcome = 'orphan'"))
        batch_op.drop_index('ix_webhook_event_orphan_item', sqlite_where=sa.text("outcome = 'orphan'"), postgresql_where=sa.text("outcome = 'orphan'"))
        batch_op.drop_index('ix_webhook_event_orphan_anchor', sqlite_where=sa.text("outcome = 'orphan'"), postgresql_where=sa.text("outcome = 'orphan'"))

    op.drop_table('webhook_event')
    with op.batch_alter_table('reconciliation_run', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reconciliation_run_started_at'))

    op.drop_table('reconciliation_run')
    with op.batch_alter_table('local_delta', schema=None) as batch_op:
        batch_op.drop_index('ix_local_delta_unsettled', sqlite_where=sa.text("status IN ('QUEUED', 'PROCESSING')"), postgresql_where=sa.text("status IN ('QUEUED', 'PROCESSING')"))
        batch_op.drop_index(batch_op.f('ix_local_delta_receipt_id'))
        batch_op.drop_index(batch_op.f('ix_local_delta_item_hash'))
        batch_op.drop_index('ix_local_delta_customer_sequence')
        batch_op.drop_index('ix_local_delta_customer_id')
        batch_op.drop_index(batch_op.f('ix_local_delta_anchor_id'))

    op.drop_table('local_delta')
