"""Recovery: committed transactions whose messages never reached their topic.

A half message can be lost after its local transaction committed: the broker
discards it after ``transactionCheckMax`` check-backs that found no live producer
(the producer kept dying), or it acknowledged a commit that came after it had
given up. :func:`recover` walks the transaction log (every row there is a committed
transaction), asks the broker's message index whether the message is on its topic
(every message sent through outbox carries its outbox id among its RocketMQ keys),
and sends the missing ones again through the outbox path: the message's outbox row
(the guard row every transactional send writes by default) becomes pending and due
now, and a relay publishes it. The consumer's inbox drops a copy should the message
turn up after all, so a false alarm costs a duplicate delivery, never a double
apply.

The broker is asked over the remoting protocol, through the name server, for 4.x
and 5.x brokers alike (the 5.x proxy's gRPC API has no query by key).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Engine, and_, func, or_, select, update

from outbox.errors import ConfigurationError
from outbox.log import get_logger
from outbox.schema import DEAD, PENDING, SENT, outbox_messages, transaction_log, utcnow

from .mapping import MESSAGE_ID_PROPERTY
from .remoting.client import RemotingClient
from .remoting.connection import RemotingError
from .remoting.protocol import Command, ProtocolError, ResponseCode, decode_messages

log = get_logger("outbox.rocketmq.recover")

T = outbox_messages
L = transaction_log

#: How far before a transaction's log row the broker's search starts (clock skew
#: between the database and the broker).
SEARCH_MARGIN = dt.timedelta(minutes=5)
#: At most this many messages per key and broker in one answer (the broker's own
#: default cap is 32).
QUERY_MAX = 32
#: The remoting request that searches a broker's message index (by key).
QUERY_MESSAGE = 12
#: Transaction-log rows read per page.
PAGE = 500


@dataclass
class RecoveryReport:
    """What :func:`recover` found and did, by outbox message id."""

    checked: int = 0
    on_topic: int = 0
    #: Missing on the topic; their outbox row is pending and due now.
    resent: list[str] = field(default_factory=list)
    #: Missing on the topic, and no outbox row to send again (the guard row was
    #: turned off, or purged): the business must re-issue these.
    no_local_copy: list[str] = field(default_factory=list)
    #: The broker did not answer for these: run again.
    unanswered: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return len(self.resent) + len(self.no_local_copy)

    def line(self) -> str:
        return (f"RECOVER checked={self.checked} on_topic={self.on_topic} "
                f"resent={len(self.resent)} no_local_copy={len(self.no_local_copy)} "
                f"unanswered={len(self.unanswered)}")


@dataclass(frozen=True)
class Committed:
    """One transaction-log row."""

    message_id: str
    topic: str
    created_at: dt.datetime


def _window(since: dt.datetime, until: dt.datetime,
            topics: Sequence[str]) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [L.c.created_at >= since, L.c.created_at < until]
    if topics:
        where.append(L.c.topic.in_(list(topics)))
    return where


def count_committed(engine: Engine, *, since: dt.datetime, until: dt.datetime,
                    topics: Sequence[str] = ()) -> int:
    """How many transaction-log rows :func:`committed` will read (for progress)."""
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).where(*_window(since, until, topics)))
                   or 0)


def committed(engine: Engine, *, since: dt.datetime, until: dt.datetime,
              topics: Sequence[str] = ()) -> Iterator[Committed]:
    """The transaction-log rows written in ``[since, until)``, oldest first, read in
    pages (keyset on the creation time and the transaction id)."""
    after: tuple[dt.datetime, str] | None = None
    while True:
        query = select(L.c.created_at, L.c.transaction_id, L.c.message_id, L.c.topic).where(
            *_window(since, until, topics))
        if after is not None:
            query = query.where(or_(L.c.created_at > after[0],
                                    and_(L.c.created_at == after[0],
                                         L.c.transaction_id > after[1])))
        with engine.connect() as conn:
            rows = conn.execute(
                query.order_by(L.c.created_at, L.c.transaction_id).limit(PAGE)).all()
        for created_at, _, message_id, topic in rows:
            yield Committed(message_id, topic, created_at)
        if len(rows) < PAGE:
            return
        after = (rows[-1][0], rows[-1][1])


class TopicIndex:
    """Asks the brokers of a topic whether a message with an outbox id is on it."""

    def __init__(self, client: RemotingClient) -> None:
        self.client = client

    def has(self, item: Committed) -> bool:
        """True when a master broker of the topic holds the message, False when every
        one of them answered that it does not; RemotingError when one did not answer."""
        route = self.client.route(item.topic)
        begin = _epoch_ms(item.created_at - SEARCH_MARGIN)
        end = _epoch_ms(utcnow() + SEARCH_MARGIN)
        for address in sorted(set(route.brokers.values())):
            response = self.client.broker(address).request(Command(
                QUERY_MESSAGE,
                {"topic": item.topic, "key": item.message_id, "maxNum": str(QUERY_MAX),
                 "beginTimestamp": str(begin), "endTimestamp": str(end)}),
                self.client.request_timeout)
            if response.code == ResponseCode.QUERY_NOT_FOUND:
                continue
            if response.code != ResponseCode.SUCCESS:
                raise RemotingError(
                    f"broker {address} answered code {response.code} to a query of "
                    f"{item.topic} ({(response.remark or '').strip() or 'no remark'})")
            try:
                found = decode_messages(response.body)
            except ProtocolError as exc:
                raise RemotingError(f"broker {address}: {exc}") from None
            if any(m.properties.get(MESSAGE_ID_PROPERTY) == item.message_id for m in found):
                return True
        return False


def _epoch_ms(when: dt.datetime) -> int:
    return int(when.replace(tzinfo=dt.UTC).timestamp() * 1000)


def send_again(engine: Engine, message_id: str) -> bool:
    """Make the message's outbox row pending and due now, whatever its status (a
    settled guard row is ``sent``; a relay that gave up left it ``dead``); False when
    the database has no row for it. The row keeps its place in its key's order."""
    now = utcnow()
    with engine.begin() as conn:
        result = conn.execute(
            update(T).where(T.c.message_id == message_id,
                            T.c.status.in_([PENDING, SENT, DEAD]))
            .values(status=PENDING, attempts=0, next_attempt_at=now, sent_at=None,
                    last_error="recovered: the message was not on its topic"))
    return bool(result.rowcount)


Progress = Callable[[RecoveryReport], None]


def recover(engine: Engine, namesrv: str, *, since: dt.datetime, until: dt.datetime,
            topics: Iterable[str] = (), dry_run: bool = False,
            progress: Progress | None = None, every: int = 100,
            request_timeout: float = 5.0) -> RecoveryReport:
    """Find the committed transactions of ``[since, until)`` (naive UTC) whose
    messages are not on their topic, and (unless ``dry_run``) send them again through
    their outbox rows. ``until`` should lie well before now: a transaction younger
    than the broker's check-back window may still have its half message waiting.
    ``progress`` is called with the report so far every ``every`` rows."""
    if since >= until:
        raise ConfigurationError(
            f"the recovery window is empty: since {since:%Y-%m-%d %H:%M:%S} is not before "
            f"until {until:%Y-%m-%d %H:%M:%S}")
    report = RecoveryReport()
    client = RemotingClient(namesrv, request_timeout=request_timeout)
    index = TopicIndex(client)
    try:
        for item in committed(engine, since=since, until=until, topics=tuple(topics)):
            report.checked += 1
            try:
                there = index.has(item)
            except RemotingError as exc:
                log.warning("recover_query_failed", message_id=item.message_id,
                            topic=item.topic, error=str(exc))
                report.unanswered.append(item.message_id)
                there = None
            if there:
                report.on_topic += 1
            elif there is False:
                _missing(engine, item, report, dry_run)
            if progress is not None and report.checked % every == 0:
                progress(report)
    finally:
        client.close()
    log.info("recover_done", checked=report.checked, on_topic=report.on_topic,
             resent=len(report.resent), no_local_copy=len(report.no_local_copy),
             unanswered=len(report.unanswered), dry_run=dry_run)
    return report


def _missing(engine: Engine, item: Committed, report: RecoveryReport, dry_run: bool) -> None:
    if dry_run:
        with engine.connect() as conn:
            kept = conn.execute(select(T.c.seq).where(T.c.message_id == item.message_id)
                                ).first() is not None
    else:
        kept = send_again(engine, item.message_id)
    fields = {"message_id": item.message_id, "topic": item.topic}
    if kept:
        report.resent.append(item.message_id)
        log.warning("recover_message_missing", action="dry run" if dry_run else "sent again",
                    **fields)
    else:
        report.no_local_copy.append(item.message_id)
        log.error("recover_message_lost", action="no outbox row to send again: re-issue it",
                  **fields)
