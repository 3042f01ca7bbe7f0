"""The embedded SQL transport's tables and statements, written once.

Each function takes a sync :class:`~sqlalchemy.Connection`; :class:`outbox.SqlTransport`
calls them directly and ``outbox.aio.AsyncSqlTransport`` through ``run_sync``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Dialect,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    and_,
    delete,
    exists,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from .db import dialect_name, insert_ignore, lock_for_writing, safe_url, supports_skip_locked
from .envelope import decode_headers, encode_headers
from .errors import BrokerUnavailableError, ConfigurationError, PublishError
from .message import Message
from .schema import (
    ID,
    LONG_TEXT,
    NAME,
    NAMING_CONVENTION,
    PAYLOAD,
    SEQ,
    TABLE_OPTIONS,
    TIMESTAMP,
    exact_string,
    utcnow,
)
from .transport import Delivery

transport_metadata = MetaData(naming_convention=NAMING_CONVENTION)

READY, DONE, DEAD = "ready", "done", "dead"

messages = Table(
    "outbox_transport_messages",
    transport_metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("topic", exact_string(NAME), nullable=False),
    Column("message_id", exact_string(ID), nullable=True),
    Column("key", exact_string(NAME), nullable=True),
    Column("tag", String(100), nullable=True),
    Column("headers", LONG_TEXT, nullable=False),
    Column("payload", PAYLOAD, nullable=False),
    Column("created_at", TIMESTAMP, nullable=False),
    Index(None, "topic", "seq"),
    Index(None, "created_at"),
    **TABLE_OPTIONS,
)

deliveries = Table(
    "outbox_transport_deliveries",
    transport_metadata,
    Column("consumer_group", exact_string(NAME), nullable=False),
    Column("seq", SEQ, nullable=False),
    Column("topic", exact_string(NAME), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("visible_at", TIMESTAMP, nullable=False),
    Column("last_error", LONG_TEXT, nullable=True),
    PrimaryKeyConstraint("consumer_group", "seq"),
    Index(None, "consumer_group", "status", "visible_at"),
    **TABLE_OPTIONS,
)




@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    message_id: str | None
    topic: str
    attempts: int
    reason: str | None
    payload: bytes


# -- checks and decisions shared by the sync and async forms ------------------------


def check_dialect(dialect: Dialect) -> None:
    """Refuse a database the queue's SQL is not written for."""
    if dialect.name not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise ConfigurationError(f"SQL transport does not support {dialect.name}")


def check_visibility_timeout(visibility_timeout: float) -> None:
    if visibility_timeout <= 0:
        raise ConfigurationError("visibility_timeout must be positive")


class PollWait:
    """How a waiting fetch goes on: after each poll, :meth:`pause` says how long to
    pause before the next one, or ``None`` when the fetch returns what it found.

    The sync forms pause by blocking, the asyncio forms with ``asyncio.sleep``; both
    follow this one rule: return as soon as something was found, else poll every
    ``poll_interval`` seconds and once more at the deadline.
    """

    def __init__(self, wait_seconds: float, poll_interval: float) -> None:
        self._deadline = time.monotonic() + max(0.0, wait_seconds)
        self._poll_interval = poll_interval

    def pause(self, found: Sequence[object]) -> float | None:
        remaining = self._deadline - time.monotonic()
        if found or remaining <= 0:
            return None
        return min(self._poll_interval, remaining)


def pending(counts: Mapping[str, int]) -> int:
    """Messages not yet done or dead, from :func:`count_states`' answer."""
    return counts["unseen"] + counts[READY]


def _wrap(exc: SQLAlchemyError, url: URL, owner: str = "SqlTransport") -> PublishError:
    if isinstance(exc, IntegrityError | DataError):
        # The server is there and refused this row: retrying will not help by itself.
        return PublishError(
            f"SQL transport database {safe_url(url)} refused the row: "
            f"{type(exc.orig).__name__}: {str(exc.orig).splitlines()[0][:300]}"
        )
    return BrokerUnavailableError(
        f"SQL transport database {safe_url(url)} failed: {type(exc).__name__}; "
        f"check that it is reachable and that its tables exist ({owner}.create_tables())"
    )


@contextmanager
def wrapped_errors(url: URL, owner: str = "SqlTransport") -> Iterator[None]:
    """Turn a database error raised inside the block into the project's error."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise _wrap(exc, url, owner) from exc


# -- the SQL: every function takes a Connection with no transaction open -------------


def create_tables(conn: Connection) -> None:
    with conn.begin():
        transport_metadata.create_all(conn)


def drop_tables(conn: Connection) -> None:
    with conn.begin():
        transport_metadata.drop_all(conn)


def count_states(conn: Connection, topic: str, group: str) -> dict[str, int]:
    out = {"unseen": 0, READY: 0, DONE: 0, DEAD: 0}
    with conn.begin():
        total = conn.scalar(select(func.count()).where(messages.c.topic == topic)) or 0
        for status, n in conn.execute(
            select(deliveries.c.status, func.count())
            .where(deliveries.c.consumer_group == group, deliveries.c.topic == topic)
            .group_by(deliveries.c.status)
        ):
            out[status] = int(n)
    out["unseen"] = int(total) - out[READY] - out[DONE] - out[DEAD]
    return out


def insert_raw(
    conn: Connection, topic: str, payload: bytes, message_id: str | None, key: str | None,
    tag: str | None, headers: Mapping[str, str] | None,
) -> None:
    with conn.begin():
        conn.execute(messages.insert().values(
            topic=topic, message_id=message_id, key=key, tag=tag,
            headers=encode_headers(headers or {}), payload=payload, created_at=utcnow(),
        ))


def list_dead_letters(conn: Connection, group: str, limit: int) -> list[DeadLetter]:
    with conn.begin():
        rows = conn.execute(
            select(deliveries.c.seq, messages.c.message_id, messages.c.topic,
                   deliveries.c.attempts, deliveries.c.last_error, messages.c.payload)
            .join(messages, messages.c.seq == deliveries.c.seq)
            .where(deliveries.c.consumer_group == group, deliveries.c.status == DEAD)
            .order_by(deliveries.c.seq).limit(limit)
        ).all()
    return [DeadLetter(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows]


def purge_older(conn: Connection, older_than: dt.timedelta, batch_size: int) -> int:
    """One transaction per batch, so a big purge never holds locks for long."""
    if batch_size < 1:
        # The loop ends on a short batch; a batch of 0 never is one.
        raise ConfigurationError("purge batch_size must be at least 1")
    cutoff = utcnow() - older_than
    total = 0
    while True:
        with conn.begin():
            seqs = conn.scalars(select(messages.c.seq).where(messages.c.created_at < cutoff)
                                .order_by(messages.c.seq).limit(batch_size)).all()
            if seqs:
                conn.execute(delete(deliveries).where(deliveries.c.seq.in_(seqs)))
                conn.execute(delete(messages).where(messages.c.seq.in_(seqs)))
        total += len(seqs)
        if len(seqs) < batch_size:
            return total


def _row(message: Message, now: dt.datetime) -> dict[str, Any]:
    return {
        "topic": message.topic, "message_id": message.id, "key": message.key, "tag": message.tag,
        "headers": encode_headers(message.headers),
        "payload": message.payload, "created_at": now,
    }


def insert_messages(conn: Connection, batch: Sequence[Message]) -> None:
    """All of ``batch`` in one transaction: a row the database refuses refuses them all."""
    if not batch:
        return
    now = utcnow()
    with conn.begin():
        conn.execute(messages.insert(), [_row(m, now) for m in batch])



def claim(conn: Connection, topic: str, group: str, max_messages: int,
          visibility_timeout: float) -> list[Delivery]:
    """Claim up to ``max_messages`` visible deliveries of ``topic`` for ``group``,
    hiding them for ``visibility_timeout`` seconds."""
    now = utcnow()
    if dialect_name(conn) == "mysql":
        # InnoDB's default REPEATABLE READ puts next-key locks on the ranges a claim
        # scans, and concurrent claims deadlock on each other's ranges. Row locks are
        # all a claim needs (rows another claim holds are skipped). The connection gets
        # its usual level back when it returns to the pool.
        conn.execution_options(isolation_level="READ COMMITTED")
    with conn.begin():
        lock_for_writing(conn, deliveries)
        # Give this group a delivery row for every message it has not seen yet.
        unseen = (
            select(literal(group), messages.c.seq, messages.c.topic, literal(READY),
                   literal(0), literal(now))
            .where(messages.c.topic == topic)
            .where(~exists().where(and_(deliveries.c.consumer_group == group,
                                        deliveries.c.seq == messages.c.seq)))
            .order_by(messages.c.seq)  # one lock order for concurrent consumers
        )
        conn.execute(insert_ignore(conn, deliveries).from_select(
            ["consumer_group", "seq", "topic", "status", "attempts", "visible_at"], unseen
        ))
        query = (
            select(deliveries.c.seq, deliveries.c.attempts)
            .where(deliveries.c.consumer_group == group, deliveries.c.status == READY,
                   deliveries.c.visible_at <= now)
            .order_by(deliveries.c.seq).limit(max_messages)
        )
        if supports_skip_locked(conn):
            query = query.with_for_update(skip_locked=True)
        claimed = conn.execute(query).all()
        if not claimed:
            return []
        seqs = [r.seq for r in claimed]
        conn.execute(
            update(deliveries)
            .where(deliveries.c.consumer_group == group, deliveries.c.seq.in_(seqs))
            .values(attempts=deliveries.c.attempts + 1,
                    visible_at=now + dt.timedelta(seconds=visibility_timeout))
        )
        rows = conn.execute(select(messages).where(messages.c.seq.in_(seqs))
                            .order_by(messages.c.seq)).all()
    attempts = {r.seq: r.attempts + 1 for r in claimed}
    return [
        Delivery(
            topic=r.topic, payload=bytes(r.payload), message_id=r.message_id,
            attempt=attempts[r.seq], key=r.key, tag=r.tag, headers=decode_headers(r.headers),
            handle=r.seq,
        )
        for r in rows
    ]


def _set(conn: Connection, group: str, delivery: Delivery, **values: Any) -> None:
    with conn.begin():
        conn.execute(update(deliveries).where(
            deliveries.c.consumer_group == group, deliveries.c.seq == delivery.handle
        ).values(**values))


def mark_done(conn: Connection, group: str, delivery: Delivery) -> None:
    _set(conn, group, delivery, status=DONE, last_error=None)


def mark_retry(conn: Connection, group: str, delivery: Delivery, delay_seconds: float,
               error: str) -> None:
    _set(conn, group, delivery, visible_at=utcnow() + dt.timedelta(seconds=delay_seconds),
         last_error=error)


def mark_dead(conn: Connection, group: str, delivery: Delivery, reason: str) -> None:
    _set(conn, group, delivery, status=DEAD, last_error=reason)


# -- the sync form: runs the functions above on a connection of the engine ----------
