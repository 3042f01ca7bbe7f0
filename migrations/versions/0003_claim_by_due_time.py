"""Claims read due rows only: index pending rows by (status, next_attempt_at, seq)

With rows in backoff at the head of the queue (after a broker outage), a claim
ordered by seq alone stepped over every one of them; ordered by due time it starts
at the first due row, so a claim costs the same at any backlog.

Revision ID: outbox_0003
Revises: outbox_0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "outbox_0003"
down_revision = "outbox_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_outbox_messages_status_next_attempt_at_seq", "outbox_messages",
                    ["status", "next_attempt_at", "seq"])
    op.drop_index("ix_outbox_messages_status_seq", table_name="outbox_messages")


def downgrade() -> None:
    op.create_index("ix_outbox_messages_status_seq", "outbox_messages", ["status", "seq"])
    op.drop_index("ix_outbox_messages_status_next_attempt_at_seq",
                  table_name="outbox_messages")
