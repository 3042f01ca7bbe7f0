"""Delayed delivery without a database: the keywords of ``send``, ``message`` and the
decorators (sync and asyncio), the ``outbox-deliver-at`` header they write, the
outbox row's due time, the SQL transport's check and the in-memory broker."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import zoneinfo
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from outbox import AsyncOutbox, ConfigurationError, Message, MessageError, Outbox
from outbox.envelope import CREATED_AT_HEADER, DELIVER_AT_HEADER, delivery_time, parse_utc
from outbox.schema import utcnow
from outbox.sql_queue import _not_yet_due
from outbox.storage import insert_message
from outbox.testing import InMemoryBroker
from outbox.transaction import SqlAlchemyTransactionListener, TransactionLogTicket

UTC = dt.UTC
PARIS = zoneinfo.ZoneInfo("Europe/Paris")


class CapturingTicket:
    records: tuple[Any, ...] = ()

    def before_commit(self) -> None:
        pass

    def committed(self) -> None:
        pass

    def rolled_back(self) -> None:
        pass

    def unknown(self) -> BaseException | None:
        return None

    def duplicate(self) -> BaseException:
        raise AssertionError("nothing is written")


class CapturingDelivery:
    """Records the messages; writes nothing (sync and asyncio forms)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def prepare(self, outbox: Any, message: Message) -> CapturingTicket:
        self.sent.append(message)
        return CapturingTicket()

    async def aprepare(self, outbox: Any, message: Message) -> CapturingTicket:
        return self.prepare(outbox, message)


@pytest.fixture
def delivery() -> CapturingDelivery:
    return CapturingDelivery()


@pytest.fixture
def ob(delivery: CapturingDelivery) -> Outbox:
    return Outbox(sessionmaker(), delivery=delivery)


@pytest.fixture
def aob(delivery: CapturingDelivery) -> AsyncOutbox:
    # Never connects: no lock statement on PostgreSQL and the tickets write nothing.
    engine = create_async_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    return AsyncOutbox(engine, delivery=delivery)


def created(message: Message) -> dt.datetime:
    value = parse_utc(message.headers[CREATED_AT_HEADER])
    assert value is not None
    return value


def due(message: Message) -> dt.datetime | None:
    return delivery_time(message.headers)


# -- the header --------------------------------------------------------------------


def test_deliver_after_is_counted_from_the_message_s_creation(ob: Outbox) -> None:
    message = ob.message(topic="t", payload={}, deliver_after=dt.timedelta(minutes=5))
    raw = message.headers[DELIVER_AT_HEADER]
    assert raw.endswith("Z") and "+" not in raw
    assert due(message) == created(message) + dt.timedelta(minutes=5)


def test_deliver_at_is_written_in_utc_whatever_its_time_zone(ob: Outbox) -> None:
    at = (dt.datetime.now(PARIS) + dt.timedelta(hours=2)).replace(microsecond=123456)
    message = ob.message(topic="t", payload={}, deliver_at=at)
    assert due(message) == at.astimezone(UTC).replace(tzinfo=None)
    assert message.headers[DELIVER_AT_HEADER] == (
        at.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z")


@pytest.mark.parametrize("options", [
    {},
    {"deliver_after": dt.timedelta(0)},
    {"deliver_after": None, "deliver_at": None},
    {"deliver_at": dt.datetime.now(UTC) - dt.timedelta(seconds=1)},
    {"deliver_at": dt.datetime(2000, 1, 1, tzinfo=UTC)},
])
def test_no_time_or_a_time_already_past_means_at_once(ob: Outbox, options: dict[str, Any]
                                                      ) -> None:
    message = ob.message(topic="t", payload={}, **options)
    assert DELIVER_AT_HEADER not in message.headers
    assert set(message.headers) == {CREATED_AT_HEADER}


@pytest.mark.parametrize(("options", "match"), [
    ({"deliver_at": dt.datetime(2030, 1, 1)}, r"naive datetime.*pass an aware one"),
    ({"deliver_at": dt.datetime.now()}, r"naive datetime.*pass an aware one"),
    ({"deliver_at": dt.date(2030, 1, 1)}, "must be a datetime.datetime with a time zone"),
    ({"deliver_at": "2030-01-01T00:00:00Z"}, "must be a datetime.datetime"),
    ({"deliver_at": 1_900_000_000}, "must be a datetime.datetime"),
    ({"deliver_after": dt.timedelta(seconds=-1)}, "deliver_after must not be negative"),
    ({"deliver_after": 5}, r"deliver_after must be a datetime.timedelta.*got int"),
    ({"deliver_after": 2.5}, r"deliver_after must be a datetime.timedelta.*got float"),
    ({"deliver_after": dt.timedelta.max}, "after the year 9999"),
    ({"deliver_at": dt.datetime.now(UTC) + dt.timedelta(hours=1),
      "deliver_after": dt.timedelta(hours=1)}, "deliver_at or deliver_after, not both"),
    ({"deliver_at": dt.datetime.now(UTC) - dt.timedelta(hours=1),
      "deliver_after": dt.timedelta(0)}, "deliver_at or deliver_after, not both"),
])
def test_bad_delivery_times_are_refused_and_nothing_is_sent(
    ob: Outbox, delivery: CapturingDelivery, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(MessageError, match=match):
        ob.message(topic="t", payload={}, **options)
    with pytest.raises(MessageError, match=match):
        ob.send(Session(), topic="t", payload={}, **options)
    assert delivery.sent == []


def test_the_header_is_the_framework_s_own(ob: Outbox) -> None:
    later = (dt.datetime.now(UTC) + dt.timedelta(hours=1)).isoformat()
    with pytest.raises(MessageError, match="framework's namespace"):
        ob.message(topic="t", payload={}, headers={DELIVER_AT_HEADER: later})
    with pytest.raises(ConfigurationError, match="framework's namespace"):
        ob.transactional_message(topic="t", headers={"Outbox-Deliver-At": later})(
            lambda session: None)


def test_a_send_inside_a_call_carries_the_header(ob: Outbox, delivery: CapturingDelivery
                                                 ) -> None:
    @ob.transactional_message(topic="outer")
    def fn(session: Session) -> Message:
        return ob.send(session, topic="t", payload={"a": 1}, key="k",
                       deliver_after=dt.timedelta(seconds=30), headers={"trace": "x"})

    message = fn()
    assert delivery.sent[1] is message and due(delivery.sent[0]) is None
    assert message.headers["trace"] == "x"
    assert due(message) == created(message) + dt.timedelta(seconds=30)


# -- the decorators ----------------------------------------------------------------


def test_a_static_delay_on_the_decorator(ob: Outbox, delivery: CapturingDelivery) -> None:
    @ob.transactional_message(topic="t", deliver_after=dt.timedelta(minutes=1))
    def remind(session: Session, order_no: str) -> None:
        pass

    remind("o-1")
    remind("o-2")
    for message in delivery.sent:
        assert due(message) == created(message) + dt.timedelta(minutes=1)


def test_the_delivery_time_from_an_argument_or_a_callable(
    ob: Outbox, delivery: CapturingDelivery
) -> None:
    @ob.transactional_message(topic="t", deliver_at="when")
    def at(session: Session, order_no: str, when: dt.datetime | None = None) -> None:
        pass

    @ob.transactional_message(topic="t",
                              deliver_after=lambda order_no, minutes: dt.timedelta(minutes=minutes))
    def after(session: Session, order_no: str, minutes: int) -> None:
        pass

    # (A timedelta argument is no JSON: this payload leaves it out.)
    @ob.transactional_message(topic="t", deliver_after="pause", payload=lambda pause: {})
    def by_name(session: Session, pause: dt.timedelta | None) -> None:
        pass

    when = dt.datetime.now(PARIS) + dt.timedelta(hours=3)
    at("o-1", when=when)
    at("o-2")  # None: at once
    after("o-3", 10)
    after("o-4", 0)  # no delay: at once
    by_name(dt.timedelta(seconds=7))
    by_name(None)
    m1, m2, m3, m4, m5, m6 = delivery.sent
    assert due(m1) == when.astimezone(UTC).replace(tzinfo=None)
    assert due(m3) == created(m3) + dt.timedelta(minutes=10)
    assert due(m5) == created(m5) + dt.timedelta(seconds=7)
    assert [due(m) for m in (m2, m4, m6)] == [None, None, None]


@pytest.mark.parametrize(("options", "match"), [
    ({"deliver_at": "when", "deliver_after": dt.timedelta(1)}, "not both"),
    ({"deliver_at": "nope"}, "deliver_at='nope' names no parameter"),
    ({"deliver_after": "nope"}, "deliver_after='nope' names no parameter"),
    ({"deliver_at": dt.datetime.now(UTC)}, "same instant for every call"),
    ({"deliver_after": dt.timedelta(seconds=-5)}, "must not be negative"),
    ({"deliver_after": 30}, "deliver_after must be a timedelta, a parameter name or a callable"),
    ({"deliver_at": 30}, "deliver_at must be a parameter name or a callable"),
])
def test_bad_decorator_delivery_options_fail_at_decoration(
    ob: Outbox, aob: AsyncOutbox, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        @ob.transactional_message(topic="t", **options)
        def fn(session: Session, when: Any) -> None:
            pass
    with pytest.raises(ConfigurationError, match=match):
        @aob.transactional_message(topic="t", **options)
        async def afn(session: Any, when: Any) -> None:
            pass


@pytest.mark.parametrize(("value", "match"), [
    (dt.datetime(2030, 1, 1), "naive datetime"),
    (dt.timedelta(1), "must be a datetime.datetime"),
])
def test_a_bad_time_from_the_call_refuses_the_call_before_it_runs(
    ob: Outbox, delivery: CapturingDelivery, value: Any, match: str
) -> None:
    ran: list[object] = []

    @ob.transactional_message(topic="t", deliver_at="when")
    def fn(session: Session, when: Any) -> None:
        ran.append(when)

    with pytest.raises(MessageError, match=match):
        fn(value)
    assert ran == [] and delivery.sent == []


def test_the_asyncio_forms(aob: AsyncOutbox, delivery: CapturingDelivery) -> None:
    @aob.transactional_message(topic="t", deliver_after=dt.timedelta(seconds=90))
    async def fixed(session: Any) -> None:
        pass

    @aob.transactional_message(topic="t", deliver_at=lambda when: when)
    async def chosen(session: Any, when: dt.datetime) -> None:
        pass

    when = dt.datetime.now(UTC) + dt.timedelta(days=1)

    async def scenario() -> None:
        await fixed()
        await chosen(when)
        with pytest.raises(MessageError, match="naive datetime"):
            await chosen(when.replace(tzinfo=None))

    asyncio.run(scenario())
    m1, m2 = delivery.sent
    assert due(m1) == created(m1) + dt.timedelta(seconds=90)
    assert due(m2) == when.replace(tzinfo=None)
    with pytest.raises(MessageError, match="must not be negative"):
        aob.message(topic="t", payload={}, deliver_after=-dt.timedelta(seconds=1))


# -- the outbox row ------------------------------------------------------------------


def delayed(seconds: float, **options: Any) -> Message:
    return Outbox(sessionmaker()).message(topic="t", payload={},
                                          deliver_after=dt.timedelta(seconds=seconds), **options)


def test_the_outbox_row_is_due_at_the_delivery_time() -> None:
    message = delayed(60)
    _, row = insert_message(message)
    assert row["next_attempt_at"] == due(message)
    before = utcnow()
    _, plain = insert_message(Message(topic="t", payload=b"{}"))
    assert before <= plain["next_attempt_at"] <= utcnow()  # type: ignore[operator]


def test_a_delivery_time_already_past_makes_the_row_due_now() -> None:
    past = utcnow() - dt.timedelta(hours=1)
    message = Message(topic="t", payload=b"{}",
                      headers={DELIVER_AT_HEADER: past.isoformat() + "Z"})
    before = utcnow()
    _, row = insert_message(message)
    assert row["next_attempt_at"] >= before  # type: ignore[operator]


def test_a_guard_row_is_due_at_the_later_of_its_guard_and_the_delivery_time() -> None:
    message = delayed(600)
    soon, late = utcnow() + dt.timedelta(seconds=60), utcnow() + dt.timedelta(hours=2)
    assert insert_message(message, due_at=soon)[1]["next_attempt_at"] == due(message)
    assert insert_message(message, due_at=late)[1]["next_attempt_at"] == late
    listener = SqlAlchemyTransactionListener(sessionmaker())
    _log_row, (_, guard) = TransactionLogTicket(listener, message, soon).records
    assert guard["next_attempt_at"] == due(message)


# -- the transports' consumer side ---------------------------------------------------


def test_the_sql_transport_holds_back_rows_not_yet_due() -> None:
    now = utcnow()
    soon = now + dt.timedelta(seconds=5)
    rows = [
        (1, "t", "a", None, None, {}, b""),
        (2, "t", "b", None, None, {DELIVER_AT_HEADER: soon.isoformat() + "Z"}, b""),
        (3, "t", "c", None, None, {DELIVER_AT_HEADER: (now - dt.timedelta(1)).isoformat()}, b""),
        (4, "t", "d", None, None, {DELIVER_AT_HEADER: "not a time"}, b""),
    ]
    assert _not_yet_due(rows, now) == {2: soon}


def test_the_in_memory_broker_hands_out_a_delayed_message_only_at_its_time() -> None:
    broker = InMemoryBroker()
    broker.publish(delayed(0.6, message_id="late"))
    broker.publish(Message(topic="t", id="now", payload=b"{}"))
    sub = broker.subscriber("t", "g")
    start = time.monotonic()
    assert [d.message_id for d in sub.fetch(10, 0)] == ["now"]
    assert sub.fetch(10, 0.1) == []
    [late] = sub.fetch(10, 5.0)
    assert late.message_id == "late" and late.attempt == 1
    assert time.monotonic() - start >= 0.55
    assert due(broker.messages("t")[0]) is not None


def test_the_in_memory_broker_s_async_subscriber_waits_for_it_too() -> None:
    broker = InMemoryBroker()
    message = delayed(0.5)

    async def scenario() -> list[str | None]:
        sub = broker.async_subscriber("t", "g")
        await broker.async_publisher().publish(message)
        assert await sub.fetch(10, 0.05) == []
        found = await sub.fetch(10, 5.0)
        assert utcnow() >= due(message)  # type: ignore[operator]
        return [d.message_id for d in found]

    assert asyncio.run(scenario()) == [message.id]
