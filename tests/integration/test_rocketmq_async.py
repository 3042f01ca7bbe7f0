"""The RocketMQ adapter in the service's event loop, against the real broker
(scripts/rocketmq up): AsyncOutbox with half messages, AsyncRelay with
AsyncRocketMQPublisher, AsyncIdempotentConsumer with AsyncRocketMQSubscriber.

While a test waits for the broker's check-backs its loop keeps running (the blocking
helpers go to a thread): an AsyncOutbox's check-backs are answered in that loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tenacity
from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from sqlalchemy.util import await_only

import outbox
from outbox import (
    AsyncIdempotentConsumer,
    AsyncOutbox,
    ConsumerConfig,
    Message,
    ReceivedMessage,
    TransactionOutcomeUnknown,
)
from outbox.aio import create_async_engine
from outbox_rocketmq import (
    AsyncRocketMQPublisher,
    AsyncRocketMQSubscriber,
    RocketMQConfig,
    RocketMQTransactionalProducer,
)

from .helpers import capture_events
from .rocketmq_support import (
    CHECK_BACK_TIMEOUT,
    DLQ_TOPIC,
    LOCAL_TIMEOUT,
    MIXED_TOPIC,
    TX_TOPIC_A,
    TX_TOPIC_B,
    LosesEndTransaction,
    check_backs,
    collect,
    dead_letter_reasons,
    ended,
    group_name,
    log_rows,
    unique,
    wait_until,
)

pytestmark = [pytest.mark.rocketmq]
AMOUNT = decimal.Decimal("1.00")


@pytest.fixture
def config(rocketmq_endpoints: str) -> RocketMQConfig:
    return RocketMQConfig(rocketmq_endpoints)


def sqlite_db(tmp_path: Path, name: str) -> tuple[Engine, AsyncEngine]:
    """A fresh SQLite file with the outbox tables: its sync and its asyncio engine."""
    url = f"sqlite:///{tmp_path / name}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    # Without a pool: each test's loop ends with asyncio.run, its connections with it.
    return engine, create_async_engine(url, poolclass=NullPool)


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def statuses(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        return await conn.run_sync(outbox.storage.counts)


# -- AsyncOutbox and the transactional producer ----------------------------------------


def test_a_decorated_async_call_commits_or_rolls_back_its_guarded_half_message(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    engine, aengine = sqlite_db(tmp_path, "guarded.db")
    producer = RocketMQTransactionalProducer(config, [MIXED_TOPIC],
                                             guard_after=dt.timedelta(seconds=30))
    ob = AsyncOutbox(aengine, delivery=producer, local_transaction_timeout=LOCAL_TIMEOUT)

    @ob.transactional_message(topic=MIXED_TOPIC, message_id="no")
    async def reserve(session: AsyncSession, no: str, fail: bool = False) -> None:
        if fail:
            raise ValueError(f"{no} refused")

    good, bad = unique("a-good"), unique("a-bad")

    async def scenario() -> dict[str, int]:
        await producer.astart()
        await reserve(good)
        with pytest.raises(ValueError, match="refused"):
            await reserve(bad, fail=True)
        await producer.aclose()  # waits for the scheduled end-transactions and settles
        return await statuses(aengine)

    with capture_events() as events:
        counts = asyncio.run(scenario())
    assert ended(events, good) == ["commit"] and ended(events, bad) == ["rollback"]
    assert counts["sent"] == 1 and counts["pending"] == 0  # the guard row was settled
    assert log_rows(engine) == {good}
    seen = collect(config, MIXED_TOPIC, {good}, timeout=20, settle=2, unwanted={bad})
    assert seen == {good: 1}


def test_a_check_back_for_an_async_outbox_topic_is_answered_from_its_database(
    engine: Engine, async_engine: AsyncEngine, config: RocketMQConfig, tables: SimpleNamespace,
) -> None:
    """On every database: the end-transaction calls are lost, so the broker asks, and
    the AsyncOutbox's loop answers from its transaction log."""
    producer = LosesEndTransaction(config, [TX_TOPIC_B], guard_after=None)
    ob = AsyncOutbox(async_engine, delivery=producer, local_transaction_timeout=CHECK_BACK_TIMEOUT)

    @ob.transactional_message(topic=TX_TOPIC_B, message_id="no")
    async def pay(session: AsyncSession, no: str, fail: bool = False) -> None:
        await session.execute(tables.ledger.insert().values(account=no, amount=-AMOUNT))
        if fail:
            raise ValueError(f"{no} refused")

    good, bad = unique("chk-good"), unique("chk-bad")

    async def scenario() -> Any:
        await producer.astart()
        try:
            await pay(good)
            with pytest.raises(ValueError, match="refused"):
                await pay(bad, fail=True)
            await asyncio.to_thread(
                wait_until, lambda: "rollback" in check_backs(events, bad), 30)
            return await asyncio.to_thread(collect, config, TX_TOPIC_B, {good}, timeout=20,
                                           settle=1, unwanted={bad})
        finally:
            await producer.aclose()

    with capture_events() as events:
        seen = asyncio.run(scenario())
    assert producer.asked == {good: "commit", bad: "rollback"}
    assert log_rows(engine) == {good}
    assert set(check_backs(events, good)) == {"commit"}
    assert "rollback" in check_backs(events, bad)
    assert set(check_backs(events, bad)) <= {"unknown", "rollback"}
    assert seen == {good: 1}


class PausesAfterCommit(Session):
    """Once the database has committed, waits as a slow reply would (while armed)."""

    reached: asyncio.Event | None = None


@event.listens_for(PausesAfterCommit, "after_commit")
def _pause(session: Session) -> None:
    reached = PausesAfterCommit.reached
    if reached is not None:
        reached.set()
        await_only(asyncio.sleep(30))


def test_a_commit_cancelled_midway_is_left_to_the_check_back_and_delivered_once(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    engine, aengine = sqlite_db(tmp_path, "cancel.db")
    producer = RocketMQTransactionalProducer(config, [TX_TOPIC_A], guard_after=None)
    factory = async_sessionmaker(aengine, sync_session_class=PausesAfterCommit)
    ob = AsyncOutbox(factory, delivery=producer, local_transaction_timeout=LOCAL_TIMEOUT)

    @ob.transactional_message(topic=TX_TOPIC_A, message_id="no")
    async def ship(session: AsyncSession, no: str) -> None:
        pass

    no = unique("cancelled")

    async def scenario() -> Any:
        await producer.astart()
        PausesAfterCommit.reached = reached = asyncio.Event()
        try:
            task = asyncio.ensure_future(ship(no))
            await asyncio.wait_for(reached.wait(), 10)
            task.cancel()
            with pytest.raises((TransactionOutcomeUnknown, asyncio.CancelledError)):
                await task
        finally:
            PausesAfterCommit.reached = None
        try:
            assert await producer.flush(5)
            return await asyncio.to_thread(collect, config, TX_TOPIC_A, {no}, timeout=20,
                                           settle=1)
        finally:
            await producer.aclose()

    with capture_events() as events:
        seen = asyncio.run(scenario())
    assert log_rows(engine) == {no}  # the database has the commit ...
    assert ended(events, no) == []  # ... and nothing ended the half message
    assert any(e["event"] == "rocketmq_transaction_left_to_check_back"
               and e.get("message_id") == no for e in events)
    assert "commit" in check_backs(events, no)
    assert seen == {no: 1}


def test_a_call_cancelled_while_its_half_message_is_in_flight_rolls_it_back(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    engine, aengine = sqlite_db(tmp_path, "inflight.db")
    producer = RocketMQTransactionalProducer(config, [TX_TOPIC_A], guard_after=None)
    ob = AsyncOutbox(aengine, delivery=producer, local_transaction_timeout=LOCAL_TIMEOUT)
    ran: list[str] = []

    @ob.transactional_message(topic=TX_TOPIC_A, message_id="no")
    async def ship(session: AsyncSession, no: str) -> None:
        ran.append(no)

    no = unique("in-flight")

    async def scenario() -> None:
        await producer.astart()
        try:
            task = asyncio.ensure_future(ship(no))
            await asyncio.sleep(0)  # the half send is on its way on the producer's pool
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(wait_until, lambda: ended(events, no), 10)
        finally:
            await producer.aclose()

    with capture_events() as events:
        asyncio.run(scenario())
    assert ran == [] and log_rows(engine) == set()
    assert ended(events, no) == ["rollback"]  # the broker took the rollback


def test_an_unreachable_broker_falls_back_to_the_outbox_in_async_code(tmp_path: Path) -> None:
    engine, aengine = sqlite_db(tmp_path, "fallback.db")
    producer = RocketMQTransactionalProducer(RocketMQConfig("127.0.0.1:1", request_timeout=1),
                                             [MIXED_TOPIC], fallback_to_outbox=True)
    ob = AsyncOutbox(aengine, delivery=producer)

    @ob.transactional_message(topic=MIXED_TOPIC, message_id="no")
    async def ship(session: AsyncSession, no: str) -> None:
        pass

    async def scenario() -> dict[str, int]:
        try:
            await ship(unique("fallback"))  # succeeds without the broker
        finally:
            await producer.aclose()
        return await statuses(aengine)

    assert asyncio.run(scenario())["pending"] == 1
    assert log_rows(engine) == set()


# -- AsyncRelay and AsyncIdempotentConsumer --------------------------------------------


def test_the_async_relay_publishes_outbox_rows_with_the_async_publisher(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    _, aengine = sqlite_db(tmp_path, "relay.db")
    ob = AsyncOutbox(aengine)  # the local outbox: rows, published by the relay

    @ob.transactional_message(topic=MIXED_TOPIC, message_id="no")
    async def note(session: AsyncSession, no: str) -> None:
        pass

    ids = [unique("relayed") for _ in range(3)]

    async def scenario() -> bool:
        publisher = AsyncRocketMQPublisher(config, [MIXED_TOPIC])
        relay = ob.relay(publisher).start()
        try:
            for no in ids:
                await note(no)  # each commit nudges the relay
            return await eventually(lambda: _sent(aengine, len(ids)), 15)
        finally:
            await relay.stop()
            await publisher.close()

    assert asyncio.run(scenario())
    assert collect(config, MIXED_TOPIC, set(ids), timeout=20, settle=2) == {i: 1 for i in ids}


async def _sent(engine: AsyncEngine, n: int) -> bool:
    return (await statuses(engine))["sent"] == n


def test_the_async_consumer_applies_a_message_delivered_twice_once(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    _, aengine = sqlite_db(tmp_path, "consumer.db")
    message = Message(topic=MIXED_TOPIC, payload=b'{"n": 1}', id=unique("a-dup"))
    calls: list[str] = []

    async def handler(session: AsyncSession, received: ReceivedMessage) -> None:
        if received.id == message.id:
            calls.append(received.id)

    async def scenario() -> int:
        publisher = AsyncRocketMQPublisher(config, [MIXED_TOPIC])
        subscriber = AsyncRocketMQSubscriber(config, MIXED_TOPIC, group_name("a-dup"),
                                             dead_letter_topic=DLQ_TOPIC)
        # The inbox's group ("inventory") is not the RocketMQ consumer group.
        consumer = AsyncIdempotentConsumer(aengine, subscriber, "inventory", handler)
        try:
            await publisher.publish(message)
            await publisher.publish(message)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while ignored() < 1 and loop.time() < deadline:
                await consumer.run_once(wait_seconds=1)
        finally:
            await publisher.close()
            await subscriber.close()
        return ignored()

    def ignored() -> int:
        return sum(1 for e in events if e["event"] == "consumer_duplicate_ignored"
                   and e.get("message_id") == message.id)

    with capture_events() as events:
        assert asyncio.run(scenario()) == 1
    assert calls == [message.id]


class RecordingAsyncSubscriber(AsyncRocketMQSubscriber):
    """Remembers which message ids it dead-lettered (a new group also reads the
    topic's older messages, so counts alone would mislead)."""

    dead: set[str | None]

    async def dead_letter(self, delivery: Any, reason: str) -> None:
        await super().dead_letter(delivery, reason)
        self.dead.add(delivery.message_id)


def test_the_async_consumer_retries_then_dead_letters_with_the_error(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    _, aengine = sqlite_db(tmp_path, "failing.db")
    failing = Message(topic=MIXED_TOPIC, payload=b'{"n": 2}', id=unique("a-fail"))
    garbage = Message(topic=MIXED_TOPIC, payload=b"\xff not json", id=unique("a-garbage"))
    attempts: list[int] = []

    async def handler(session: AsyncSession, received: ReceivedMessage) -> None:
        if received.id == failing.id:
            attempts.append(received.attempt)
            raise RuntimeError("ledger is closed")

    async def scenario() -> None:
        group = group_name("a-fail")
        publisher = AsyncRocketMQPublisher(config, [MIXED_TOPIC])
        subscriber = RecordingAsyncSubscriber(config, MIXED_TOPIC, group,
                                              dead_letter_topic=DLQ_TOPIC)
        subscriber.dead = set()
        consumer = AsyncIdempotentConsumer(
            aengine, subscriber, group, handler,
            config=ConsumerConfig(max_attempts=3, backoff=tenacity.wait_fixed(1)))
        try:
            await publisher.publish(failing)
            await publisher.publish(garbage)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not {failing.id, garbage.id} <= subscriber.dead and loop.time() < deadline:
                await consumer.run_once(wait_seconds=1)
        finally:
            await publisher.close()
            await subscriber.close()

    asyncio.run(scenario())
    assert attempts == [1, 2, 3]
    reasons = dead_letter_reasons(config, {failing.id, garbage.id}, 30)
    assert "ledger is closed" in reasons[failing.id]
    assert "undecodable" in reasons[garbage.id]
