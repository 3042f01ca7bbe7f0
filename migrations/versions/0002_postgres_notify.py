"""PostgreSQL: a committed outbox insert notifies listening relays

Revision ID: outbox_0002
Revises: outbox_0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "outbox_0002"
down_revision = "outbox_0001"
branch_labels = None
depends_on = None

# Frozen here as at this revision (outbox/schema.py creates the same for create_all).
FUNCTION = """
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('outbox_messages', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
TRIGGER = """
CREATE TRIGGER outbox_messages_notify AFTER INSERT ON outbox_messages
FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # other databases have no LISTEN/NOTIFY: relays poll there
    op.execute(FUNCTION)
    op.execute(TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS outbox_messages_notify ON outbox_messages")
    op.execute("DROP FUNCTION IF EXISTS outbox_notify()")
