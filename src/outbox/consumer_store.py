"""What a consumer keeps in its own database for a broker that does not keep it.

A broker without a delivery count (Kafka) cannot say how often a message failed, so
the consumer counts failed attempts per (group, message) in
:data:`~outbox.schema.consumer_attempts`; a broker without a dead-letter destination
leaves the consumer to keep what it gave up on in
:data:`~outbox.schema.consumer_dead_letters`. Each function takes a
:class:`~sqlalchemy.Connection` and runs in a transaction of its own (the sync
consumer calls them directly, the asyncio one through ``run_sync``), so a count or a
dead letter is durable before the broker hears of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.exc import IntegrityError

from .db import dialect_name, insert_ignore_for
from .schema import consumer_attempts, consumer_dead_letters, utcnow
from .transport import Delivery

MAX_ERROR_LENGTH = 2000


def record_failure(conn: Connection, group: str, message_id: str, error: str) -> int:
    """Count one more failed attempt of ``message_id`` by ``group``; returns the count."""
    t = consumer_attempts.c
    where = (t.consumer_group == group) & (t.message_id == message_id)
    values = {"last_error": error[:MAX_ERROR_LENGTH], "updated_at": utcnow()}
    for _ in range(2):  # a concurrent first failure may win the INSERT: then UPDATE
        try:
            with conn.begin():
                changed = conn.execute(update(consumer_attempts).where(where).values(
                    attempts=t.attempts + 1, **values)).rowcount
                if not changed:
                    conn.execute(consumer_attempts.insert().values(
                        consumer_group=group, message_id=message_id, attempts=1, **values))
                return int(conn.execute(select(t.attempts).where(where)).scalar_one())
        except IntegrityError:
            continue
    raise RuntimeError(f"could not count the attempt of message {message_id!r}")


def forget_attempts(conn: Connection, group: str, message_id: str) -> None:
    """Drop the failure count of a message that has now been settled (in the caller's
    transaction)."""
    t = consumer_attempts.c
    conn.execute(delete(consumer_attempts).where(
        (t.consumer_group == group) & (t.message_id == message_id)))


def store_dead_letter(conn: Connection, group: str, delivery: Delivery, reason: str,
                      attempts: int) -> None:
    """Keep ``delivery`` as dead for ``group`` (once: a redelivery adds no second row)
    and drop its failure count, in one transaction."""
    row = {
        "consumer_group": group, "message_id": delivery.message_id,
        "topic": delivery.topic[:200], "key": (delivery.key or None) and delivery.key[:200],
        "tag": (delivery.tag or None) and delivery.tag[:100],
        "headers": json.dumps(dict(delivery.headers), ensure_ascii=False),
        "payload": bytes(delivery.payload), "reason": reason, "attempts": attempts,
        "dead_at": utcnow(),
    }
    with conn.begin():
        conn.execute(insert_ignore_for(dialect_name(conn), consumer_dead_letters), row)
        if delivery.message_id:
            forget_attempts(conn, group, delivery.message_id)


@dataclass(frozen=True, slots=True)
class ConsumerDeadLetter:
    """One message a consumer gave up on, as kept in its own database."""

    seq: int
    group: str
    message_id: str | None
    topic: str
    key: str | None
    tag: str | None
    headers: dict[str, str]
    payload: bytes
    reason: str
    attempts: int
    dead_at: Any


def _dead_letter(row: Any) -> ConsumerDeadLetter:
    try:
        headers = json.loads(row.headers)
    except ValueError:
        headers = {}
    return ConsumerDeadLetter(
        seq=row.seq, group=row.consumer_group, message_id=row.message_id, topic=row.topic,
        key=row.key, tag=row.tag, headers=headers, payload=bytes(row.payload),
        reason=row.reason, attempts=row.attempts, dead_at=row.dead_at)


def list_dead_letters(conn: Connection, group: str | None = None, limit: int = 1000
                      ) -> list[ConsumerDeadLetter]:
    t = consumer_dead_letters.c
    query = select(consumer_dead_letters).order_by(t.seq).limit(limit)
    if group is not None:
        query = query.where(t.consumer_group == group)
    return [_dead_letter(row) for row in conn.execute(query)]


def consumer_dead_letters_of(engine: Engine, group: str | None = None, limit: int = 1000
                             ) -> list[ConsumerDeadLetter]:
    """The messages consumers on ``engine``'s database dead-lettered themselves (those
    whose broker has no dead-letter destination), oldest first."""
    with engine.connect() as conn:
        return list_dead_letters(conn, group, limit)
