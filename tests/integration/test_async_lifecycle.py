"""The asyncio relay and consumer in the service's event loop: a stop lets the work in
hand finish, a cancellation rolls it back, and either way nothing is lost."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox import AsyncIdempotentConsumer, AsyncRelay, JsonCodec, Message, RelayConfig
from outbox.aio import AsyncSqlTransport
from outbox.schema import inbox
from outbox.testing import InMemoryBroker

from .helpers import add_messages, outbox_row

QUIET = RelayConfig(poll_interval=0.05, purge_interval=3600, listen=False)


class HeldPublisher:
    """An asyncio publisher whose publish waits until the test lets it go."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self.inner = broker.async_publisher()
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def publish(self, message: Message) -> None:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        await self.inner.publish(message)

    async def close(self) -> None:
        pass


def test_a_stop_lets_the_batch_in_hand_finish(engine: Engine, async_engine: AsyncEngine) -> None:
    broker = InMemoryBroker()
    add_messages(engine, [Message(topic="t", id="m1", payload=b"{}")])

    async def scenario() -> None:
        publisher = HeldPublisher(broker)
        relay = AsyncRelay(async_engine, publisher, QUIET).start()
        await asyncio.wait_for(publisher.started.wait(), 10)
        stopping = asyncio.create_task(relay.stop(timeout=10))
        await asyncio.sleep(0.2)
        assert not stopping.done()  # it waits for the publish in hand
        publisher.release.set()
        await stopping

    asyncio.run(scenario())
    assert outbox_row(engine, "m1").status == "sent"
    assert [m.id for m in broker.messages("t")] == ["m1"]


def test_a_relay_cancelled_mid_batch_publishes_the_batch_later(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    broker = InMemoryBroker()
    add_messages(engine, [Message(topic="t", id="m1", payload=b"{}")])

    async def scenario() -> None:
        publisher = HeldPublisher(broker)
        relay = AsyncRelay(async_engine, publisher, QUIET).start()
        await asyncio.wait_for(publisher.started.wait(), 10)
        await relay.stop(timeout=0.1)  # past the timeout: cancelled mid-publish
        assert outbox_row(engine, "m1").status == "pending"  # the batch rolled back
        again = AsyncRelay(async_engine, broker.async_publisher(), QUIET)
        assert await again.drain(timeout=10) == 1

    asyncio.run(scenario())
    assert outbox_row(engine, "m1").status == "sent"
    assert [m.id for m in broker.messages("t")] == ["m1"]


def inbox_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(inbox)) or 0)


def test_a_consumer_cancelled_mid_handler_gets_the_delivery_again(
    engine: Engine, async_engine: AsyncEngine, tables: SimpleNamespace
) -> None:
    transport = AsyncSqlTransport(async_engine, poll_interval=0.01)
    applied: list[int] = []
    held = asyncio.Event()

    async def scenario() -> None:
        entered = asyncio.Event()

        async def handler(session: AsyncSession, message: Any) -> None:
            await session.execute(tables.applied.insert().values(message_id=message.id,
                                                                 body="x"))
            applied.append(message.attempt)
            entered.set()
            if message.attempt == 1:
                await held.wait()  # never set: this attempt is cancelled

        await transport.publisher().publish(
            Message(topic="t", id="m1", payload=JsonCodec().encode({"n": 1})))
        subscriber = transport.subscriber("t", "g", visibility_timeout=0.5)
        consumer = AsyncIdempotentConsumer(async_engine, subscriber, "g", handler).start()
        await asyncio.wait_for(entered.wait(), 10)
        await consumer.stop(timeout=0.1)  # cancelled inside the handler: rolled back
        assert inbox_rows(engine) == 0
        again = AsyncIdempotentConsumer(async_engine, subscriber, "g", handler)
        for _ in range(50):
            if (await again.run_once(wait_seconds=0.2)).processed:
                break
        assert again.stats.processed == 1

    asyncio.run(scenario())
    assert applied == [1, 2]
    assert inbox_rows(engine) == 1
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(tables.applied)) == 1


def test_a_consumer_stop_lets_the_delivery_in_hand_finish(
    engine: Engine, async_engine: AsyncEngine, tables: SimpleNamespace
) -> None:
    broker = InMemoryBroker()
    broker.publish(Message(topic="t", id="m1", payload=b'{"n": 1}'))

    async def scenario() -> None:
        entered = asyncio.Event()

        async def handler(session: AsyncSession, message: Any) -> None:
            entered.set()
            await asyncio.sleep(0.3)
            await session.execute(tables.applied.insert().values(message_id=message.id,
                                                                 body="x"))

        consumer = AsyncIdempotentConsumer(
            async_engine, broker.async_subscriber("t", "g"), "g", handler).start()
        await asyncio.wait_for(entered.wait(), 10)
        await consumer.stop(timeout=10)
        assert consumer.stats.processed == 1
        # Acknowledged: nothing comes back to the group.
        assert list(await broker.async_subscriber("t", "g").fetch(10, 0.0)) == []

    asyncio.run(scenario())
    assert inbox_rows(engine) == 1
    assert broker.dead_letters("t", "g") == []
