"""The tables, defined once: outbox messages, transaction log, inbox, and the
consumer's own attempt counts and dead letters (for brokers that keep neither).

Use :data:`metadata` directly (``alembic upgrade head`` on the shipped chain
creates exactly these tables), or pass it beside your own metadata to Alembic's
``target_metadata`` so autogenerate sees them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeEngine

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Sequence numbers: BIGINT everywhere but SQLite, whose autoincrement needs INTEGER.
SEQ: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")
# MySQL's plain BLOB stops at 64 KiB; payloads may be larger.
PAYLOAD: TypeEngine[bytes] = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
# Naive UTC timestamps; MySQL needs fsp=6 or it truncates to whole seconds.
TIMESTAMP: TypeEngine[dt.datetime] = DateTime(timezone=False).with_variant(
    mysql.DATETIME(fsp=6), "mysql", "mariadb"
)
LONG_TEXT: TypeEngine[str] = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def exact_string(length: int) -> TypeEngine[str]:
    """A string compared byte for byte: ids, topics, keys and groups.

    MySQL's default collations call "TX-a" and "tx-A " equal, which would make two
    messages one and drop the second as a duplicate.
    """
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


ID = 64
NAME = 200
#: Table options: UTF-8 whatever the MySQL server's default character set is.
TABLE_OPTIONS: dict[str, Any] = {"mysql_charset": "utf8mb4", "mariadb_charset": "utf8mb4"}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: Row states of :data:`outbox_messages`.
PENDING, SENT, DEAD = "pending", "sent", "dead"
DISCARDED = "discarded"  # a dead row an operator gave up on: kept for audit, never sent

outbox_messages = Table(
    "outbox_messages",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("message_id", exact_string(ID), nullable=False, unique=True),
    Column("topic", exact_string(NAME), nullable=False),
    Column("key", exact_string(NAME), nullable=True),
    Column("tag", String(100), nullable=True),
    Column("headers", LONG_TEXT, nullable=False),
    Column("payload", PAYLOAD, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", TIMESTAMP, nullable=False),
    Column("last_error", LONG_TEXT, nullable=True),
    Column("created_at", TIMESTAMP, nullable=False),
    Column("sent_at", TIMESTAMP, nullable=True),
    # Claims read due rows in due order (rows backing off sort after them); the
    # parking probe and order check read one key's rows in seq order.
    Index(None, "status", "next_attempt_at", "seq"),
    Index(None, "key", "status", "seq"),
    **TABLE_OPTIONS,
)

transaction_log = Table(
    "outbox_transaction_log",
    metadata,
    Column("transaction_id", exact_string(ID), primary_key=True),
    Column("message_id", exact_string(ID), nullable=False),
    Column("topic", exact_string(NAME), nullable=False),
    Column("created_at", TIMESTAMP, nullable=False),
    Index(None, "created_at"),
    **TABLE_OPTIONS,
)

inbox = Table(
    "outbox_inbox",
    metadata,
    Column("consumer_group", exact_string(NAME), nullable=False),
    Column("message_id", exact_string(ID), nullable=False),
    Column("processed_at", TIMESTAMP, nullable=False),
    PrimaryKeyConstraint("consumer_group", "message_id"),
    Index(None, "processed_at"),
    **TABLE_OPTIONS,
)


#: Failed attempts per (group, message), kept by a consumer whose broker does not
#: count deliveries (Kafka, say): the row outlives a crash of the consumer, so a
#: message that keeps failing is dead-lettered after ``max_attempts`` all the same.
consumer_attempts = Table(
    "outbox_consumer_attempts",
    metadata,
    Column("consumer_group", exact_string(NAME), nullable=False),
    Column("message_id", exact_string(ID), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", LONG_TEXT, nullable=True),
    Column("updated_at", TIMESTAMP, nullable=False),
    PrimaryKeyConstraint("consumer_group", "message_id"),
    Index(None, "updated_at"),
    **TABLE_OPTIONS,
)

#: Messages a consumer gave up on, kept in its own database when its broker has no
#: dead-letter destination: the whole delivery, with the reason, for replay or audit.
consumer_dead_letters = Table(
    "outbox_consumer_dead_letters",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("consumer_group", exact_string(NAME), nullable=False),
    Column("message_id", exact_string(ID), nullable=True),  # a hostile message may lack one
    Column("topic", exact_string(NAME), nullable=False),
    Column("key", exact_string(NAME), nullable=True),
    Column("tag", String(100), nullable=True),
    Column("headers", LONG_TEXT, nullable=False),
    Column("payload", PAYLOAD, nullable=False),
    Column("reason", LONG_TEXT, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("dead_at", TIMESTAMP, nullable=False),
    # A redelivery of a message already dead-lettered adds no second row.
    UniqueConstraint("consumer_group", "message_id"),
    Index(None, "dead_at"),
    **TABLE_OPTIONS,
)

#: PostgreSQL channel on which a committed outbox insert wakes relays (LISTEN/NOTIFY).
NOTIFY_CHANNEL = "outbox_messages"

# A statement trigger, so the write path gains no round trip: PostgreSQL sends the
# notification at commit, once per transaction, and never for a rollback.
NOTIFY_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
NOTIFY_TRIGGER_SQL = """
CREATE TRIGGER outbox_messages_notify AFTER INSERT ON outbox_messages
FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()
"""
for _when, _sql in (
    ("after_create", NOTIFY_FUNCTION_SQL),
    ("after_create", NOTIFY_TRIGGER_SQL),
    ("after_drop", "DROP FUNCTION IF EXISTS outbox_notify()"),
):
    event.listen(outbox_messages, _when,
                 DDL(_sql).execute_if(dialect="postgresql"))  # type: ignore[no-untyped-call]


def utcnow() -> dt.datetime:
    """Naive UTC now, the form every timestamp column holds."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)
