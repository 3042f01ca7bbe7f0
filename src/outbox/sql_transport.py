"""The embedded SQL transport: a queue in a database, shared by several processes.

Publishing inserts a row into ``outbox_transport_messages``. Each consumer group
keeps its own delivery state per message in ``outbox_transport_deliveries``
(visible-at time, attempts, done or dead with a reason), so every group gets every
message, unacknowledged deliveries come back after a visibility timeout, and
nothing published is skipped, whatever order concurrent publishers commit in.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
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
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from .db import dialect_name, insert_ignore, lock_for_writing, safe_url, supports_skip_locked
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


def _wrap(exc: SQLAlchemyError, engine: Engine) -> PublishError:
    if isinstance(exc, IntegrityError | DataError):
        # The server is there and refused this row: retrying will not help by itself.
        return PublishError(
            f"SQL transport database {safe_url(engine.url)} refused the row: "
            f"{type(exc.orig).__name__}: {str(exc.orig).splitlines()[0][:300]}"
        )
    return BrokerUnavailableError(
        f"SQL transport database {safe_url(engine.url)} failed: {type(exc).__name__}; "
        "check that it is reachable and that its tables exist (SqlTransport.create_tables())"
    )


class SqlTransport:
    """The queue tables of one database; hands out publishers and subscribers."""

    def __init__(self, engine: Engine, *, poll_interval: float = 0.05) -> None:
        if dialect_name(engine) not in ("sqlite", "postgresql", "mysql"):
            raise ConfigurationError(f"SQL transport does not support {engine.dialect.name}")
        self.engine = engine
        self.poll_interval = poll_interval

    def create_tables(self) -> None:
        """Create the queue tables if they are missing."""
        transport_metadata.create_all(self.engine)

    def drop_tables(self) -> None:
        """Drop the queue tables and everything on them."""
        transport_metadata.drop_all(self.engine)

    def counts(self, topic: str, group: str) -> dict[str, int]:
        """Messages of ``topic`` by state for ``group``: ``unseen`` (never fetched),
        ``ready`` (waiting or in flight), ``done`` (acknowledged), ``dead``."""
        out = {"unseen": 0, READY: 0, DONE: 0, DEAD: 0}
        with self.engine.connect() as conn:
            total = conn.scalar(select(func.count()).where(messages.c.topic == topic)) or 0
            for status, n in conn.execute(
                select(deliveries.c.status, func.count())
                .where(deliveries.c.consumer_group == group, deliveries.c.topic == topic)
                .group_by(deliveries.c.status)
            ):
                out[status] = int(n)
        out["unseen"] = int(total) - out[READY] - out[DONE] - out[DEAD]
        return out

    def publisher(self) -> SqlPublisher:
        return SqlPublisher(self)

    def subscriber(
        self, topic: str, group: str, *, visibility_timeout: float = 30.0
    ) -> SqlSubscriber:
        return SqlSubscriber(self, topic, group, visibility_timeout=visibility_timeout)

    def put_raw(
        self, topic: str, payload: bytes, *, message_id: str | None = None,
        key: str | None = None, tag: str | None = None, headers: Mapping[str, str] | None = None,
    ) -> None:
        """Put a row on the queue without validating it (for tests of bad input)."""
        with self.engine.begin() as conn:
            conn.execute(messages.insert().values(
                topic=topic, message_id=message_id, key=key, tag=tag,
                headers=json.dumps(dict(headers or {})), payload=payload, created_at=utcnow(),
            ))

    def dead_letters(self, group: str, limit: int = 1000) -> list[DeadLetter]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(deliveries.c.seq, messages.c.message_id, messages.c.topic,
                       deliveries.c.attempts, deliveries.c.last_error, messages.c.payload)
                .join(messages, messages.c.seq == deliveries.c.seq)
                .where(deliveries.c.consumer_group == group, deliveries.c.status == DEAD)
                .order_by(deliveries.c.seq).limit(limit)
            ).all()
        return [DeadLetter(r[0], r[1], r[2], r[3], r[4], bytes(r[5])) for r in rows]

    def pending_count(self, topic: str, group: str) -> int:
        """Messages of ``topic`` not yet done or dead for ``group``."""
        counts = self.counts(topic, group)
        return counts["unseen"] + counts[READY]

    def purge(self, older_than: dt.timedelta, batch_size: int = 1000) -> int:
        """Delete messages older than ``older_than`` (and their deliveries), batch by batch."""
        if batch_size < 1:
            # The loop ends on a short batch; a batch of 0 never is one.
            raise ConfigurationError("purge batch_size must be at least 1")
        cutoff = utcnow() - older_than
        total = 0
        while True:
            with self.engine.begin() as conn:
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
        "headers": json.dumps(dict(message.headers), ensure_ascii=False, sort_keys=True),
        "payload": message.payload, "created_at": now,
    }


class SqlPublisher:
    """Publisher (and BatchPublisher) onto the SQL transport."""

    def __init__(self, transport: SqlTransport) -> None:
        self.transport = transport
        self.engine = transport.engine

    def publish(self, message: Message) -> None:
        self.publish_batch([message])

    def publish_batch(self, messages_: Sequence[Message]) -> None:
        if not messages_:
            return
        now = utcnow()
        try:
            with self.transport.engine.begin() as conn:
                conn.execute(messages.insert(), [_row(m, now) for m in messages_])
        except SQLAlchemyError as exc:
            raise _wrap(exc, self.transport.engine) from exc

    def close(self) -> None:
        pass


def _headers(raw: str) -> dict[str, str]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


class SqlSubscriber:
    """Subscriber of one topic for one consumer group on the SQL transport."""

    def __init__(self, transport: SqlTransport, topic: str, group: str, *,
                 visibility_timeout: float) -> None:
        if visibility_timeout <= 0:
            raise ConfigurationError("visibility_timeout must be positive")
        self.transport = transport
        self.topic = topic
        self.group = group
        self.visibility_timeout = visibility_timeout

    def fetch(self, max_messages: int, wait_seconds: float) -> list[Delivery]:
        deadline = time.monotonic() + max(0.0, wait_seconds)
        while True:
            try:
                found = self._fetch_once(max_messages)
            except SQLAlchemyError as exc:
                raise _wrap(exc, self.transport.engine) from exc
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(self.transport.poll_interval)

    def _fetch_once(self, max_messages: int) -> list[Delivery]:
        engine = self.transport.engine
        now = utcnow()
        with engine.begin() as conn:
            lock_for_writing(conn, deliveries)
            # Give this group a delivery row for every message it has not seen yet.
            unseen = (
                select(literal(self.group), messages.c.seq, messages.c.topic, literal(READY),
                       literal(0), literal(now))
                .where(messages.c.topic == self.topic)
                .where(~exists().where(and_(deliveries.c.consumer_group == self.group,
                                            deliveries.c.seq == messages.c.seq)))
                .order_by(messages.c.seq)  # one lock order for concurrent consumers
            )
            conn.execute(insert_ignore(conn, deliveries).from_select(
                ["consumer_group", "seq", "topic", "status", "attempts", "visible_at"], unseen
            ))
            query = (
                select(deliveries.c.seq, deliveries.c.attempts)
                .where(deliveries.c.consumer_group == self.group, deliveries.c.status == READY,
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
                .where(deliveries.c.consumer_group == self.group, deliveries.c.seq.in_(seqs))
                .values(attempts=deliveries.c.attempts + 1,
                        visible_at=now + dt.timedelta(seconds=self.visibility_timeout))
            )
            rows = conn.execute(select(messages).where(messages.c.seq.in_(seqs))
                                .order_by(messages.c.seq)).all()
        attempts = {r.seq: r.attempts + 1 for r in claimed}
        return [
            Delivery(
                topic=r.topic, payload=bytes(r.payload), message_id=r.message_id,
                attempt=attempts[r.seq], key=r.key, tag=r.tag, headers=_headers(r.headers),
                handle=r.seq,
            )
            for r in rows
        ]

    def _set(self, delivery: Delivery, **values: Any) -> None:
        try:
            with self.transport.engine.begin() as conn:
                conn.execute(update(deliveries).where(
                    deliveries.c.consumer_group == self.group, deliveries.c.seq == delivery.handle
                ).values(**values))
        except SQLAlchemyError as exc:
            raise _wrap(exc, self.transport.engine) from exc

    def ack(self, delivery: Delivery) -> None:
        self._set(delivery, status=DONE, last_error=None)

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        self._set(delivery, visible_at=utcnow() + dt.timedelta(seconds=delay_seconds),
                  last_error=error)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self._set(delivery, status=DEAD, last_error=reason)

    def close(self) -> None:
        pass
