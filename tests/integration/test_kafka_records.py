"""Kafka beyond the contract: the record format other tools see, key to partition,
hostile records, an unreachable broker, and the idempotent consumer over it (which
holds a failed record in place, then dead-letters it so the partition moves on)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import ConsumerConfig, IdempotentConsumer, Message
from outbox.aio import AsyncIdempotentConsumer
from outbox.brokers import open_broker
from outbox.errors import BrokerUnavailableError, PublishError
from outbox.schema import inbox
from outbox.testing import broken_message
from outbox.typing import Abilities
from outbox_kafka import KafkaBroker

from .broker_support import Flaky, publish_three

pytestmark = pytest.mark.kafka
CONFIG = ConsumerConfig(max_attempts=3, backoff=lambda state: 0.02, wait_seconds=0.5)


@pytest.fixture
def broker(kafka_url: str) -> Iterator[KafkaBroker]:
    prefix = f"outbox-test-{uuid.uuid4().hex[:10]}."
    opened = open_broker(kafka_url, prefix=prefix)
    assert isinstance(opened, KafkaBroker)
    yield opened
    admin = opened.options.admin()
    names = [n for n in admin.list_topics(timeout=10).topics if n.startswith(prefix)]
    if names:
        for future in admin.delete_topics(names, operation_timeout=10).values():
            future.result(timeout=30)
    opened.close()


def read_raw(broker: KafkaBroker, topic: str, expected: int) -> list[Any]:
    """The topic's records as a plain confluent-kafka consumer sees them."""
    reader = Consumer({**broker.options.base, "group.id": f"raw-{uuid.uuid4().hex}",
                       "auto.offset.reset": "earliest"})
    reader.subscribe([broker.options.prefix + topic])
    got: list[Any] = []
    deadline = time.monotonic() + 20
    try:
        while len(got) < expected and time.monotonic() < deadline:
            got.extend(r for r in reader.consume(10, 0.5) if r.error() is None)
    finally:
        reader.close()
    return got


def test_a_record_is_readable_by_other_tools(broker: KafkaBroker) -> None:
    broker.publisher().publish(Message(id="m-1", topic="t", key="k", tag="debit",
                                       headers={"traceparent": "00-ab-cd-01", "ü": "✓"},
                                       payload=b"\x00body"))
    [record] = read_raw(broker, "t", 1)
    assert (record.key(), record.value()) == (b"k", b"\x00body")
    assert record.headers() == [("outbox-id", b"m-1"), ("outbox-tag", b"debit"),
                                ("traceparent", b"00-ab-cd-01"), ("ü", "✓".encode())]


def test_one_key_goes_to_one_partition(broker: KafkaBroker) -> None:
    broker.publisher().publish_batch(
        [Message(id=f"m-{i}", topic="t", key=f"k-{i % 3}", payload=b"") for i in range(30)])
    records = read_raw(broker, "t", 30)
    partitions: dict[bytes, set[int]] = {}
    for r in records:
        partitions.setdefault(r.key(), set()).add(r.partition())
    assert sorted(partitions) == [b"k-0", b"k-1", b"k-2"]
    assert all(len(p) == 1 for p in partitions.values())


def test_a_hostile_record_becomes_a_delivery_with_none_fields(broker: KafkaBroker) -> None:
    sub = broker.subscriber("t", "g")
    raw = Producer(broker.options.base)
    raw.produce(broker.options.prefix + "t", value=None, key=b"\xff",
                headers=[("outbox-id", b"\xff\xfe"), ("\xff", b"x")])
    raw.flush(10)
    deadline = time.monotonic() + 20
    got: list[Any] = []
    while not got and time.monotonic() < deadline:
        got.extend(sub.fetch(10, 1.0))
    [d] = got
    assert (d.message_id, d.key, d.tag, d.payload) == (None, None, None, b"")
    sub.close()


def test_an_invalid_message_fails_the_batch_before_anything_is_sent(broker: KafkaBroker) -> None:
    broken = broken_message()
    with pytest.raises(PublishError, match="cannot be written to Kafka"):
        broker.publisher().publish_batch([Message(id="ok", topic="t", payload=b""), broken])
    with pytest.raises(PublishError, match="the adapter's own"):
        broker.publisher().publish(Message(id="h", topic="t", payload=b"",
                                           headers={"outbox-id": "forged"}))


def test_a_topic_name_kafka_refuses_is_refused_with_what_to_do(broker: KafkaBroker) -> None:
    from outbox.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="letters, digits"):
        broker.publisher().publish(Message(id="m", topic="bad topic", payload=b""))


def test_an_unreachable_broker_says_what_to_do_without_the_password() -> None:
    down = KafkaBroker("kafka://app:S3cretPw@127.0.0.1:1", timeout=2.0)
    with pytest.raises(BrokerUnavailableError) as info:
        down.publisher().publish(Message(id="m", topic="t", payload=b""))
    text = str(info.value)
    assert "S3cretPw" not in text and "kafka://app:***@127.0.0.1:1" in text
    assert "scripts/kafka up" in text


def test_abilities(broker: KafkaBroker) -> None:
    sub = broker.subscriber("t", "g")
    assert Abilities.of(sub) == Abilities(redelivery=False, dead_letter=True,
                                          counts_deliveries=False)
    sub.close()


def check_outcome(engine: Engine, broker: KafkaBroker, handler: Flaky) -> None:
    # The key's order holds through the retries: poison waits for flaky, fine for poison.
    assert handler.calls == ["flaky"] * 2 + ["poison"] * 3 + ["fine"]
    with engine.connect() as conn:
        assert set(conn.scalars(select(inbox.c.message_id))) == {"flaky", "fine"}
    [dead] = broker.dead_letters("transfers", "bank2")
    assert dead.message_id == "poison"
    assert dead.headers["outbox-dead-reason"].startswith("handler failed 3 times: RuntimeError")


def assert_all_committed(broker: KafkaBroker) -> None:
    """A new member of the group finds nothing left: every offset was committed."""
    again = broker.subscriber("transfers", "bank2")
    try:
        assert again.fetch(10, 5.0) == []
    finally:
        again.close()


def run_until(consumer: Any, done: int) -> None:
    deadline = time.monotonic() + 60
    while consumer.stats.processed + consumer.stats.duplicates < done:
        assert time.monotonic() < deadline, consumer.stats
        consumer.run_once()


def test_the_idempotent_consumer_holds_retries_and_dead_letters(
        engine: Engine, broker: KafkaBroker) -> None:
    publish_three(broker)
    handler = Flaky({"flaky": 1, "poison": float("inf")})
    sub = broker.subscriber("transfers", "bank2")
    consumer = IdempotentConsumer(engine, sub, "bank2",
                                  lambda session, message: handler.note(message), config=CONFIG)
    run_until(consumer, 3)
    sub.close()
    check_outcome(engine, broker, handler)
    assert consumer.stats.duplicates == 1
    assert_all_committed(broker)


def test_the_async_consumer_does_the_same(engine: Engine, async_engine: AsyncEngine,
                                          broker: KafkaBroker) -> None:
    publish_three(broker)
    handler = Flaky({"flaky": 1, "poison": float("inf")})

    async def handle(session: Any, message: Any) -> None:
        handler.note(message)

    async def main() -> None:
        sub = broker.async_subscriber("transfers", "bank2")
        consumer = AsyncIdempotentConsumer(async_engine, sub, "bank2", handle, config=CONFIG)
        deadline = time.monotonic() + 60
        while consumer.stats.processed + consumer.stats.duplicates < 3:
            assert time.monotonic() < deadline, consumer.stats
            await consumer.run_once()
        await sub.close()

    asyncio.run(main())
    check_outcome(engine, broker, handler)
    assert_all_committed(broker)
