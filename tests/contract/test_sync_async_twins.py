"""The sync and async forms of a transport share one queue: what one form publishes
the other consumes, and a group's delivery state is the same whichever form reads it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from outbox import BrokerUnavailableError
from outbox.testing import InMemoryBroker

from .transports import (
    AsyncMemoryUnderTest,
    AsyncSqlUnderTest,
    MemoryUnderTest,
    SqlUnderTest,
    TransportUnderTest,
    message,
)

Twins = tuple[TransportUnderTest, TransportUnderTest]


@pytest.fixture
def twins(backend: str, request: pytest.FixtureRequest) -> Iterator[Twins]:
    """(sync form, async form) of one transport over the same state."""
    sync: TransportUnderTest
    async_: TransportUnderTest
    if backend == "memory":
        memory = MemoryUnderTest()
        sync, async_ = memory, AsyncMemoryUnderTest(memory.broker)
    else:
        url = request.getfixturevalue("db_url")
        sync = SqlUnderTest(request.getfixturevalue("engine"), url)
        async_ = AsyncSqlUnderTest(url)
    yield sync, async_
    async_.close()
    sync.close()


def test_sync_publish_async_consume_and_back(twins: Twins) -> None:
    sync, async_ = twins
    sync.publisher().publish(message(id="s-1", key="k", headers={"h": "ü"}, payload=b"\x00s"))
    [got] = async_.subscriber("contract", "g").fetch(10, 2.0)
    assert (got.message_id, got.key, dict(got.headers), got.payload) == ("s-1", "k", {"h": "ü"},
                                                                         b"\x00s")

    async_.publisher().publish(message(id="a-1", payload=b"a"))
    # Same group, sync form: s-1 is still in flight with the async subscriber.
    [back] = sync.subscriber("contract", "g").fetch(10, 2.0)
    assert (back.message_id, back.payload, back.attempt) == ("a-1", b"a", 1)


def test_the_group_state_is_shared_between_the_forms(twins: Twins) -> None:
    sync, async_ = twins
    async_.publisher().publish(message(id="m-1"))
    async_.publisher().publish(message(id="m-2"))
    sync_sub = sync.subscriber("contract", "g", visibility_timeout=0.4)
    async_sub = async_.subscriber("contract", "g", visibility_timeout=0.4)

    first, _in_flight = sync_sub.fetch(10, 2.0)
    sync_sub.ack(first)
    assert async_sub.fetch(10, 0.1) == []  # m-2 is in flight, m-1 is done

    [again] = async_sub.fetch(10, 3.0)  # after the sync form's visibility timeout
    assert (again.message_id, again.attempt) == ("m-2", 2)
    async_sub.dead_letter(again, "refused by the async form")
    assert sync.dead_letters("contract", "g") == [("m-2", "refused by the async form")]
    assert sync_sub.fetch(10, 0.5) == []


def test_an_async_fetch_wakes_for_a_sync_publish_from_another_thread(twins: Twins) -> None:
    sync, async_ = twins
    sub = async_.subscriber("contract", "g")
    timer = threading.Timer(0.3, lambda: sync.publisher().publish(message(id="late")))
    start = time.monotonic()
    timer.start()
    try:
        got = sub.fetch(10, 10.0)
    finally:
        timer.join()
    assert [d.message_id for d in got] == ["late"]
    assert 0.25 <= time.monotonic() - start < 3.0


@pytest.mark.parametrize("backend", ["memory"])
def test_fail_next_applies_to_the_async_publisher(backend: str) -> None:
    broker = InMemoryBroker()
    publisher = broker.async_publisher()

    async def scenario() -> None:
        broker.fail_next(2)
        with pytest.raises(BrokerUnavailableError):
            await publisher.publish(message(id="x-1"))
        with pytest.raises(BrokerUnavailableError):
            await publisher.publish_batch([message(id="x-2"), message(id="x-3")])
        await publisher.publish_batch([message(id="y-1"), message(id="y-2")])

    asyncio.run(scenario())
    assert [m.id for m in broker.messages("contract")] == ["y-1", "y-2"]


@pytest.mark.parametrize("backend", ["memory"])
def test_the_in_memory_async_fetch_waits_in_the_loop_and_can_be_cancelled(
    backend: str,
) -> None:
    broker = InMemoryBroker()

    async def scenario() -> None:
        sub = broker.async_subscriber("contract", "g")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def publish_later() -> None:
            await asyncio.sleep(0.5)
            await broker.async_publisher().publish(message(id="late"))

        background = [asyncio.create_task(ticker()), asyncio.create_task(publish_later())]
        start = time.monotonic()
        got = await sub.fetch(10, 20.0)
        elapsed = time.monotonic() - start
        assert [d.message_id for d in got] == ["late"]
        assert 0.45 <= elapsed < 3.0
        assert ticks >= 0.5 * elapsed / 0.01  # the loop ran on through the wait
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)

        waiting = asyncio.create_task(sub.fetch(10, 30.0))
        await asyncio.sleep(0.2)
        cancelled_at = time.monotonic()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert time.monotonic() - cancelled_at < 0.2
        broker.publish(message(id="next"))  # the cancelled fetch no longer listens
        [d] = await sub.fetch(10, 1.0)
        assert (d.message_id, d.attempt) == ("next", 1)

    asyncio.run(scenario())
