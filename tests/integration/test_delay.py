"""Delayed delivery on every database, in both models: a message sent with
``deliver_after``/``deliver_at`` is not published before its time and is published
after it; the later messages of its key wait behind it; a guard row waits for it; the
SQL transport does not hand out a delayed message that reached it early."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from outbox import (
    ConsumerConfig,
    LocalWork,
    Message,
    Outcome,
    RelayConfig,
    SqlTransport,
    create_engine,
)
from outbox.aio import create_async_engine
from outbox.aio.sql_transport import AsyncSqlTransport
from outbox.envelope import DELIVER_AT_HEADER, delivery_time
from outbox.schema import PENDING, SENT, utcnow
from outbox.sql_queue import deliveries
from outbox.testing import InMemoryBroker
from outbox.transaction import SqlAlchemyTransactionListener

from .helpers import RecordingPublisher, outbox_row
from .models import Model, SyncOps

#: Long enough that the first claim surely runs before it, short enough to wait out.
DELAY = dt.timedelta(seconds=1.5)
NO_BACKOFF = ConsumerConfig(max_attempts=3, backoff=lambda _state: 0.0)


def do(model: Model, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A relay, subscriber or consumer method of either model, run to its end."""
    return model.run(lambda: model.call(fn, *args, **kwargs))


def relay_for(model: Model, publisher: Any) -> Any:
    return model.relay(model.publisher(publisher), config=RelayConfig(listen=False))


def due_of(message: Message) -> dt.datetime:
    due = delivery_time(message.headers)
    assert due is not None
    return due


def sleep_until(when: dt.datetime) -> None:
    time.sleep(max(0.0, (when - utcnow()).total_seconds()) + 0.05)


def test_a_delayed_message_is_published_at_its_time_and_not_before(
    model: Model, engine: Engine
) -> None:
    ob = model.outbox()

    async def ship(ops: SyncOps, order_no: str) -> None:
        pass

    remind = model.define(ob, ship, topic="reminders", message_id="order_no",
                          deliver_after=DELAY)
    at_once = model.define(ob, ship, topic="orders", message_id="order_no")

    async def scenario() -> Message:
        await model.call(remind, "R-1")
        await model.call(at_once, "O-1")
        async with model.session() as session:
            sent = await model.ops(session).send(
                ob, topic="reminders", payload={}, message_id="R-2",
                deliver_at=dt.datetime.now(dt.UTC) + DELAY)
            await model.ops(session).commit()
        return sent  # type: ignore[no-any-return]

    r2 = model.run(scenario)
    r1 = outbox_row(engine, "R-1")
    publisher = RecordingPublisher()
    relay = relay_for(model, publisher)

    result = do(model, relay.run_once)
    assert publisher.ids() == ["O-1"] and result.published == 1
    latest = max(r1.next_attempt_at, outbox_row(engine, "R-2").next_attempt_at)
    assert utcnow() < latest  # the claim above ran before the delivery times
    for row, message_id in ((r1, "R-1"), (outbox_row(engine, "R-2"), "R-2")):
        assert row.status == PENDING and row.attempts == 0, message_id
    assert outbox_row(engine, "R-2").next_attempt_at == due_of(r2)
    assert do(model, relay.drain, timeout=5) == 0  # drain stops: nothing is due

    sleep_until(latest)
    do(model, relay.run_once)
    assert sorted(publisher.ids()) == ["O-1", "R-1", "R-2"]
    [published_r1] = [m for m in publisher.published if m.id == "R-1"]
    # The header travels with the message, so a broker or consumer can honour it too.
    assert due_of(published_r1) == r1.next_attempt_at
    assert published_r1.headers[DELIVER_AT_HEADER].endswith("Z")
    assert outbox_row(engine, "R-1").status == SENT


def test_the_later_messages_of_a_key_wait_behind_a_delayed_one(
    model: Model, engine: Engine
) -> None:
    ob = model.outbox()

    async def scenario() -> None:
        async with model.session() as session:
            ops = model.ops(session)
            await ops.send(ob, topic="t", payload={}, message_id="A1", key="A",
                           deliver_after=DELAY)
            await ops.send(ob, topic="t", payload={}, message_id="A2", key="A")
            await ops.send(ob, topic="t", payload={}, message_id="B1", key="B")
            await ops.send(ob, topic="t", payload={}, message_id="N1")
            await ops.commit()

    model.run(scenario)
    publisher = RecordingPublisher()
    relay = relay_for(model, publisher)
    do(model, relay.run_once)
    assert publisher.ids() == ["B1", "N1"]  # A2 waits behind A1; other keys flow
    assert outbox_row(engine, "A2").status == PENDING

    sleep_until(outbox_row(engine, "A1").next_attempt_at)
    # A2, due long ago, was left out of the claim that took A1 (a claim leaves out a row
    # whose key has an earlier row due later than it): it goes in the next one.
    do(model, relay.run_once)
    assert publisher.ids() == ["B1", "N1", "A1"]
    do(model, relay.run_once)
    assert publisher.ids() == ["B1", "N1", "A1", "A2"]  # the key's commit order


def test_a_delayed_reply_sent_from_a_handler(model: Model, engine: Engine) -> None:
    broker = InMemoryBroker()
    replies = model.outbox()

    async def handler(ops: SyncOps, message: Any) -> None:
        await ops.send(replies, topic="replies", payload={"to": message.id},
                       message_id=f"{message.id}-reply", deliver_after=DELAY)

    consumer = model.consumer(model.subscriber(broker, "orders", "g"), "g", handler,
                              config=NO_BACKOFF)
    broker.publish(Message(topic="orders", id="O-1", payload=b"{}"))
    [delivery] = do(model, consumer.subscriber.fetch, 10, 1.0)
    assert do(model, consumer.handle, delivery) == Outcome.PROCESSED

    publisher = RecordingPublisher()
    relay = relay_for(model, publisher)
    do(model, relay.run_once)
    assert publisher.ids() == []
    sleep_until(outbox_row(engine, "O-1-reply").next_attempt_at)
    do(model, relay.run_once)
    assert publisher.ids() == ["O-1-reply"]


def test_a_guard_row_waits_for_the_delivery_time(engine: Engine) -> None:
    listener = SqlAlchemyTransactionListener(sessionmaker(engine))
    message = Message(topic="t", id="H-1", payload=b"{}", headers={
        DELIVER_AT_HEADER: (utcnow() + dt.timedelta(minutes=10)).isoformat() + "Z"})
    guard = utcnow() + dt.timedelta(seconds=30)
    listener.execute(message, LocalWork(lambda session: None, (), {}), guard_until=guard)
    assert outbox_row(engine, "H-1").next_attempt_at == due_of(message)

    soon = Message(topic="t", id="H-2", payload=b"{}", headers={
        DELIVER_AT_HEADER: (utcnow() + dt.timedelta(seconds=1)).isoformat() + "Z"})
    listener.execute(soon, LocalWork(lambda session: None, (), {}), guard_until=guard)
    assert outbox_row(engine, "H-2").next_attempt_at == guard


def delivery_row(engine: Engine, group: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(deliveries).where(deliveries.c.consumer_group == group)
                            .order_by(deliveries.c.seq)).all()


def test_the_sql_transport_does_not_hand_out_a_message_before_its_time(
    model: Model, engine: Engine, db_url: str
) -> None:
    """Published straight onto the queue (no relay holding it back): the consumer side
    keeps it hidden until its time, without counting an attempt."""
    async_engine = create_async_engine(db_url, poolclass=NullPool)
    transport: Any = (AsyncSqlTransport(async_engine) if model.is_async
                      else SqlTransport(engine))
    ob = model.outbox()
    early = ob.message(topic="q", payload={}, message_id="E-1", deliver_after=DELAY)
    plain = ob.message(topic="q", payload={}, message_id="P-1")
    try:
        do(model, transport.publisher().publish_batch, [early, plain])
        sub = transport.subscriber("q", "g")
        got = do(model, sub.fetch, 10, 1.0)  # returns as soon as P-1 is found
        assert [d.message_id for d in got] == ["P-1"]
        assert utcnow() < due_of(early)
        do(model, sub.ack, got[0])
        assert do(model, sub.fetch, 10, 0.2) == []
        [held, _done] = delivery_row(engine, "g")
        assert held.attempts == 0 and held.visible_at == due_of(early)

        start = utcnow()
        [late] = do(model, sub.fetch, 10, 5.0)  # a waiting fetch picks it up at its time
        assert late.message_id == "E-1" and late.attempt == 1
        assert utcnow() >= due_of(early) > start
        assert dict(late.headers)[DELIVER_AT_HEADER] == early.headers[DELIVER_AT_HEADER]
    finally:
        model.run(async_engine.dispose)


def test_a_relay_to_the_sql_transport_delivers_on_time(
    model: Model, engine: Engine, tmp_path: Path
) -> None:
    """End to end: outbox row, relay, queue (a SQLite file of its own), subscriber; the
    delivery comes after its time, and never before."""
    ob = model.outbox()
    broker_engine = create_engine(f"sqlite:///{tmp_path / 'broker.db'}")
    transport = SqlTransport(broker_engine)
    transport.create_tables()

    async def scenario() -> Message:
        async with model.session() as session:
            sent = await model.ops(session).send(ob, topic="q2", payload={"n": 1},
                                                 message_id="D-1", deliver_after=DELAY)
            await model.ops(session).commit()
        return sent  # type: ignore[no-any-return]

    message = model.run(scenario)
    relay = relay_for(model, transport.publisher())
    sub = transport.subscriber("q2", "g")
    do(model, relay.run_once)
    assert sub.fetch(10, 0.0) == []
    sleep_until(due_of(message))
    do(model, relay.run_once)
    [delivery] = sub.fetch(10, 2.0)
    assert delivery.message_id == "D-1" and utcnow() >= due_of(message)
    broker_engine.dispose()
