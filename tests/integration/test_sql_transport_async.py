"""AsyncSqlTransport in its event loop: what the contract suite (which drives it from
threads) cannot show. Each test runs its own loop with ``asyncio.run``."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import re
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import Engine, event, update
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import BrokerUnavailableError, Delivery, Message, SqlTransport
from outbox.aio.sql_transport import AsyncSqlTransport
from outbox.schema import utcnow
from outbox.sql_transport import messages as queue

TOPIC = "t"


def msg(i: str, payload: bytes = b"{}") -> Message:
    return Message(topic=TOPIC, id=i, payload=payload)


def test_a_waiting_fetch_leaves_the_loop_free(async_engine: AsyncEngine) -> None:
    async def scenario() -> tuple[list[Delivery], float, int]:
        # A long poll interval: were the pauses blocking, the loop would stall for 0.2 s
        # at a time, the ticker would barely move and the publisher could not run.
        transport = AsyncSqlTransport(async_engine, poll_interval=0.2)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def publish_later() -> None:
            await asyncio.sleep(0.8)
            await transport.publisher().publish(msg("late"))

        background = [asyncio.create_task(ticker()), asyncio.create_task(publish_later())]
        start = time.monotonic()
        got = await transport.subscriber(TOPIC, "g").fetch(10, 20.0)
        elapsed = time.monotonic() - start
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        return got, elapsed, ticks

    got, elapsed, ticks = asyncio.run(scenario())
    assert [d.message_id for d in got] == ["late"]
    assert 0.75 <= elapsed < 5.0
    assert ticks >= 0.5 * elapsed / 0.01  # the ticker ran through the whole wait


def test_cancelling_a_waiting_fetch_is_prompt_and_loses_nothing(
    async_engine: AsyncEngine,
) -> None:
    async def scenario() -> None:
        transport = AsyncSqlTransport(async_engine, poll_interval=0.05)
        sub = transport.subscriber(TOPIC, "g", visibility_timeout=0.5)
        waiting = asyncio.create_task(sub.fetch(10, 30.0))
        await asyncio.sleep(0.3)
        cancelled_at = time.monotonic()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert time.monotonic() - cancelled_at < 0.5

        await transport.publisher().publish(msg("after"))
        [d] = await sub.fetch(10, 2.0)
        assert (d.message_id, d.attempt) == ("after", 1)  # the cancelled fetch took nothing
        await sub.ack(d)

        # Cancel fetches at arbitrary points, mid-claim included: a delivery claimed by
        # a cancelled fetch comes back after the visibility timeout.
        rng = random.Random(11)
        ids = [f"c-{i:02d}" for i in range(25)]
        done: Counter[str] = Counter()
        for i in ids:
            await transport.publisher().publish(msg(i))
            task = asyncio.create_task(sub.fetch(10, 5.0))
            await asyncio.sleep(rng.uniform(0, 0.015))
            cancelled_at = time.monotonic()
            task.cancel()
            try:
                handed_out = await task
            except asyncio.CancelledError:
                handed_out = []
            assert time.monotonic() - cancelled_at < 1.0
            for d in handed_out:
                await sub.ack(d)
                done[d.message_id or ""] += 1
        deadline = time.monotonic() + 15
        while len(done) < len(ids) and time.monotonic() < deadline:
            for d in await sub.fetch(50, 0.5):
                await sub.ack(d)
                done[d.message_id or ""] += 1
        assert sorted(done) == ids
        assert set(done.values()) == {1}
        assert await transport.pending_count(TOPIC, "g") == 0

    asyncio.run(scenario())


#: Statements of a claim, in order; a fetch is cancelled just as each one starts.
CLAIM_STATEMENTS = [
    r"INSERT (IGNORE )?INTO outbox_transport_deliveries",
    r"SELECT outbox_transport_deliveries\.seq",
    r"UPDATE outbox_transport_deliveries SET attempts",
    r"SELECT outbox_transport_messages\.",
]


def test_a_fetch_cancelled_inside_its_claim_leaves_the_queue_usable(
    async_engine: AsyncEngine,
) -> None:
    async def scenario() -> None:
        transport = AsyncSqlTransport(async_engine, poll_interval=0.01)
        sub = transport.subscriber(TOPIC, "g", visibility_timeout=0.5)
        victim: asyncio.Task[list[Delivery]] | None = None
        stage = ""

        def cancel_at_stage(conn: object, cursor: object, statement: str, *args: object) -> None:
            nonlocal victim
            if victim is not None and re.match(stage, statement.lstrip()):
                victim.cancel()  # lands at the statement's await, in the middle of the claim
                victim = None

        event.listen(async_engine.sync_engine, "before_cursor_execute", cancel_at_stage)
        try:
            for stage in CLAIM_STATEMENTS:
                await transport.publisher().publish(msg(f"m-{len(stage)}"))
                task = asyncio.create_task(sub.fetch(10, 5.0))
                victim = task
                started = time.monotonic()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert victim is None, f"the claim never reached {stage!r}"
                assert time.monotonic() - started < 1.0
                # Nothing of the interrupted claim holds a lock: another write goes through.
                await asyncio.wait_for(transport.publisher().publish(msg(f"w-{len(stage)}")), 5)
        finally:
            event.remove(async_engine.sync_engine, "before_cursor_execute", cancel_at_stage)
        expected = {f"{p}-{len(s)}" for s in CLAIM_STATEMENTS for p in ("m", "w")}
        got: set[str] = set()
        deadline = time.monotonic() + 10
        while got != expected and time.monotonic() < deadline:
            for d in await sub.fetch(50, 0.5):
                await sub.ack(d)
                got.add(d.message_id or "")
        assert got == expected

    asyncio.run(scenario())


@pytest.mark.parametrize("backend", [
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
])
def test_concurrent_consumers_of_one_group_never_share_a_delivery(
    async_engine: AsyncEngine,
) -> None:
    total = 120

    async def scenario() -> tuple[list[str], Counter[str], int]:
        transport = AsyncSqlTransport(async_engine, poll_interval=0.01)
        await transport.publisher().publish_batch([msg(f"m-{i:03d}") for i in range(total)])
        in_flight: set[str] = set()
        overlaps: list[str] = []
        acked: Counter[str] = Counter()
        busy_at_once = 0

        async def consume() -> None:
            nonlocal busy_at_once
            sub = transport.subscriber(TOPIC, "g", visibility_timeout=60)
            while sum(acked.values()) < total:
                for d in await sub.fetch(3, 0.05):
                    mid = d.message_id or ""
                    if mid in in_flight:
                        overlaps.append(mid)
                    in_flight.add(mid)
                    busy_at_once = max(busy_at_once, len(in_flight))
                    await asyncio.sleep(0.002)  # let the other consumers claim meanwhile
                    in_flight.discard(mid)
                    await sub.ack(d)
                    acked[mid] += 1

        await asyncio.wait_for(asyncio.gather(*(consume() for _ in range(4))), 60)
        return overlaps, acked, busy_at_once

    overlaps, acked, busy_at_once = asyncio.run(scenario())
    assert overlaps == []
    assert len(acked) == total and set(acked.values()) == {1}
    assert busy_at_once > 1  # the consumers really worked at the same time


def test_sync_publisher_and_async_subscriber_share_the_tables(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    sync = SqlTransport(engine, poll_interval=0.01)
    publisher = sync.publisher()

    async def scenario() -> None:
        transport = AsyncSqlTransport(async_engine, poll_interval=0.01)
        sub = transport.subscriber(TOPIC, "g", visibility_timeout=0.3)
        # The sync publisher runs on a thread while the async fetch waits in the loop.
        timer = threading.Timer(0.2, lambda: publisher.publish_batch(
            [msg("s-1", b"\x00one"), msg("s-2", "zwei ü".encode())]))
        timer.start()
        try:
            got = await sub.fetch(10, 10.0)
        finally:
            await asyncio.to_thread(timer.join)
        assert [(d.message_id, d.payload) for d in got] == [
            ("s-1", b"\x00one"), ("s-2", "zwei ü".encode())]
        await sub.ack(got[0])
        await sub.dead_letter(got[1], "refused")
        assert sync.counts(TOPIC, "g") == await transport.counts(TOPIC, "g") == {
            "unseen": 0, "ready": 0, "done": 1, "dead": 1}
        assert [(d.message_id, d.reason) for d in sync.dead_letters("g")] == [("s-2", "refused")]

        # A delivery the sync form took and dropped comes back to the async form.
        publisher.publish(msg("s-3"))
        [taken] = sync.subscriber(TOPIC, "g", visibility_timeout=0.3).fetch(10, 2.0)
        [again] = await sub.fetch(10, 3.0)
        assert (taken.message_id, again.message_id, again.attempt) == ("s-3", "s-3", 2)
        await sub.retry(again, 0, "try once more")
        [third] = sync.subscriber(TOPIC, "g").fetch(10, 2.0)
        assert third.attempt == 3

    asyncio.run(scenario())


def test_the_admin_coroutines(engine: Engine, async_engine: AsyncEngine) -> None:
    async def scenario() -> None:
        transport = AsyncSqlTransport(async_engine, poll_interval=0.01)
        await transport.create_tables()  # the tables exist already: nothing happens
        await transport.put_raw(TOPIC, b"raw", key="k", headers={"h": "v"})
        await transport.publisher().publish(msg("old"))
        assert await transport.counts(TOPIC, "g") == {"unseen": 2, "ready": 0, "done": 0,
                                                       "dead": 0}
        assert await transport.pending_count(TOPIC, "g") == 2
        raw, old = await transport.subscriber(TOPIC, "g").fetch(10, 1.0)
        assert (raw.message_id, raw.key, dict(raw.headers), raw.payload) == (
            None, "k", {"h": "v"}, b"raw")
        assert old.message_id == "old"
        assert await transport.pending_count(TOPIC, "g") == 2  # in flight, still pending

        with engine.begin() as conn:
            conn.execute(update(queue).where(queue.c.message_id == "old")
                         .values(created_at=utcnow() - dt.timedelta(days=3)))
        assert await transport.purge(dt.timedelta(days=1), batch_size=1) == 1
        assert await transport.counts(TOPIC, "g") == {"unseen": 0, "ready": 1, "done": 0,
                                                       "dead": 0}

        await transport.drop_tables()
        with pytest.raises(BrokerUnavailableError, match=r"AsyncSqlTransport\.create_tables"):
            await transport.publisher().publish(msg("nowhere"))
        await transport.create_tables()
        await transport.publisher().publish(msg("again"))
        assert await transport.pending_count(TOPIC, "g") == 1

    asyncio.run(scenario())
