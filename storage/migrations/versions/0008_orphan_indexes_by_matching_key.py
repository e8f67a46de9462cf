"""webhook_event: an orphan is indexed only under the key it is matched by

An orphan event is matched to a delta by its anchor id when it names one, else by its item
hash, else by its receipt id (reconciler.apply.matching_deltas). The item-hash and receipt
indexes held every orphan, so a PacSpace `delta.verified` (which names an anchor and a
receipt) wrote an entry to the receipt index (and one to the item-hash index, under NULL when
it names no hash) that no lookup could use: with random ids, a page per entry at each commit
(bench/RESULTS.md, session 19). They now hold the orphans matched by that key alone. The
anchor and age indexes are unchanged.

On PostgreSQL the migration first takes webhook_event alone in ACCESS EXCLUSIVE mode, as 0007
does: taking a lock that strong only after the index builds (for the drops) could deadlock
with a transaction that read the table before and writes it after (matching orphans does).
Until the migration commits, readers and writers of webhook_event wait; one that waits past
the engine's lock_timeout fails (a webhook is answered 503 and delivered again). Each new
index is built by a scan of the whole table, on both databases, within the engine's
statement_timeout (30 s on PostgreSQL): a ledger too big for that fails the migration, which
then rolls back whole.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 05:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORPHAN = sa.text("outcome = 'orphan'")
UNANCHORED_ORPHAN = sa.text("outcome = 'orphan' AND anchor_id IS NULL")
RECEIPT_ONLY_ORPHAN = sa.text("outcome = 'orphan' AND anchor_id IS NULL AND item_hash IS NULL")

# (name, column, predicate) before and after
OLD = [('ix_webhook_event_orphan_item', 'item_hash', ORPHAN), ('ix_webhook_event_orphan_receipt', 'receipt_id', ORPHAN)]
NEW = [
    ('ix_webhook_event_orphan_item_unanchored', 'item_hash', UNANCHORED_ORPHAN),
    ('ix_webhook_event_orphan_receipt_only', 'receipt_id', RECEIPT_ONLY_ORPHAN),
]


def _swap(build: list[tuple[str, str, sa.TextClause]], drop: list[tuple[str, str, sa.TextClause]]) -> None:
    if op.get_bind().dialect.name != 'sqlite':
        op.execute("LOCK TABLE webhook_event IN ACCESS EXCLUSIVE MODE")
    for name, column, predicate in build:
        op.create_index(name, 'webhook_event', [column], unique=False, sqlite_where=predicate, postgresql_where=predicate)
    for name, _, _ in drop:
        op.drop_index(name, table_name='webhook_event')


def upgrade() -> None:
    _swap(NEW, OLD)


def downgrade() -> None:
    _swap(OLD, NEW)
