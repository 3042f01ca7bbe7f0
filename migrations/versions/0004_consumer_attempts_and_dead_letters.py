"""consumer tables: attempt counts and dead letters, for brokers that keep neither

A consumer of Kafka (which has no per-message delivery count and no dead-letter
queue of its own) counts failed attempts in outbox_consumer_attempts and, without a
dead-letter destination on the broker, keeps what it gave up on in
outbox_consumer_dead_letters, both in its own database next to the inbox.

Revision ID: outbox_0004
Revises: outbox_0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "outbox_0004"
down_revision = "outbox_0003"
branch_labels = None
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
        "outbox_consumer_attempts",
        sa.Column("consumer_group", exact(200), nullable=False),
        sa.Column("message_id", exact(64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", LONG_TEXT, nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("consumer_group", "message_id",
                                name="pk_outbox_consumer_attempts"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_outbox_consumer_attempts_updated_at", "outbox_consumer_attempts",
                    ["updated_at"])
    op.create_table(
        "outbox_consumer_dead_letters",
        sa.Column("seq", SEQ, autoincrement=True, nullable=False),
        sa.Column("consumer_group", exact(200), nullable=False),
        sa.Column("message_id", exact(64), nullable=True),
        sa.Column("topic", exact(200), nullable=False),
        sa.Column("key", exact(200), nullable=True),
        sa.Column("tag", sa.String(100), nullable=True),
        sa.Column("headers", LONG_TEXT, nullable=False),
        sa.Column("payload", PAYLOAD, nullable=False),
        sa.Column("reason", LONG_TEXT, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("dead_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_outbox_consumer_dead_letters"),
        sa.UniqueConstraint("consumer_group", "message_id",
                            name="uq_outbox_consumer_dead_letters_consumer_group_message_id"),
        **TABLE_OPTIONS,
    )
    op.create_index("ix_outbox_consumer_dead_letters_dead_at", "outbox_consumer_dead_letters",
                    ["dead_at"])


def downgrade() -> None:
    op.drop_index("ix_outbox_consumer_dead_letters_dead_at",
                  table_name="outbox_consumer_dead_letters")
    op.drop_table("outbox_consumer_dead_letters")
    op.drop_index("ix_outbox_consumer_attempts_updated_at",
                  table_name="outbox_consumer_attempts")
    op.drop_table("outbox_consumer_attempts")
