"""The embedded SQL transport's tables and statements, written once.

Each function takes a sync :class:`~sqlalchemy.Connection`; :class:`outbox.SqlTransport`
calls them directly and ``outbox.aio.AsyncSqlTransport`` through ``run_sync``.

How a fetch finds new messages at a cost that does not grow with the messages
kept (see :func:`claim` for the argument that none is skipped): each consumer
group keeps, per topic, a *cursor* row in ``outbox_transport_cursors``: the
highest seq its fetches have scanned, and the *gaps* below it, the seqs that
were missing when a scan passed them. A fetch scans only the seqs above the
cursor and looks again only at the gaps, so it reads the new rows and a bounded
handful, never the history. A gap is a publisher that has not committed yet
(PostgreSQL and MariaDB number a row at INSERT, and transactions commit in any
order), or one that rolled back; a gap is looked at by every fetch until its row
turns up, or until ``late_commit_window`` seconds after the scan that found it.
"""

from __future__ import annotations

import bisect
import datetime as dt
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Dialect,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    any_,
    bindparam,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from .db import (
    claiming_options,
    dialect_name,
    insert_ignore,
    lock_for_writing,
    safe_url,
    supports_skip_locked,
)
from .envelope import decode_headers, delivery_time, encode_headers
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
READY_INDEX = "ix_outbox_transport_deliveries_ready"

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
    # SQLite: never hand out the seq of a deleted newest row again (a cursor may be
    # past it). Tables made before this keep their DDL; purge_older protects them.
    sqlite_autoincrement=True,
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
    # A claim reads the ready rows of one group and topic in seq order: this index
    # hands them out in that order, so the done and dead ones are never read.
    Index(READY_INDEX, "consumer_group", "topic", "status", "seq"),
    **TABLE_OPTIONS,
)

#: Where each consumer group is in each topic: every seq up to ``scanned_seq`` has
#: been looked at (a delivery row exists for those of the topic) except the
#: ``gaps``, ranges that were missing then, as ``lo-hi@since;...`` (``since`` in
#: Unix seconds). Made by the first fetch; ``create_tables`` adds the table to
#: databases of older versions.
cursors = Table(
    "outbox_transport_cursors",
    transport_metadata,
    Column("consumer_group", exact_string(NAME), nullable=False),
    Column("topic", exact_string(NAME), nullable=False),
    Column("scanned_seq", SEQ, nullable=False),
    Column("gaps", LONG_TEXT, nullable=False),
    PrimaryKeyConstraint("consumer_group", "topic"),
    **TABLE_OPTIONS,
)

#: How long a fetch goes on looking for a message whose seq it passed while the
#: message was not committed yet (see :func:`claim`).
DEFAULT_LATE_COMMIT_WINDOW = 900.0
#: Gap ranges a cursor keeps apart; beyond, the closest are merged (looked at as one
#: wider range, which costs the rows in between but loses nothing).
MAX_GAP_RANGES = 32
#: Rows one scan statement reads at least (more when a fetch asks for more).
SCAN_ROWS = 100
#: Rows a fetch scans at most when other topics fill the seqs above its cursor; the
#: next fetch goes on from there.
SCAN_BUDGET = 10_000


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


def check_late_commit_window(late_commit_window: float) -> None:
    if late_commit_window <= 0:
        raise ConfigurationError("late_commit_window must be positive")


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
    """The missing tables, and the indexes a table of an older version lacks."""
    with conn.begin():
        transport_metadata.create_all(conn)
        for table in transport_metadata.sorted_tables:
            for index in table.indexes:
                index.create(conn, checkfirst=True)


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


def unprocessed(conn: Connection) -> list[tuple[str, str, int]]:
    """``(topic, group, n)``: for each consumer group's cursor, the messages it has not
    processed yet (past its cursor, or claimed and not done). Both counts walk an
    index: ``(topic, seq)`` from the cursor on, and the group's ready deliveries."""
    out = []
    for group, topic, scanned in conn.execute(
            select(cursors.c.consumer_group, cursors.c.topic, cursors.c.scanned_seq)):
        unseen = conn.scalar(select(func.count()).where(
            messages.c.topic == topic, messages.c.seq > scanned)) or 0
        ready = conn.scalar(select(func.count()).where(
            deliveries.c.consumer_group == group, deliveries.c.topic == topic,
            deliveries.c.status == READY)) or 0
        out.append((topic, group, int(unseen) + int(ready)))
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


def _seqs_can_come_back(conn: Connection) -> bool:
    """Whether deleting the newest message would let its seq be handed out again:
    a SQLite table made before ``AUTOINCREMENT`` numbers a row max(seq) + 1."""
    if dialect_name(conn) != "sqlite":
        return False  # PostgreSQL sequences and InnoDB counters never go back
    ddl = conn.scalar(text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :n"),
                      {"n": messages.name})
    return "AUTOINCREMENT" not in (ddl or "").upper()


def purge_older(conn: Connection, older_than: dt.timedelta, batch_size: int) -> int:
    """One transaction per batch, so a big purge never holds locks for long.

    On a SQLite table of an older version the newest message stays whatever its age:
    its seq would otherwise be numbered again, below the cursors that passed it.
    """
    if batch_size < 1:
        # The loop ends on a short batch; a batch of 0 never is one.
        raise ConfigurationError("purge batch_size must be at least 1")
    cutoff = utcnow() - older_than
    query = select(messages.c.seq).where(messages.c.created_at < cutoff)
    with conn.begin():
        if _seqs_can_come_back(conn):
            query = query.where(messages.c.seq < select(func.max(messages.c.seq))
                                .scalar_subquery())
    query = query.order_by(messages.c.seq).limit(batch_size)
    total = 0
    while True:
        with conn.begin():
            seqs = conn.scalars(query).all()
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


_INSERT_MESSAGES = messages.insert()


def insert_messages(conn: Connection, batch: Sequence[Message]) -> None:
    """All of ``batch`` in one transaction: a row the database refuses refuses them all.

    One statement for the whole batch (an executemany: PyMySQL sends it as one
    multi-row INSERT, psycopg as one pipelined round trip, sqlite3 steps one
    prepared statement), then the commit.
    """
    if not batch:
        return
    now = utcnow()
    with conn.begin():
        conn.execute(_INSERT_MESSAGES, [_row(m, now) for m in batch])


# -- fetching: the cursor, its gaps, and the claim -----------------------------------

#: A range of seqs (both ends included) missing when a scan passed it, and when
#: (Unix seconds) that scan ran.
Gap = tuple[int, int, float]


def decode_gaps(value: str) -> list[Gap]:
    gaps: list[Gap] = []
    for part in value.split(";") if value else ():
        span, _, since = part.partition("@")
        lo, _, hi = span.partition("-")
        gaps.append((int(lo), int(hi), float(since)))
    return gaps


def encode_gaps(gaps: Sequence[Gap]) -> str:
    return ";".join(f"{lo}-{hi}@{since:.3f}" for lo, hi, since in gaps)


def _without(gaps: list[Gap], present: list[int]) -> list[Gap]:
    """``gaps`` less the seqs in ``present`` (sorted): the parts still missing."""
    out: list[Gap] = []
    for lo, hi, since in gaps:
        at = lo
        for seq in present[bisect.bisect_left(present, lo):bisect.bisect_right(present, hi)]:
            if seq > at:
                out.append((at, seq - 1, since))
            at = seq + 1
        if at <= hi:
            out.append((at, hi, since))
    return out


def _bounded(gaps: list[Gap]) -> list[Gap]:
    """At most MAX_GAP_RANGES ranges: merge the two closest while there are more.

    A merged range also covers seqs that were there; looking at it again reads those
    rows too and splits it back into what is missing, so nothing is lost, and its
    ``since`` is the later one, so no gap is given up sooner.
    """
    gaps = sorted(gaps)
    while len(gaps) > MAX_GAP_RANGES:
        i = min(range(len(gaps) - 1), key=lambda j: gaps[j + 1][0] - gaps[j][1])
        (lo, _, a), (_, hi, b) = gaps[i], gaps[i + 1]
        gaps[i:i + 2] = [(lo, hi, max(a, b))]
    return gaps


class _Statements:
    """The statements of one kind of database, built once with bind parameters so
    every fetch runs the same statement texts (and PostgreSQL takes lists as one
    array parameter, ``= ANY(:seqs)``, rather than an IN list of varying length)."""

    def __init__(self, conn: Connection) -> None:
        name = dialect_name(conn)
        skip_locked = supports_skip_locked(conn)
        self.serialized = name == "sqlite"  # one writer: the claim takes the write lock
        self.joined = name != "mysql"  # MariaDB cannot lock only the delivery rows of a join

        def seq_in(column: Any, param: str) -> ColumnElement[bool]:
            test: ColumnElement[bool]
            if name == "postgresql":
                test = column == any_(bindparam(param, type_=ARRAY(BigInteger())))
            else:
                test = column.in_(bindparam(param, expanding=True))
            return test

        group = bindparam("the_group", type_=deliveries.c.consumer_group.type)
        topic = bindparam("the_topic", type_=deliveries.c.topic.type)
        now = bindparam("now", type_=deliveries.c.visible_at.type)
        here = (cursors.c.consumer_group == group, cursors.c.topic == topic)

        self.cursor_read = select(cursors.c.scanned_seq, cursors.c.gaps).where(*here)
        self.cursor_lock = self.cursor_read.with_for_update(skip_locked=skip_locked)
        self.cursor_create = insert_ignore(conn, cursors).values(
            consumer_group=group, topic=topic, scanned_seq=0, gaps="")
        self.cursor_update = update(cursors).where(*here).values(
            scanned_seq=bindparam("new_scanned"), gaps=bindparam("new_gaps"))
        self.scan = (select(messages.c.seq, messages.c.topic)
                     .where(messages.c.seq > bindparam("after"))
                     .order_by(messages.c.seq).limit(bindparam("rows")))
        self._rechecks: dict[int, Any] = {}

        def force(stmt: Any, table: Table, index: str) -> Any:
            """MariaDB plans by statistics that lag a bulk load, and then reads a whole
            group's rows for a few; name the index whose order the statement follows."""
            for dialect in ("mysql", "mariadb"):
                stmt = stmt.with_hint(table, f"FORCE INDEX ({index})", dialect)
            return stmt

        def register(where: ColumnElement[bool], index: str) -> Any:
            rows = select(group, messages.c.seq, messages.c.topic, literal(READY, String()),
                          literal(0, Integer()), now
                          ).where(messages.c.topic == topic, where)
            return insert_ignore(conn, deliveries).from_select(
                ["consumer_group", "seq", "topic", "status", "attempts", "visible_at"],
                force(rows, messages, index))

        self.register_range = register((messages.c.seq > bindparam("lo"))
                                       & (messages.c.seq <= bindparam("hi")),
                                       "ix_outbox_transport_messages_topic_seq")
        self.register_seqs = register(seq_in(messages.c.seq, "seqs")
                                      & messages.c.seq.between(bindparam("lo"), bindparam("hi")),
                                      "PRIMARY")

        ready = (deliveries.c.consumer_group == group, deliveries.c.topic == topic,
                 deliveries.c.status == READY, deliveries.c.visible_at <= now)
        self.ready: Any
        if self.joined:
            self.ready = (
                select(deliveries.c.seq, deliveries.c.attempts, messages.c.topic,
                       messages.c.message_id, messages.c.key, messages.c.tag,
                       messages.c.headers, messages.c.payload)
                .join_from(deliveries, messages, messages.c.seq == deliveries.c.seq)
                .where(*ready).order_by(deliveries.c.seq).limit(bindparam("rows"))
            )
            if skip_locked:
                self.ready = self.ready.with_for_update(skip_locked=True, of=deliveries)
        else:
            self.ready = force(select(deliveries.c.seq, deliveries.c.attempts).where(*ready)
                               .order_by(deliveries.c.seq).limit(bindparam("rows")),
                               deliveries, READY_INDEX)
            if skip_locked:
                self.ready = self.ready.with_for_update(skip_locked=True)
        self.bodies = (select(messages.c.seq, messages.c.topic, messages.c.message_id,
                              messages.c.key, messages.c.tag, messages.c.headers,
                              messages.c.payload)
                       .where(seq_in(messages.c.seq, "seqs")).order_by(messages.c.seq))
        # Every index a planner may pick for these statements bounds what it reads by
        # the cursor, the ready rows or the rows named: none reads the done history,
        # even on statistics that have not caught up with a bulk load.
        self.hide = (update(deliveries)
                     .where(*ready[:3], seq_in(deliveries.c.seq, "seqs"))
                     .values(attempts=deliveries.c.attempts + 1,
                             visible_at=bindparam("until", type_=deliveries.c.visible_at.type)))
        # A delivery claimed before its message's delivery time: hidden until then, its
        # attempts untouched (it was not handed out).
        self.defer = (update(deliveries)
                      .where(deliveries.c.consumer_group == group,
                             deliveries.c.seq == bindparam("the_seq"))
                      .values(visible_at=bindparam("until", type_=deliveries.c.visible_at.type)))

    def recheck(self, ranges: int) -> Any:
        """The rows now present in ``ranges`` gap ranges (``lo0``/``hi0``, ...)."""
        stmt = self._rechecks.get(ranges)
        if stmt is None:
            stmt = self._rechecks[ranges] = select(messages.c.seq, messages.c.topic).where(
                or_(*(messages.c.seq.between(bindparam(f"lo{i}"), bindparam(f"hi{i}"))
                      for i in range(ranges))))
        return stmt


_STATEMENTS: dict[tuple[str, bool], _Statements] = {}


def _statements(conn: Connection) -> _Statements:
    key = (dialect_name(conn), supports_skip_locked(conn))
    found = _STATEMENTS.get(key)
    if found is None:
        found = _STATEMENTS[key] = _Statements(conn)
    return found


@dataclass(slots=True)
class _Scan:
    """What one look above a cursor (and at its gaps) found, to write under its lock."""

    scanned: int
    gaps: list[Gap]
    register_after: int = 0  # register the topic's rows in (register_after, scanned]
    found: int = 0  # ... of which the scan saw this many
    hits: list[int] = field(default_factory=list)  # the topic's rows found in gaps
    changed: bool = False


def _look(conn: Connection, st: _Statements, topic: str, scanned: int, gaps_text: str,
          want: int, wall: float, window: float) -> _Scan:
    """Scan above ``scanned`` until ``want`` rows of ``topic`` (or the end, or the
    scan budget), noting every seq skipped on the way as a gap; look again at the
    gaps not older than ``window`` seconds."""
    old = decode_gaps(gaps_text)
    gaps = [g for g in old if wall - g[2] <= window]
    out = _Scan(scanned=scanned, gaps=gaps, register_after=scanned,
                changed=len(gaps) != len(old))
    if gaps:
        params: dict[str, int] = {}
        for i, (lo, hi, _) in enumerate(gaps):
            params[f"lo{i}"], params[f"hi{i}"] = lo, hi
        present = sorted(conn.execute(st.recheck(len(gaps)), params).all())
        if present:
            out.hits = [seq for seq, t in present if t == topic]
            out.gaps = _without(gaps, [seq for seq, _ in present])
            out.changed = True
    rows_per_scan = max(want, SCAN_ROWS)
    budget = max(SCAN_BUDGET, want)
    at = scanned
    while out.found < want and budget > 0:
        rows = conn.execute(st.scan, {"after": at, "rows": rows_per_scan}).all()
        budget -= len(rows)
        for seq, t in rows:
            if seq > at + 1:
                out.gaps.append((at + 1, seq - 1, wall))
            at = seq
            if t == topic:
                out.found += 1
                if out.found >= want:
                    break
        if len(rows) < rows_per_scan:
            break
    if at != scanned:
        out.scanned, out.changed = at, True
    if out.changed:
        out.gaps = _bounded(out.gaps)
    return out


def _register(conn: Connection, st: _Statements, topic: str, group: str, want: int,
              now: dt.datetime, window: float) -> None:
    """Give ``group`` a delivery row for the new messages of ``topic`` (up to about
    ``want``) and for any that turned up in its gaps; move its cursor on."""
    key = {"the_group": group, "the_topic": topic}
    wall = time.time()
    row = conn.execute(st.cursor_read, key).first()
    if row is None:
        if conn.execute(st.cursor_create, key).rowcount != 1:
            return  # another consumer of the group made it just now; next fetch
        scanned, gaps_text, locked = 0, "", True
    else:
        scanned, gaps_text = int(row[0]), str(row[1])
        locked = st.serialized
    found = _look(conn, st, topic, scanned, gaps_text, want, wall, window)
    if not found.changed:
        return  # nothing new: no lock taken, nothing written
    if not locked:
        row = conn.execute(st.cursor_lock, key).first()
        if row is None:
            return  # another consumer of the group holds the cursor and registers
        if (int(row[0]), str(row[1])) != (scanned, gaps_text):
            # It moved since we read it: look again from where it is now.
            found = _look(conn, st, topic, int(row[0]), str(row[1]), want, wall, window)
            if not found.changed:
                return
    if found.found:
        conn.execute(st.register_range, {**key, "lo": found.register_after,
                                         "hi": found.scanned, "now": now})
    if found.hits:
        conn.execute(st.register_seqs, {**key, "seqs": found.hits, "lo": found.hits[0],
                                        "hi": found.hits[-1], "now": now})
    conn.execute(st.cursor_update, {**key, "new_scanned": found.scanned,
                                    "new_gaps": encode_gaps(found.gaps)})


def claim(conn: Connection, topic: str, group: str, max_messages: int,
          visibility_timeout: float,
          late_commit_window: float = DEFAULT_LATE_COMMIT_WINDOW) -> list[Delivery]:
    """Claim up to ``max_messages`` visible deliveries of ``topic`` for ``group``,
    hiding them for ``visibility_timeout`` seconds.

    First the group's cursor takes in what is new (:func:`_register`): a scan of
    the seqs above it, in seq order, up to ``max_messages`` rows of the topic, and
    a look at its gaps. Then the oldest visible delivery rows are claimed. What a
    fetch reads is the new rows, the gaps and the ready deliveries, whatever the
    number of messages kept.

    Why no message is skipped. A scan reads every row above the cursor that its
    snapshot shows, in seq order, so every seq it passes is either seen (a delivery
    row is inserted for it, in the same transaction, if it is of the topic) or
    missing then, and every missing seq becomes a gap. Gaps are looked at on every
    fetch; a row that turns up there is registered and its gap closed. The cursor
    only moves up, and a seq below it is never handed out again (sequences and
    InnoDB counters do not go back; SQLite tables use AUTOINCREMENT, and on older
    ones purge keeps the newest row). So a message is missed only if it commits
    more than ``late_commit_window`` seconds (15 minutes by default, by the
    consumers' clocks) after a fetch of the group scanned past its seq: its
    publisher held the transaction open that long after its INSERT while a
    later-numbered message was committed and fetched. SQLite has one writer, so
    there rows commit in seq order and gaps are only rolled-back or purged rows.

    Consumers of one group take turns on the cursor: one that finds it locked
    (``SKIP LOCKED``) leaves the registering to the one holding it and claims what
    is ready. Groups have a cursor each. Retries, the visibility timeout and dead
    letters live on the delivery rows as before.

    A message with a delivery time (the ``outbox-deliver-at`` header) still in the
    future is not handed out: its delivery row is hidden until that time, without
    counting an attempt (a publisher may put one on the queue early; a relay
    publishes it on time).
    """
    now = utcnow()
    st = _statements(conn)
    conn.execution_options(**claiming_options(conn))
    want = max(1, max_messages)
    key = {"the_group": group, "the_topic": topic}
    with conn.begin():
        if st.serialized:
            lock_for_writing(conn, deliveries)
        _register(conn, st, topic, group, want, now, late_commit_window)
        claimed = conn.execute(st.ready, {**key, "now": now, "rows": want}).all()
        if not claimed:
            return []
        seqs = [r[0] for r in claimed]
        if st.joined:
            rows = [(r[0], *r[2:]) for r in claimed]
        else:
            rows = [tuple(r) for r in conn.execute(st.bodies, {"seqs": seqs})]
        out = [
            (seq, t, message_id, k, tag, decode_headers(headers), payload)
            for seq, t, message_id, k, tag, headers, payload in rows
        ]
        later = _not_yet_due(out, now)
        if later:
            conn.execute(st.defer, [{"the_group": group, "the_seq": seq, "until": until}
                                    for seq, until in later.items()])
            seqs = [seq for seq in seqs if seq not in later]
            out = [r for r in out if r[0] not in later]
        if seqs:
            conn.execute(st.hide, {**key, "seqs": seqs,
                                   "until": now + dt.timedelta(seconds=visibility_timeout)})
    attempts = {r[0]: r[1] + 1 for r in claimed}
    return [
        Delivery(
            topic=t, payload=bytes(payload), message_id=message_id, attempt=attempts[seq],
            key=k, tag=tag, headers=headers, handle=seq,
        )
        for seq, t, message_id, k, tag, headers, payload in out
    ]


def _not_yet_due(rows: Sequence[tuple[Any, ...]], now: dt.datetime) -> dict[int, dt.datetime]:
    """The claimed rows whose delivery time is after ``now``, each with that time."""
    later: dict[int, dt.datetime] = {}
    for row in rows:
        headers: Mapping[str, str] = row[5]
        if headers:
            due = delivery_time(headers)
            if due is not None and due > now:
                later[row[0]] = due
    return later


_group = bindparam("the_group", type_=deliveries.c.consumer_group.type)
_this = (deliveries.c.consumer_group == _group, deliveries.c.seq == bindparam("the_seq"))
_DONE = update(deliveries).where(*_this).values(status=DONE, last_error=None)
_RETRY = update(deliveries).where(*_this).values(
    visible_at=bindparam("until", type_=deliveries.c.visible_at.type),
    last_error=bindparam("error", type_=deliveries.c.last_error.type))
_DEAD = update(deliveries).where(*_this).values(
    status=DEAD, last_error=bindparam("error", type_=deliveries.c.last_error.type))


def _set(conn: Connection, stmt: Any, group: str, delivery: Delivery, **values: Any) -> None:
    with conn.begin():
        conn.execute(stmt, {"the_group": group, "the_seq": delivery.handle, **values})


def mark_done(conn: Connection, group: str, delivery: Delivery) -> None:
    _set(conn, _DONE, group, delivery)


def mark_retry(conn: Connection, group: str, delivery: Delivery, delay_seconds: float,
               error: str) -> None:
    _set(conn, _RETRY, group, delivery,
         until=utcnow() + dt.timedelta(seconds=delay_seconds), error=error)


def mark_dead(conn: Connection, group: str, delivery: Delivery, reason: str) -> None:
    _set(conn, _DEAD, group, delivery, error=reason)


# -- the sync form: runs the functions above on a connection of the engine ----------
