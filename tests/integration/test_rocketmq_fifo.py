"""Per-key order on the broker (scripts/rocketmq up): a FIFO topic, the relay's
publisher sending each key as the message group, and a consumer group created with
orderly consumption (``mqadmin updateSubGroup -o true``; ``scripts/rocketmq up``
creates ``outbox-test-fifo-group`` and ``outbox-test-fifo-group-async``).

On 5.3.3 a FIFO group receives a queue's next message only once the one before it is
acknowledged, or its invisible time (which ``retry`` sets to the backoff delay) runs
out. So a key whose message fails waits for that message's redelivery, while a key in
another queue goes on. The broker keeps that order per queue, not per message group:
keys that share a queue wait for each other. The subscriber receives one message at a
time from a FIFO topic whatever batch the consumer asks for: the consumer handles
every delivery of a fetched batch, so with a larger batch a key's later message in the
same batch would run before the failed one comes back.

The groups are fixed (a FIFO group must exist before its first receive): each test
handles only its own messages and acknowledges whatever else it receives.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tenacity
from sqlalchemy import Engine
from sqlalchemy.pool import NullPool

import outbox
from outbox import ConsumerConfig, IdempotentConsumer, Message, ReceivedMessage
from outbox.aio import AsyncIdempotentConsumer, create_async_engine
from outbox_rocketmq import (
    AsyncRocketMQPublisher,
    AsyncRocketMQSubscriber,
    RocketMQConfig,
    RocketMQPublisher,
    RocketMQSubscriber,
)
from outbox_rocketmq._client import client_configuration, rocketmq
from outbox_rocketmq.topics import accepted_types, is_fifo

from .rocketmq_support import DLQ_TOPIC

pytestmark = [pytest.mark.rocketmq]

FIFO_TOPIC = "outbox-test-fifo"
FIFO_GROUP = "outbox-test-fifo-group"
FIFO_GROUP_ASYNC = "outbox-test-fifo-group-async"
#: How long the failed message stays invisible (the consumer's backoff): the window in
#: which the other key must go on.
BACKOFF = 4.0


@pytest.fixture
def config(rocketmq_endpoints: str) -> RocketMQConfig:
    return RocketMQConfig(rocketmq_endpoints)


# -- which queue a key lands in ---------------------------------------------------------


def java_hash(text: str) -> int:
    """Java's String.hashCode."""
    h = 0
    units = text.encode("utf-16-le")
    for i in range(0, len(units), 2):
        h = (31 * h + int.from_bytes(units[i:i + 2], "little")) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def consistent_hash(value: int, buckets: int) -> int:
    """Guava's Hashing.consistentHash, which the proxy uses to pick a message group's
    queue: ``consistentHash(group.hashCode(), writable queues)``."""
    mask = (1 << 64) - 1
    state = value & mask
    candidate = 0
    while True:
        state = (2862933555777941757 * state + 1) & mask
        next_double = ((state >> 33) + 1) / float(1 << 31)
        nxt = int((candidate + 1) / next_double)
        if 0 <= nxt < buckets:
            candidate = nxt
        else:
            return candidate


def writable_queues(config: RocketMQConfig) -> int:
    """The FIFO topic's writable queues (and a check that it is a FIFO topic)."""
    rmq = rocketmq()
    producer = rmq.Producer(client_configuration(config), (FIFO_TOPIC,))
    producer.startup()
    try:
        types = accepted_types(producer, FIFO_TOPIC)
        assert is_fifo(types), f"{FIFO_TOPIC} is {sorted(types)}: run scripts/rocketmq up"
        route = producer._retrieve_topic_route_data(FIFO_TOPIC)
        return sum(1 for q in route.message_queues if q.is_writable())
    finally:
        producer.shutdown()


def keys_in_two_queues(queues: int) -> tuple[str, str]:
    """Two fresh keys that the proxy puts in different queues."""
    run = uuid.uuid4().hex[:8]
    first = f"acct-a-{run}"
    n = 0
    while True:
        second = f"acct-b-{run}-{n}"
        if (consistent_hash(java_hash(first), queues)
                != consistent_hash(java_hash(second), queues)):
            return first, second
        n += 1


def queue_of(delivery: Any) -> str:
    """The broker queue a 5.x delivery came from (in its receipt handle)."""
    return str(delivery.handle.receipt_handle).split()[6]


# -- the scenario -----------------------------------------------------------------------


@dataclass
class Scenario:
    """Key ``a``'s five messages (its third fails once) and key ``b``'s: two published
    with ``a``'s, three more only once ``a``'s third has failed."""

    a: str
    b: str
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    #: (message id, key, attempt, "ok" or "failed", monotonic time), as the handler ran.
    calls: list[tuple[str, str, int, str, float]] = field(default_factory=list)
    queues: dict[str, set[str]] = field(default_factory=dict)

    def message(self, key: str, n: int) -> Message:
        return Message(topic=FIFO_TOPIC, payload=b'{"n": %d}' % n, key=key,
                       id=f"fifo-{self.run}-{'a' if key == self.a else 'b'}{n}")

    @property
    def first(self) -> list[Message]:
        return [self.message(self.a, n) for n in range(5)] + [
            self.message(self.b, 0), self.message(self.b, 1)]

    @property
    def later(self) -> list[Message]:
        return [self.message(self.b, n) for n in (2, 3, 4)]

    @property
    def failing(self) -> str:
        return self.message(self.a, 2).id

    @property
    def ours(self) -> set[str]:
        return {m.id for m in self.first + self.later}

    def handle(self, received: ReceivedMessage) -> None:
        if received.id not in self.ours:
            return  # another run's leftover: acknowledged, nothing more
        failed = received.id == self.failing and received.attempt == 1
        self.calls.append((received.id, received.key or "", received.attempt,
                           "failed" if failed else "ok", time.monotonic()))
        if failed:
            raise RuntimeError("ledger busy, try again")

    def has_failed(self) -> bool:
        return any(c[3] == "failed" for c in self.calls)

    def done(self) -> bool:
        return {c[0] for c in self.calls if c[3] == "ok"} >= self.ours

    def note_queue(self, delivery: Any) -> None:
        if delivery.message_id in self.ours:
            self.queues.setdefault(delivery.key or "", set()).add(queue_of(delivery))

    def check(self) -> None:
        a_calls = [(c[0], c[2], c[3]) for c in self.calls if c[1] == self.a]
        a_ids = [self.message(self.a, n).id for n in range(5)]
        # The key waited: its third message failed, came back, and only then its fourth.
        assert a_calls == [
            (a_ids[0], 1, "ok"), (a_ids[1], 1, "ok"), (a_ids[2], 1, "failed"),
            (a_ids[2], 2, "ok"), (a_ids[3], 1, "ok"), (a_ids[4], 1, "ok")], a_calls
        b_ids = [self.message(self.b, n).id for n in range(5)]
        assert [c[0] for c in self.calls if c[1] == self.b] == b_ids
        # The other key went on meanwhile: its later messages ran after the failure
        # and before the redelivery.
        failed_at = next(c[4] for c in self.calls if c[3] == "failed")
        retried_at = next(c[4] for c in self.calls if c[0] == self.failing and c[3] == "ok")
        b_later = [c[4] for c in self.calls if c[0] in {m.id for m in self.later}]
        assert all(failed_at < t < retried_at for t in b_later), (failed_at, b_later, retried_at)
        assert retried_at - failed_at >= BACKOFF - 1.0  # the invisible time set by retry
        assert len(self.queues[self.a]) == 1 and len(self.queues[self.b]) == 1
        assert self.queues[self.a] != self.queues[self.b], self.queues


def consumer_config() -> ConsumerConfig:
    # The default batch size: the subscriber itself takes one at a time from a FIFO topic.
    return ConsumerConfig(max_attempts=5, backoff=tenacity.wait_fixed(BACKOFF))


def outbox_engine(tmp_path: Path, name: str) -> tuple[Engine, str]:
    url = f"sqlite:///{tmp_path / name}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    return engine, url


def fill(engine: Engine, messages: list[Message]) -> None:
    with engine.begin() as conn:
        for m in messages:
            outbox.storage.add_message(conn, m)


class NotingSubscriber(RocketMQSubscriber):
    """Notes the queue each of the scenario's deliveries came from."""

    note: Callable[[Any], None]

    def fetch(self, max_messages: int, wait_seconds: float) -> Any:
        received = super().fetch(max_messages, wait_seconds)
        for d in received:
            self.note(d)
        return received


def test_a_failing_message_holds_back_its_key_while_another_key_goes_on(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    scenario = Scenario(*keys_in_two_queues(writable_queues(config)))
    engine, _ = outbox_engine(tmp_path, "outbox.db")
    inbox, _ = outbox_engine(tmp_path, "inbox.db")
    publisher = RocketMQPublisher(config, [FIFO_TOPIC])
    subscriber = NotingSubscriber(config, FIFO_TOPIC, FIFO_GROUP, dead_letter_topic=DLQ_TOPIC,
                                  invisible_seconds=15, orderly=True)
    subscriber.note = scenario.note_queue
    consumer = IdempotentConsumer(inbox, subscriber, f"inbox-{scenario.run}",
                                  lambda _session, received: scenario.handle(received),
                                  config=consumer_config())
    relay = outbox.Relay(engine, publisher)
    try:
        # The group's first receive fixes where it starts; it also takes what an
        # earlier run may have left.
        consumer.run_once(wait_seconds=1)
        fill(engine, scenario.first)
        assert relay.run_once().published == len(scenario.first)
        later_sent = False
        deadline = time.monotonic() + 90
        while not scenario.done() and time.monotonic() < deadline:
            consumer.run_once(wait_seconds=1)
            if scenario.has_failed() and not later_sent:
                fill(engine, scenario.later)
                assert relay.run_once().published == len(scenario.later)
                later_sent = True
    finally:
        publisher.close()
        subscriber.close()
    assert scenario.done(), scenario.calls
    scenario.check()


class AsyncNotingSubscriber(AsyncRocketMQSubscriber):
    note: Callable[[Any], None]

    async def fetch(self, max_messages: int, wait_seconds: float) -> Any:
        received = await super().fetch(max_messages, wait_seconds)
        for d in received:
            self.note(d)
        return received


def test_the_async_relay_and_consumer_keep_the_same_order(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    scenario = Scenario(*keys_in_two_queues(writable_queues(config)))
    engine, url = outbox_engine(tmp_path, "outbox.db")
    _, inbox_url = outbox_engine(tmp_path, "inbox.db")

    async def handler(_session: Any, received: ReceivedMessage) -> None:
        scenario.handle(received)

    async def run() -> None:
        aengine = create_async_engine(url, poolclass=NullPool)
        ainbox = create_async_engine(inbox_url, poolclass=NullPool)
        publisher = AsyncRocketMQPublisher(config, [FIFO_TOPIC])
        subscriber = AsyncNotingSubscriber(config, FIFO_TOPIC, FIFO_GROUP_ASYNC,
                                           dead_letter_topic=DLQ_TOPIC, invisible_seconds=15,
                                           orderly=True)
        subscriber.note = scenario.note_queue
        consumer = AsyncIdempotentConsumer(ainbox, subscriber, f"inbox-{scenario.run}",
                                           handler, config=consumer_config())
        relay = outbox.AsyncRelay(aengine, publisher)
        try:
            await consumer.run_once(wait_seconds=1)  # where the group starts, leftovers
            fill(engine, scenario.first)
            assert (await relay.run_once()).published == len(scenario.first)
            later_sent = False
            deadline = time.monotonic() + 90
            while not scenario.done() and time.monotonic() < deadline:
                await consumer.run_once(wait_seconds=1)
                if scenario.has_failed() and not later_sent:
                    fill(engine, scenario.later)
                    assert (await relay.run_once()).published == len(scenario.later)
                    later_sent = True
        finally:
            await publisher.close()
            await subscriber.close()
            await aengine.dispose()
            await ainbox.dispose()

    asyncio.run(run())
    assert scenario.done(), scenario.calls
    scenario.check()


def test_orderly_through_the_proxy_needs_a_fifo_topic(config: RocketMQConfig) -> None:
    subscriber = RocketMQSubscriber(config, "outbox-test-mixed", "outbox-test-fifo-group",
                                    dead_letter_topic=DLQ_TOPIC, orderly=True)
    try:
        with pytest.raises(outbox.ConfigurationError, match="needs a FIFO topic"):
            subscriber.fetch(1, 1)
    finally:
        subscriber.close()
