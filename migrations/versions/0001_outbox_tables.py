"""outbox tables: outbox messages, transaction log, inbox

Revision ID: outbox_0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "outbox_0001"
down_revision = None
# The label lets an application's own Alembic setup run this chain beside its own:
# add this folder to version_locations and run  alembic upgrade outbox@head
branch_labels = ("outbox",)
depends_on = None

# Types frozen here as they were at this revision (see outbox/schema.py).
SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
PAYLOAD = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
TIMESTAMP = sa.DateTime(timezone=False).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LONG_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "mariadb_charset": "utf8mb4"}


def exact(length: int) -> sa.types.TypeEngine[str]:
    """Byte-for-byte comparison on MySQL/MariaDB (ids, topics, keys, groups)."""
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


def upgrade() -> None:
    op.create_table(
        "outbox_messages",
        sa.Column("seq", SEQ, autoincrement=True, nullable=False),
        sa.Column("message_id", exact(64), nullable=False),
        sa.Column("topic", exact(200), nullable=False),
        sa.Column("key", exact(200), nullable=True),
        sa.Column("tag", sa.String(100), nullable=True),
        sa.Column("headers", LONG_TEXT, nullable=False),
        sa.Column("payload", PAYLOAD, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=False),
        sa.Column("last_error", LONG_TEXT, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("sent_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_outbox_messages"),
        sa.UniqueConstraint("message_id", name="uq_outbox_messages_message_id"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_outbox_messages_status_seq", "outbox_messages", ["status", "seq"])
    op.create_index("ix_outbox_messages_key_status_seq", "outbox_messages",
                    ["key", "status", "seq"])
    op.create_table(
        "outbox_transaction_log",
        sa.Column("transaction_id", exact(64), nullable=False),
        sa.Column("message_id", exact(64), nullable=False),
        sa.Column("topic", exact(200), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("transaction_id", name="pk_outbox_transaction_log"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_outbox_transaction_log_created_at", "outbox_transaction_log",
                    ["created_at"])
    op.create_table(
        "outbox_inbox",
        sa.Column("consumer_group", exact(200), nullable=False),
        sa.Column("message_id", exact(64), nullable=False),
        sa.Column("processed_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("consumer_group", "message_id", name="pk_outbox_inbox"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_outbox_inbox_processed_at", "outbox_inbox", ["processed_at"])


def downgrade() -> None:
    op.drop_table("outbox_inbox")
    op.drop_table("outbox_transaction_log")
    op.drop_table("outbox_messages")
