"""The idempotent consumer over a subscriber with no optional ability (fetch, ack and
close only, as Kafka's): it holds a failed delivery and tries again in place, counts
attempts in its own database, and keeps dead letters there, so the promise (applied
once, retried with backoff, then dead-lettered with the error) is the one it keeps
on a broker that does all of that itself. Sync and asyncio, on every database."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import ConsumerConfig, IdempotentConsumer, JsonCodec, Message, Reject
from outbox.aio import AsyncIdempotentConsumer
from outbox.consumer import Outcome
from outbox.consumer_store import consumer_dead_letters_of
from outbox.errors import MissingTableError
from outbox.schema import consumer_attempts, inbox
from outbox.testing import (
    AsyncMinimalSubscriber,
    InMemoryBroker,
    MinimalSubscriber,
    MinimalSubscriberWithDeadLetters,
)
from outbox.transport import AsyncSubscriberWrapper, Delivery, SubscriberWrapper
from outbox.typing import Abilities

TOPIC = "transfers"
GROUP = "bank2"
#: Three attempts, 20 ms apart: a test holds for well under a second.
CONFIG = ConsumerConfig(max_attempts=3, backoff=lambda state: 0.02, wait_seconds=0.2)


def publish(broker: InMemoryBroker, *ids: str, key: str = "acct-1") -> None:
    for i in ids:
        broker.publish(Message(id=i, topic=TOPIC, key=key, headers={"h": "ü"},
                               payload=JsonCodec().encode({"id": i})))


def attempts_rows(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            select(consumer_attempts.c.message_id, consumer_attempts.c.attempts))]


def processed(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(inbox.c.message_id)))


class Flaky:
    """A handler failing ``failures[id]`` times for a message, then succeeding."""

    def __init__(self, failures: dict[str, int | float]) -> None:
        self.failures = failures
        self.calls: list[tuple[str, int]] = []

    def note(self, message: Any) -> None:
        self.calls.append((message.id, message.attempt))
        if sum(1 for i, _ in self.calls if i == message.id) <= self.failures.get(message.id, 0):
            raise RuntimeError(f"cannot apply {message.id} yet")

    def __call__(self, session: Any, message: Any) -> None:
        self.note(message)


def test_a_minimal_subscriber_has_no_ability() -> None:
    broker = InMemoryBroker()
    assert Abilities.of(MinimalSubscriber(broker.subscriber(TOPIC, GROUP))) == Abilities(
        redelivery=False, dead_letter=False, counts_deliveries=False)
    assert Abilities.of(broker.subscriber(TOPIC, GROUP)) == Abilities(True, True, True)
    assert Abilities.of(MinimalSubscriberWithDeadLetters(broker.subscriber(TOPIC, GROUP))
                        ).dead_letter


def test_a_failed_delivery_is_held_and_tried_again_in_place(engine: Engine) -> None:
    broker = InMemoryBroker()
    publish(broker, "m-1", "m-2")
    handler = Flaky({"m-1": 2})
    consumer = IdempotentConsumer(engine, MinimalSubscriber(broker.subscriber(TOPIC, GROUP)),
                                  GROUP, handler, config=CONFIG)

    stats = consumer.run_once(1.0)

    # m-1 failed twice and succeeded on the third attempt before m-2 was touched.
    assert handler.calls == [("m-1", 1), ("m-1", 2), ("m-1", 3), ("m-2", 1)]
    assert (stats.processed, stats.dead_lettered) == (2, 0)
    assert processed(engine) == {"m-1", "m-2"}
    assert attempts_rows(engine) == []  # the count went with the success
    assert consumer_dead_letters_of(engine) == []


def test_a_message_that_keeps_failing_is_dead_lettered_in_the_database(engine: Engine) -> None:
    broker = InMemoryBroker()
    publish(broker, "poison", "next")
    handler = Flaky({"poison": float("inf")})
    consumer = IdempotentConsumer(engine, MinimalSubscriber(broker.subscriber(TOPIC, GROUP)),
                                  GROUP, handler, config=CONFIG)

    consumer.run_once(1.0)

    assert [i for i, _ in handler.calls] == ["poison"] * 3 + ["next"]
    [dead] = consumer_dead_letters_of(engine, GROUP)
    assert (dead.message_id, dead.topic, dead.key, dead.attempts) == ("poison", TOPIC, "acct-1", 3)
    assert dead.headers == {"h": "ü"} and JsonCodec().decode(dead.payload) == {"id": "poison"}
    assert dead.reason.startswith("handler failed 3 times: RuntimeError: cannot apply poison")
    assert processed(engine) == {"next"}
    assert attempts_rows(engine) == []
    # Both were acknowledged: nothing comes back, and the broker dead-lettered nothing.
    assert broker.subscriber(TOPIC, GROUP).fetch(10, 0.1) == []
    assert broker.dead_letters(TOPIC, GROUP) == []


def test_the_count_outlives_the_consumer(engine: Engine) -> None:
    """Two failures, a crash (the delivery comes back unacknowledged, attempt 1 again
    as far as the broker knows), one more failure: that is the third, so dead."""
    broker = InMemoryBroker()
    publish(broker, "m-1")
    inner = broker.subscriber(TOPIC, GROUP, visibility_timeout=0.2)
    stop = threading.Event()
    handler = Flaky({"m-1": float("inf")})

    def fail_twice_then_stop(session: Any, message: Any) -> None:
        if len(handler.calls) == 1:
            stop.set()  # the crash: the consumer stops while it holds the delivery
        handler(session, message)

    first = IdempotentConsumer(engine, MinimalSubscriber(inner), GROUP, fail_twice_then_stop,
                               config=CONFIG)
    first._running_stop = stop
    [delivery] = MinimalSubscriber(inner).fetch(1, 1.0)
    assert first.handle(delivery) is Outcome.RETRIED
    assert attempts_rows(engine) == [("m-1", 2)]
    assert consumer_dead_letters_of(engine) == []

    second = IdempotentConsumer(engine, MinimalSubscriber(inner), GROUP, handler, config=CONFIG)
    second.run_once(2.0)  # the delivery is back after the visibility timeout
    assert len(handler.calls) == 3
    [dead] = consumer_dead_letters_of(engine)
    assert (dead.message_id, dead.attempts) == ("m-1", 3)


def test_a_rejected_or_undecodable_message_is_dead_at_once(engine: Engine) -> None:
    broker = InMemoryBroker()

    def reject(session: Any, message: Any) -> None:
        raise Reject("account 9 is closed")

    publish(broker, "m-1")
    broker.put_raw(Delivery(topic=TOPIC, payload=b"\xff not json", message_id=None, attempt=1))
    consumer = IdempotentConsumer(engine, MinimalSubscriber(broker.subscriber(TOPIC, GROUP)),
                                  GROUP, reject, config=CONFIG)
    consumer.run_once(1.0)
    dead = {d.message_id: d for d in consumer_dead_letters_of(engine)}
    assert set(dead) == {"m-1", None}
    assert dead["m-1"].reason == "rejected by handler: account 9 is closed"
    assert dead[None].reason.startswith("undecodable message")
    assert dead[None].payload == b"\xff not json"
    assert attempts_rows(engine) == []


def test_a_redelivery_of_a_dead_message_adds_no_second_row(engine: Engine) -> None:
    broker = InMemoryBroker()
    publish(broker, "m-1")
    handler = Flaky({"m-1": float("inf")})
    sub = MinimalSubscriber(broker.subscriber(TOPIC, GROUP))
    consumer = IdempotentConsumer(engine, sub, GROUP, handler, config=CONFIG)
    consumer.run_once(1.0)
    broker.deliver_again("m-1")  # as after a crash before the acknowledgement
    consumer.run_once(1.0)
    assert [d.message_id for d in consumer_dead_letters_of(engine)] == ["m-1"]


def test_the_broker_dead_letter_destination_is_used_when_there_is_one(engine: Engine) -> None:
    broker = InMemoryBroker()
    publish(broker, "m-1")
    sub = MinimalSubscriberWithDeadLetters(broker.subscriber(TOPIC, GROUP))
    IdempotentConsumer(engine, sub, GROUP, Flaky({"m-1": float("inf")}),
                       config=CONFIG).run_once(1.0)
    [(delivery, reason)] = broker.dead_letters(TOPIC, GROUP)
    assert delivery.message_id == "m-1" and reason and reason.startswith("handler failed 3")
    assert consumer_dead_letters_of(engine) == []
    assert attempts_rows(engine) == []  # counted, then settled by the dead letter


def test_a_stop_during_the_hold_leaves_the_delivery_unacknowledged(engine: Engine) -> None:
    broker = InMemoryBroker()
    publish(broker, "m-1")
    inner = broker.subscriber(TOPIC, GROUP, visibility_timeout=0.3)
    slow = ConsumerConfig(max_attempts=3, backoff=lambda state: 30.0, wait_seconds=0.2)
    consumer = IdempotentConsumer(engine, MinimalSubscriber(inner), GROUP,
                                  Flaky({"m-1": float("inf")}), config=slow)
    threading.Timer(0.3, consumer.stop).start()
    stats = consumer.run_once(1.0)
    assert (stats.processed, stats.retried, stats.dead_lettered) == (0, 1, 0)
    assert consumer_dead_letters_of(engine) == []
    [again] = inner.fetch(1, 2.0)  # never acknowledged: back after the visibility timeout
    assert again.message_id == "m-1"


def test_missing_consumer_tables_stop_the_consumer_and_say_what_to_do(engine: Engine) -> None:
    broker = InMemoryBroker()
    publish(broker, "m-1")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE outbox_consumer_attempts"))
    consumer = IdempotentConsumer(engine, MinimalSubscriber(broker.subscriber(TOPIC, GROUP)),
                                  GROUP, Flaky({"m-1": 5}), config=CONFIG)
    with pytest.raises(MissingTableError, match=r"outbox_consumer_attempts is missing.*"
                                                r"outbox migrate"):
        consumer.run_once(1.0)
    assert processed(engine) == set()


def test_async_consumer_holds_counts_and_dead_letters(engine: Engine,
                                                      async_engine: AsyncEngine) -> None:
    broker = InMemoryBroker()
    publish(broker, "flaky", "poison", "fine")
    handler = Flaky({"flaky": 1, "poison": float("inf")})

    async def handle(session: Any, message: Any) -> None:
        handler.note(message)

    async def main() -> None:
        sub = AsyncMinimalSubscriber(broker.async_subscriber(TOPIC, GROUP))
        consumer = AsyncIdempotentConsumer(async_engine, sub, GROUP, handle, config=CONFIG)
        stats = await consumer.run_once(1.0)
        assert (stats.processed, stats.dead_lettered) == (2, 1)

    asyncio.run(main())
    assert [i for i, _ in handler.calls] == ["flaky"] * 2 + ["poison"] * 3 + ["fine"]
    assert processed(engine) == {"flaky", "fine"}
    [dead] = consumer_dead_letters_of(engine)
    assert (dead.message_id, dead.attempts) == ("poison", 3)
    assert attempts_rows(engine) == []
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(consumer_attempts)) == 0


def test_a_wrapper_passes_on_only_the_abilities_the_inner_subscriber_has() -> None:
    broker = InMemoryBroker()
    full = SubscriberWrapper(broker.subscriber(TOPIC, GROUP))
    bare = SubscriberWrapper(MinimalSubscriber(broker.subscriber(TOPIC, GROUP)))
    assert Abilities.of(full) == Abilities(True, True, True)
    assert Abilities.of(bare) == Abilities(False, False, False)
    assert Abilities.of(AsyncSubscriberWrapper(broker.async_subscriber(TOPIC, GROUP))) == \
        Abilities(True, True, True)
    assert Abilities.of(AsyncSubscriberWrapper(AsyncMinimalSubscriber(
        broker.async_subscriber(TOPIC, GROUP)))) == Abilities(False, False, False)
    with pytest.raises(AttributeError):
        bare.retry  # noqa: B018
