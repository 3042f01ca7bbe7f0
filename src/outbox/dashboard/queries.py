"""What the dashboard reads and changes, as plain functions over a sync engine.

Listing pages by keyset on ``seq`` (newest first: ``seq < after``), never OFFSET, so
page 1000 of a large table costs what page 1 does. A filter is a :class:`Filter`; the
bulk actions (replay, discard) touch only dead rows that match it and were there when
the operator was shown the count (``seq <= upto``), in bounded batches.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, func, inspect, select

from .. import instrument, storage
from ..envelope import decode_headers
from ..errors import ConfigurationError
from ..message import Message
from ..relay import announce
from ..schema import (
    DEAD,
    DISCARDED,
    PENDING,
    SENT,
    consumer_dead_letters,
    inbox,
    outbox_messages,
    transaction_log,
    utcnow,
)
from ..transaction import DEFAULT_LOCAL_TRANSACTION_TIMEOUT, message_created_at

T = outbox_messages
STATUSES = (PENDING, SENT, DEAD, DISCARDED)
PAGE = 50
MAX_PAGE = 500
#: Rows changed per transaction by a bulk action.
BATCH = 500

#: A hook that gets each message before it is shown and returns what to show, e.g.
#: with card numbers blanked: ``lambda m: dataclasses.replace(m, payload=b"{}")``.
Redactor = Callable[[Message], Message]


def _text(value: str, name: str, limit: int = 200) -> str:
    value = value.strip()
    if len(value) > limit:
        raise ConfigurationError(f"{name} is longer than {limit} characters")
    return value


def _time(value: str, name: str) -> dt.datetime | None:
    value = value.strip()
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigurationError(
            f"{name} {value!r} is not a time; give e.g. 2026-12-01T09:30 (UTC)") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@dataclass(frozen=True)
class Filter:
    """Which outbox rows a listing or a bulk action is about. Empty fields match all;
    times are UTC and compare with ``created_at``."""

    status: str = ""
    topic: str = ""
    key: str = ""
    error: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    @classmethod
    def parse(cls, params: Any) -> Filter:
        """From query or form parameters (a mapping of str to str); a clear error for
        what does not fit."""
        status = str(params.get("status", "")).strip()
        if status and status not in STATUSES:
            raise ConfigurationError(
                f"status {status!r} is not one of {', '.join(STATUSES)}")
        return cls(status=status,
                   topic=_text(str(params.get("topic", "")), "topic"),
                   key=_text(str(params.get("key", "")), "key"),
                   error=_text(str(params.get("error", "")), "error text"),
                   since=_time(str(params.get("since", "")), "since"),
                   until=_time(str(params.get("until", "")), "until"))

    def params(self) -> dict[str, str]:
        """The filter as query parameters (the empty ones left out)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dt.datetime):
                value = value.isoformat(timespec="seconds")
            if value:
                out[f.name] = str(value)
        return out

    def conditions(self) -> list[ColumnElement[bool]]:
        out: list[ColumnElement[bool]] = []
        if self.status:
            out.append(T.c.status == self.status)
        if self.topic:
            out.append(T.c.topic == self.topic)
        if self.key:
            out.append(T.c.key == self.key)
        if self.error:
            out.append(T.c.last_error.like(_like(self.error), escape="\\"))
        if self.since is not None:
            out.append(T.c.created_at >= self.since)
        if self.until is not None:
            out.append(T.c.created_at < self.until)
        return out

    def dead(self) -> Filter:
        """The same filter on dead rows only (what the bulk actions touch)."""
        return replace(self, status=DEAD)


@dataclass(frozen=True)
class Row:
    seq: int
    message_id: str
    topic: str
    key: str | None
    status: str
    attempts: int
    last_error: str | None
    created_at: dt.datetime
    sent_at: dt.datetime | None
    next_attempt_at: dt.datetime


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    next_after: int | None  #: pass as ``after`` for the next page; None on the last


LIST_COLUMNS = (T.c.seq, T.c.message_id, T.c.topic, T.c.key, T.c.status, T.c.attempts,
                T.c.last_error, T.c.created_at, T.c.sent_at, T.c.next_attempt_at)


def page_size(raw: str | None) -> int:
    if not raw:
        return PAGE
    try:
        n = int(raw)
    except ValueError:
        raise ConfigurationError(f"limit {raw!r} is not a whole number") from None
    if not 1 <= n <= MAX_PAGE:
        raise ConfigurationError(f"limit must be from 1 to {MAX_PAGE}, got {n}")
    return n


def after_seq(raw: str | None) -> int | None:
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"after {raw!r} is not a row number") from None


def list_messages(conn: Connection, flt: Filter, *, after: int | None = None,
                  limit: int = PAGE) -> Page:
    """One page, newest first, of the rows matching ``flt`` below ``after``."""
    stmt = select(*LIST_COLUMNS).where(*flt.conditions())
    if after is not None:
        stmt = stmt.where(T.c.seq < after)
    rows = [Row(**r._asdict())
            for r in conn.execute(stmt.order_by(T.c.seq.desc()).limit(limit + 1))]
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, rows[-1].seq if more and rows else None)


def topics(conn: Connection) -> list[str]:
    return list(conn.scalars(select(T.c.topic).distinct().order_by(T.c.topic)))


@dataclass(frozen=True)
class Overview:
    counts: dict[str, int]
    backlog: list[storage.TopicBacklog]
    parked_keys: int
    consumer_dead_letters: dict[str, int]
    inbox_last_minute: dict[str, int]
    now: dt.datetime

    def lag_seconds(self, topic: storage.TopicBacklog) -> float:
        oldest = topic.oldest_pending
        return max((self.now - oldest).total_seconds(), 0.0) if oldest else 0.0

    @property
    def lag(self) -> float:
        """The age of the oldest pending row of any topic, in seconds."""
        return max((self.lag_seconds(t) for t in self.backlog), default=0.0)


def overview(conn: Connection) -> Overview:
    now = utcnow()
    tables = set(inspect(conn).get_table_names())
    dead_letters: dict[str, int] = {}
    if consumer_dead_letters.name in tables:
        c = consumer_dead_letters.c
        dead_letters = {g: int(n) for g, n in conn.execute(
            select(c.consumer_group, func.count()).group_by(c.consumer_group)
            .order_by(c.consumer_group))}
    recent = {g: int(n) for g, n in conn.execute(
        select(inbox.c.consumer_group, func.count())
        .where(inbox.c.processed_at >= now - dt.timedelta(minutes=1))
        .group_by(inbox.c.consumer_group).order_by(inbox.c.consumer_group))}
    parked = conn.scalar(select(func.count(func.distinct(T.c.key)))
                         .where(T.c.status == DEAD, T.c.key.is_not(None))) or 0
    return Overview(storage.counts(conn), storage.topic_backlog(conn), int(parked),
                    dead_letters, recent, now)


@dataclass(frozen=True)
class Shown:
    """A message as the details page shows it (after the redaction hook)."""

    row: Row
    tag: str | None
    headers: dict[str, str]
    payload: str
    payload_kind: str  #: "json", "text" or "bytes"
    inbox: list[tuple[str, dt.datetime]]
    check: CheckAnswer


def _pretty(payload: bytes) -> tuple[str, str]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload[:4096].hex(" ") + (" ..." if len(payload) > 4096 else ""), "bytes"
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False, sort_keys=True), "json"
    except ValueError:
        return text, "text"


def message_details(conn: Connection, message_id: str, redact: Redactor | None,
                    timeout: dt.timedelta) -> Shown | None:
    found = conn.execute(
        select(*LIST_COLUMNS, T.c.tag, T.c.headers, T.c.payload)
        .where(T.c.message_id == message_id)).first()
    if found is None:
        return None
    row = Row(*found[:len(LIST_COLUMNS)])
    tag, headers_text, payload = found[len(LIST_COLUMNS):]
    message = Message.stored(id=row.message_id, topic=row.topic, payload=payload, key=row.key,
                             tag=tag, headers=decode_headers(headers_text))
    if redact is not None:
        message = redact(message)
    text, kind = _pretty(message.payload)
    processed = [(g, at) for g, at in conn.execute(
        select(inbox.c.consumer_group, inbox.c.processed_at)
        .where(inbox.c.message_id == message_id).order_by(inbox.c.processed_at))]
    return Shown(row, message.tag, dict(message.headers), text, kind, processed,
                 check_answer(conn, message_id, timeout))


def inbox_lookup(conn: Connection, group: str, message_id: str,
                 limit: int = PAGE) -> list[tuple[str, str, dt.datetime]]:
    """Inbox rows: of ``message_id`` (every group, or ``group``), or the latest of
    ``group``."""
    stmt = select(inbox.c.consumer_group, inbox.c.message_id, inbox.c.processed_at)
    if group:
        stmt = stmt.where(inbox.c.consumer_group == group)
    if message_id:
        stmt = stmt.where(inbox.c.message_id == message_id)
    stmt = stmt.order_by(inbox.c.processed_at.desc()).limit(limit)
    return [(g, m, at) for g, m, at in conn.execute(stmt)]


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    consumer_group: str
    message_id: str | None
    topic: str
    reason: str
    attempts: int


def consumer_dead_letter_page(conn: Connection, group: str, after: int | None,
                              limit: int = PAGE) -> tuple[list[DeadLetter], int | None]:
    if consumer_dead_letters.name not in set(inspect(conn).get_table_names()):
        return [], None
    c = consumer_dead_letters.c
    stmt = select(c.seq, c.consumer_group, c.message_id, c.topic, c.reason, c.attempts)
    if group:
        stmt = stmt.where(c.consumer_group == group)
    if after is not None:
        stmt = stmt.where(c.seq < after)
    rows = [DeadLetter(*r) for r in conn.execute(stmt.order_by(c.seq.desc()).limit(limit + 1))]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].seq if more and rows else None)


@dataclass(frozen=True)
class CheckAnswer:
    """What a RocketMQ check-back would answer for a message now, and why."""

    answer: str  #: "COMMIT", "UNKNOWN" or "ROLLBACK"
    why: str
    logged_at: dt.datetime | None = None


def check_answer(conn: Connection, message_id: str,
                 timeout: dt.timedelta = DEFAULT_LOCAL_TRANSACTION_TIMEOUT) -> CheckAnswer:
    """The transaction log's answer, as the producer's check-back gives it: COMMIT with
    a log row; without one, UNKNOWN while the local transaction may still commit (the
    message is younger than the local-transaction timeout), ROLLBACK once it cannot."""
    now = utcnow()  # before the read, as the check-back does
    logged = conn.scalar(select(transaction_log.c.created_at)
                         .where(transaction_log.c.transaction_id == message_id))
    if logged is not None:
        return CheckAnswer("COMMIT", "the transaction log has its row: the local "
                                     "transaction committed", logged)
    headers_text = conn.scalar(select(T.c.headers).where(T.c.message_id == message_id))
    created = None
    if headers_text is not None:
        created = message_created_at(Message.stored(
            id=message_id, topic="-", payload=b"", key=None, tag=None,
            headers=decode_headers(headers_text)))
    limit = f"the local-transaction timeout ({timeout.total_seconds():.0f} s)"
    if created is not None and now - created < timeout:
        return CheckAnswer("UNKNOWN", f"no transaction-log row yet, and the message is "
                                      f"younger than {limit}: it may still commit; the "
                                      "broker asks again")
    if created is None:
        why = ("no transaction-log row, and no outbox row that says when the message was "
               "built: the local transaction never committed here (or its log row was "
               "purged)")
    else:
        why = (f"no transaction-log row, and the message is older than {limit}: the local "
               "transaction can no longer commit")
    return CheckAnswer("ROLLBACK", why)


def count_dead(conn: Connection, flt: Filter) -> tuple[int, int]:
    """How many dead rows match ``flt``, and the newest one's seq (the ``upto`` a bulk
    action is confirmed with)."""
    n, upto = conn.execute(
        select(func.count(), func.max(T.c.seq)).where(*flt.dead().conditions())).one()
    return int(n), int(upto or 0)


def count_dead_ids(conn: Connection, ids: Sequence[str]) -> int:
    """How many of the named rows are dead (what a replay or discard of them touches)."""
    total = 0
    for start in range(0, len(ids), BATCH):
        chunk = list(ids[start:start + BATCH])
        total += int(conn.scalar(select(func.count()).where(
            T.c.status == DEAD, T.c.message_id.in_(chunk))) or 0)
    return total


def dead_ids(engine: Engine, flt: Filter, upto: int) -> Iterator[list[str]]:
    """The ids of the dead rows matching ``flt`` up to ``upto``, oldest first, in
    batches."""
    last = 0
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                select(T.c.seq, T.c.message_id)
                .where(and_(*flt.dead().conditions(), T.c.seq > last, T.c.seq <= upto))
                .order_by(T.c.seq).limit(BATCH)).all()
        if not rows:
            return
        last = rows[-1].seq
        yield [r.message_id for r in rows]


ACTIONS = {"replay": storage.replay_dead, "discard": storage.discard_dead}


def apply(engine: Engine, action: str, ids: Sequence[str]) -> int:
    """Replay or discard the named dead rows (others are left alone); how many changed."""
    change = ACTIONS[action]
    done = 0
    for start in range(0, len(ids), BATCH):
        with engine.begin() as conn:
            n = change(conn, list(ids[start:start + BATCH]))
        announce(instrument.REPLAYED if action == "replay" else instrument.DISCARDED, n)
        done += n
    return done


def apply_filter(engine: Engine, action: str, flt: Filter, upto: int) -> int:
    """Replay or discard the dead rows matching ``flt`` up to ``upto``; how many changed."""
    return sum(apply(engine, action, ids) for ids in dead_ids(engine, flt, upto))
