"""SQL for the outbox table: write, claim in order, mark, park, replay, purge.

Every function takes an open :class:`~sqlalchemy.Connection` (or a Session's
connection) inside a transaction the caller owns; nothing here commits.

The order promise: rows with one key are published in ``seq`` (commit) order. A
row that is backing off, or dead, parks its key: later pending rows of that key
wait, while other keys and rows without a key go on. Replaying a dead row (it keeps
its ``seq``) or discarding it releases the key, in order.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    CompoundSelect,
    Connection,
    Executable,
    Insert,
    Integer,
    Select,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    or_,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import dialect_name, lock_for_writing, supports_skip_locked
from .envelope import decode_headers, delivery_time, encode_headers
from .errors import ConfigurationError, DuplicateMessageError
from .message import Message
from .schema import (
    DEAD,
    DISCARDED,
    PENDING,
    SENT,
    consumer_attempts,
    inbox,
    outbox_messages,
    transaction_log,
    utcnow,
)

T = outbox_messages


def message_row(message: Message, now: dt.datetime) -> dict[str, object]:
    return {
        "message_id": message.id,
        "topic": message.topic,
        "key": message.key,
        "tag": message.tag,
        "headers": encode_headers(message.headers),
        "payload": message.payload,
        "status": PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


#: The one extra statement of a write, built once: SQLAlchemy compiles it once and
#: the driver prepares it (psycopg after a few executions).
INSERT_MESSAGE: Insert = T.insert()


def insert_message(
    message: Message, *, due_at: dt.datetime | None = None
) -> tuple[Insert, dict[str, object]]:
    """The INSERT of ``message`` as a pending outbox row, and its parameters.

    ``due_at`` holds the row back until then (a guard row, see the RocketMQ adapter).
    A message with a delivery time (the ``outbox-deliver-at`` header) is held back
    until that time too: the row is due at the later of the two, and never before
    now. While it waits, the later rows of its key wait behind it (see :func:`claim`).
    """
    now = utcnow()
    row = message_row(message, now)
    due = now if due_at is None else due_at
    deliver = delivery_time(message.headers)
    if deliver is not None and deliver > due:
        due = deliver
    row["next_attempt_at"] = due
    return INSERT_MESSAGE, row


def add_message(
    session: Session | Connection, message: Message, *, due_at: dt.datetime | None = None
) -> None:
    """Execute :func:`insert_message`; a reused id is a DuplicateMessageError."""
    try:
        session.execute(*insert_message(message, due_at=due_at))
    except IntegrityError:
        raise duplicate_id(message) from None


def duplicate_id(message: Message) -> DuplicateMessageError:
    return DuplicateMessageError(
        f"message id {message.id!r} was already used on topic {message.topic!r}; give "
        "every message its own id (the consumer would drop the second as a duplicate)"
    )


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    seq: int
    attempts: int
    message: Message


def stored_message(message_id: str, topic: str, payload: bytes, key: str | None,
                   tag: str | None, headers: str) -> Message:
    """The :class:`Message` of an outbox row's columns (checked when it was written)."""
    return Message.stored(id=message_id, topic=topic, payload=bytes(payload), key=key,
                          tag=tag, headers=decode_headers(headers))


def to_message(row: object) -> Message:
    """Rebuild the :class:`Message` an outbox row holds (checked when it was written)."""
    r: Any = row
    return stored_message(r.message_id, r.topic, r.payload, r.key, r.tag, r.headers)


def _in_list(column: Any, name: str, postgres: bool) -> ColumnElement[bool]:
    # PostgreSQL: ``= ANY(array)``, one statement text for any list length, so the
    # driver prepares it once; elsewhere an expanding IN.
    if postgres:
        clause: ColumnElement[bool] = column == any_(
            bindparam(name, type_=postgresql.ARRAY(column.type)))
        return clause
    clause = column.in_(bindparam(name, expanding=True))
    return clause


@functools.cache
def _claim_statements(dialect: str, skip_locked: bool) -> tuple[Select[Any], CompoundSelect[Any]]:
    """The claim's two queries, built once per database kind: SQLAlchemy compiles them
    once and the driver may prepare them. Bound: ``now``, ``batch`` and ``keys``/``top``."""
    now = bindparam("now", type_=T.c.next_attempt_at.type)
    # Leave out rows queued behind a same-key row that is dead, or due later than
    # they are (backing off, or replayed): that row comes later in due order or not
    # at all, so they would fill the batch, all be held back below, and starve every
    # other key. The first row left in due order can then always go. Two probes per
    # candidate row, each an exact range of the (key, status, seq) index, so their
    # cost does not grow with the key's sent history.
    waiting = T.alias("waiting")
    same_key_before = and_(waiting.c.key == T.c.key, waiting.c.seq < T.c.seq)
    dead_before = exists().where(same_key_before, waiting.c.status == DEAD)
    due_later_before = exists().where(
        same_key_before, waiting.c.status == PENDING,
        waiting.c.next_attempt_at > T.c.next_attempt_at,
    )
    due = (
        select(T.c.seq, T.c.message_id, T.c.topic, T.c.key, T.c.tag, T.c.headers,
               T.c.payload, T.c.attempts)
        .where(T.c.status == PENDING, T.c.next_attempt_at <= now, ~dead_before,
               ~due_later_before)
        .order_by(T.c.next_attempt_at, T.c.seq)
        .limit(bindparam("batch", type_=Integer()))
    )
    if skip_locked:
        due = due.with_for_update(skip_locked=True)
    keys = _in_list(T.c.key, "keys", dialect == "postgresql")
    top = bindparam("top", type_=BigInteger())
    earlier = union_all(*(
        select(T.c.seq, T.c.key).where(T.c.status == status, keys, T.c.seq < top)
        for status in (PENDING, DEAD)
    ))
    return due, earlier


@functools.cache
def _claim_in_one() -> Select[Any]:
    """PostgreSQL's claim in one statement (one round trip): the due rows locked in a
    CTE, less those with an earlier pending same-key row the CTE does not hold (locked
    by another relay, or due later than the batch's last). Dead rows before a
    candidate already kept it out of the CTE, in the same snapshot."""
    due, _ = _claim_statements("postgresql", True)
    mine = due.cte("mine")
    waiting = T.alias("waiting")
    foreign_before = exists().where(
        waiting.c.key == mine.c.key, waiting.c.status == PENDING, waiting.c.seq < mine.c.seq,
        waiting.c.seq.not_in(select(mine.c.seq).scalar_subquery()),
    )
    return select(*mine.c).where(or_(mine.c.key.is_(None), ~foreign_before))


def claim(conn: Connection, batch_size: int, now: dt.datetime) -> list[ClaimedRow]:
    """Lock up to ``batch_size`` due rows that may be published now, in seq order.

    Rows another relay holds are skipped (``FOR UPDATE SKIP LOCKED``; on SQLite the
    claim takes the single write lock). A row is held back while an earlier row
    with the same key is still pending and not part of this claim, or dead (its key
    is parked until the dead row is replayed or discarded), so messages with one
    key leave in commit order even with several relays running. A delayed row
    (``next_attempt_at`` its delivery time) is such an earlier pending row: the
    later rows of its key wait until it has gone.

    Due rows are read in due-time order from the (status, next_attempt_at, seq)
    index: rows backing off sort after every due row, so however many of them wait
    at the head of the queue (after a broker outage), a claim reads only rows it
    can take, and costs the same at any backlog.
    """
    lock_for_writing(conn, T)
    dialect = dialect_name(conn)
    due, earlier_rows = _claim_statements(dialect, supports_skip_locked(conn))
    # PostgreSQL checks the same-key rows inside the claim; elsewhere a second query.
    claim_statement = _claim_in_one() if dialect == "postgresql" else due
    rows = sorted(conn.execute(claim_statement, {"now": now, "batch": batch_size}).all(),
                  key=lambda r: r.seq)
    first_foreign: dict[str, int] = {}
    keys = {r.key for r in rows if r.key is not None}
    if keys and dialect != "postgresql":
        mine = {r.seq for r in rows}
        # Pending rows seen here but not claimed are locked by another relay, were
        # added meanwhile, or came due later than the batch's last (a replayed row);
        # a row that died since the query above parks too.
        earlier = conn.execute(earlier_rows, {"keys": list(keys), "top": rows[-1].seq})
        for seq, key in earlier:
            if seq not in mine and seq < first_foreign.get(key, seq + 1):
                first_foreign[key] = seq
    # Unpacked in the select's column order: the relay's hottest loop.
    return [
        ClaimedRow(seq, attempts, stored_message(message_id, topic, payload, key, tag, headers))
        for seq, message_id, topic, key, tag, headers, payload, attempts in rows
        if key is None or seq < first_foreign.get(key, seq + 1)
    ]


def mark_sent(
    conn: Connection, seqs: Sequence[int], now: dt.datetime, *, delete_sent: bool
) -> None:
    if not seqs:
        return
    postgres = dialect_name(conn) == "postgresql"
    bound: object = "{" + ",".join(map(str, seqs)) + "}" if postgres else list(seqs)
    conn.execute(_MARK_SENT[postgres][delete_sent], {"seqs": bound, "now": now})


def _mark_sent_statements(postgres: bool) -> tuple[Executable, Executable]:
    # On PostgreSQL the seqs travel as one array literal, '{1,2,3}': built by one
    # join instead of the driver adapting a list element by element.
    seqs = (T.c.seq == any_(cast(bindparam("seqs", type_=Text()), postgresql.ARRAY(BigInteger)))
            if postgres else T.c.seq.in_(bindparam("seqs", expanding=True)))
    return (
        update(T).where(seqs).values(status=SENT, sent_at=bindparam("now"), last_error=None),
        delete(T).where(seqs),
    )


#: By "is PostgreSQL": mark as sent, and delete.
_MARK_SENT = {postgres: _mark_sent_statements(postgres) for postgres in (False, True)}


def settle_guard(conn: Connection, message_id: str, now: dt.datetime) -> bool:
    """Mark a pending guard row as sent (its message went out another way)."""
    result = conn.execute(
        update(T).where(T.c.message_id == message_id, T.c.status == PENDING)
        .values(status=SENT, sent_at=now)
    )
    return bool(result.rowcount)


@dataclass(frozen=True, slots=True)
class Failure:
    seq: int
    attempts: int
    next_attempt_at: dt.datetime
    error: str
    dead: bool


def mark_failed(conn: Connection, failures: Sequence[Failure]) -> None:
    """Record failed attempts in one executemany round trip."""
    if not failures:
        return
    stmt = (
        update(T)
        .where(T.c.seq == bindparam("b_seq"))
        .values(
            attempts=bindparam("b_attempts"),
            next_attempt_at=bindparam("b_next"),
            last_error=bindparam("b_error"),
            status=bindparam("b_status"),
        )
    )
    conn.execute(
        stmt,
        [
            {
                "b_seq": f.seq, "b_attempts": f.attempts, "b_next": f.next_attempt_at,
                "b_error": f.error, "b_status": DEAD if f.dead else PENDING,
            }
            for f in failures
        ],
    )


def read_messages(conn: Connection, *, status: str = SENT, limit: int = 100) -> list[Message]:
    """The oldest ``limit`` messages in ``status`` (pending, sent, dead or discarded)."""
    rows = conn.execute(
        select(T).where(T.c.status == status).order_by(T.c.seq).limit(limit)
    ).all()
    return [to_message(r) for r in rows]


@dataclass(frozen=True, slots=True)
class DeadRow:
    message_id: str
    topic: str
    key: str | None
    attempts: int
    last_error: str | None
    created_at: dt.datetime


def _check_limit(limit: int) -> None:
    # A negative LIMIT means "no limit" to SQLite; never list a whole table by accident.
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(f"limit must be a whole number of at least 1, got {limit!r}")


def list_dead(conn: Connection, limit: int = 100) -> list[DeadRow]:
    """The oldest ``limit`` dead rows with their last error."""
    _check_limit(limit)
    rows = conn.execute(
        select(T.c.message_id, T.c.topic, T.c.key, T.c.attempts, T.c.last_error, T.c.created_at)
        .where(T.c.status == DEAD)
        .order_by(T.c.seq)
        .limit(limit)
    ).all()
    return [DeadRow(*r) for r in rows]


@dataclass(frozen=True, slots=True)
class ParkedKey:
    """A key whose rows wait behind dead rows: ``dead_ids`` oldest first, and how
    many pending rows of the key wait behind the oldest of them."""

    key: str
    dead_ids: tuple[str, ...]
    waiting: int


def list_parked_keys(conn: Connection, limit: int = 100) -> list[ParkedKey]:
    """Up to ``limit`` parked keys, the one parked longest first."""
    _check_limit(limit)
    keys = list(conn.scalars(
        select(T.c.key)
        .where(T.c.status == DEAD, T.c.key.is_not(None))
        .group_by(T.c.key)
        .order_by(func.min(T.c.seq))
        .limit(limit)
    ))
    if not keys:
        return []
    dead_ids: dict[str, list[str]] = {k: [] for k in keys}
    for key, message_id in conn.execute(
        select(T.c.key, T.c.message_id)
        .where(T.c.status == DEAD, T.c.key.in_(keys))
        .order_by(T.c.seq)
    ):
        dead_ids[key].append(message_id)
    heads = (
        select(T.c.key, func.min(T.c.seq).label("first_seq"))
        .where(T.c.status == DEAD, T.c.key.in_(keys))
        .group_by(T.c.key)
        .subquery("heads")
    )
    waiting: dict[str, int] = {
        key: int(n) for key, n in conn.execute(
            select(T.c.key, func.count())
            .join(heads, and_(T.c.key == heads.c.key, T.c.seq > heads.c.first_seq))
            .where(T.c.status == PENDING)
            .group_by(T.c.key)
        )
    }
    return [ParkedKey(k, tuple(dead_ids[k]), waiting.get(k, 0)) for k in keys]


def _named_ids(message_ids: Iterable[str], what: str) -> list[str]:
    if isinstance(message_ids, str | bytes):
        raise ConfigurationError(f"{what} takes a list of message ids, not one string")
    return list(message_ids)


def oldest_dead_ids(conn: Connection, limit: int) -> list[str]:
    """The ids of the oldest ``limit`` dead rows."""
    _check_limit(limit)
    return list(conn.scalars(select(T.c.message_id).where(T.c.status == DEAD)
                             .order_by(T.c.seq).limit(limit)))


def replay_dead(conn: Connection, message_ids: Iterable[str] | None = None) -> int:
    """Make dead rows (all, or those named) pending again with fresh attempts;
    returns how many. A replayed row keeps its ``seq``, so it leaves before the
    rows of its key that waited behind it."""
    stmt = update(T).where(T.c.status == DEAD)
    if message_ids is not None:
        ids = _named_ids(message_ids, "replay_dead")
        if not ids:
            return 0
        stmt = stmt.where(T.c.message_id.in_(ids))
    result = conn.execute(stmt.values(status=PENDING, attempts=0, next_attempt_at=utcnow()))
    return int(result.rowcount)


def discard_dead(conn: Connection, message_ids: Iterable[str]) -> int:
    """Give up on the named dead rows: they become ``discarded`` (kept, with their
    last error, for audit; never published) and their keys flow again. Only rows
    named by id: there is deliberately no "discard all". Returns how many."""
    ids = _named_ids(message_ids, "discard_dead")
    if not ids:
        return 0
    result = conn.execute(
        update(T).where(T.c.status == DEAD, T.c.message_id.in_(ids)).values(status=DISCARDED)
    )
    return int(result.rowcount)


@dataclass(frozen=True, slots=True)
class TopicBacklog:
    """One topic's rows still to go: ``pending`` and when the oldest of them was
    written (the relay's lag), ``dead`` rows and how many keys they park."""

    topic: str
    pending: int
    oldest_pending: dt.datetime | None
    dead: int
    parked_keys: int


def topic_backlog(conn: Connection) -> list[TopicBacklog]:
    """Every topic with pending or dead rows, by name: one grouped query on the indexed
    status column (sent rows are not read)."""
    by_topic: dict[str, dict[str, Any]] = {}
    for status, topic, n, oldest, keys in conn.execute(
        select(T.c.status, T.c.topic, func.count(), func.min(T.c.created_at),
               func.count(func.distinct(T.c.key)))
        .where(T.c.status.in_((PENDING, DEAD)))
        .group_by(T.c.status, T.c.topic)
    ):
        row = by_topic.setdefault(topic, {"pending": 0, "oldest_pending": None, "dead": 0,
                                          "parked_keys": 0})
        if status == PENDING:
            row.update(pending=int(n), oldest_pending=oldest)
        else:
            row.update(dead=int(n), parked_keys=int(keys))
    return [TopicBacklog(topic, **by_topic[topic]) for topic in sorted(by_topic)]


def counts(conn: Connection) -> dict[str, int]:
    """Rows per status, e.g. ``{"pending": 3, "sent": 10, "dead": 0, "discarded": 0}``."""
    out = {PENDING: 0, SENT: 0, DEAD: 0, DISCARDED: 0}
    for status, n in conn.execute(select(T.c.status, func.count()).group_by(T.c.status)):
        out[status] = int(n)
    return out


def purge(conn: Connection, *, sent_before: dt.datetime, batch_size: int) -> int:
    """Delete one bounded batch of rows that were sent before ``sent_before``."""
    seqs = conn.scalars(
        select(T.c.seq).where(T.c.status == SENT, T.c.sent_at < sent_before)
        # The index's order (oldest first, roughly): no sort of every sent row.
        .order_by(T.c.next_attempt_at, T.c.seq).limit(batch_size)
    ).all()
    if seqs:
        conn.execute(delete(T).where(T.c.seq.in_(seqs)))
    return len(seqs)


def purge_inbox(conn: Connection, *, processed_before: dt.datetime, batch_size: int) -> int:
    """Delete one bounded batch of inbox rows older than ``processed_before``.

    Only purge what the broker can no longer redeliver: a purged row no longer
    de-duplicates a late duplicate.
    """
    pairs = conn.execute(
        select(inbox.c.consumer_group, inbox.c.message_id)
        .where(inbox.c.processed_at < processed_before)
        .limit(batch_size)
    ).all()
    if pairs:
        conn.execute(
            delete(inbox).where(
                tuple_(inbox.c.consumer_group, inbox.c.message_id).in_([tuple(p) for p in pairs])
            )
        )
    return len(pairs)


def purge_transaction_log(conn: Connection, *, created_before: dt.datetime, batch_size: int) -> int:
    ids = conn.scalars(
        select(transaction_log.c.transaction_id)
        .where(transaction_log.c.created_at < created_before)
        .limit(batch_size)
    ).all()
    if ids:
        conn.execute(delete(transaction_log).where(transaction_log.c.transaction_id.in_(ids)))
    return len(ids)


def purge_consumer_attempts(conn: Connection, *, updated_before: dt.datetime,
                            batch_size: int) -> int:
    """Delete one bounded batch of failure counts last touched before ``updated_before``
    (left by messages that were settled elsewhere, e.g. by another consumer)."""
    t = consumer_attempts.c
    pairs = conn.execute(
        select(t.consumer_group, t.message_id).where(t.updated_at < updated_before)
        .limit(batch_size)
    ).all()
    if pairs:
        conn.execute(delete(consumer_attempts).where(
            tuple_(t.consumer_group, t.message_id).in_([tuple(p) for p in pairs])))
    return len(pairs)
