"""Redis Streams beyond the contract: the entry format other tools see, hostile
entries, trimming, an unreachable server, and the idempotent consumer over it (which
holds a failed delivery in place, since Redis has no per-message delay)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import ConsumerConfig, IdempotentConsumer, Message
from outbox.aio import AsyncIdempotentConsumer
from outbox.brokers import open_broker
from outbox.errors import BrokerUnavailableError, PublishError
from outbox.schema import inbox
from outbox.testing import broken_message
from outbox.typing import Abilities
from outbox_redis import RedisBroker

from .broker_support import Flaky, publish_three

pytestmark = pytest.mark.redis
CONFIG = ConsumerConfig(max_attempts=3, backoff=lambda state: 0.02, wait_seconds=0.3)


@pytest.fixture
def broker(redis_url: str) -> Iterator[RedisBroker]:
    prefix = f"outbox-test-{uuid.uuid4().hex[:10]}:"
    opened = open_broker(redis_url, prefix=prefix)
    assert isinstance(opened, RedisBroker)
    yield opened
    keys = list(opened.client.scan_iter(match=f"{prefix}*"))
    if keys:
        opened.client.delete(*keys)
    opened.close()


def test_an_entry_is_readable_by_other_tools(broker: RedisBroker) -> None:
    broker.publisher().publish(Message(id="m-1", topic="t", key="k", tag="debit",
                                       headers={"traceparent": "00-ab-cd-01", "ü": "✓"},
                                       payload=b"\x00body"))
    [(_, fields)] = broker.client.xrange(f"{broker.options.prefix}t")
    assert fields == {b"id": b"m-1", b"key": b"k", b"tag": b"debit", b"payload": b"\x00body",
                      b"h:traceparent": b"00-ab-cd-01", "h:ü".encode(): "✓".encode()}


def test_a_hostile_entry_becomes_a_delivery_with_none_fields(broker: RedisBroker) -> None:
    sub = broker.subscriber("t", "g")
    sub.fetch(1, 0)  # the group exists from here on
    broker.client.xadd(f"{broker.options.prefix}t", {b"id": b"\xff\xfe", b"h:\xff": b"x",
                                                      b"other": b"y"})
    [d] = sub.fetch(10, 2.0)
    assert (d.message_id, d.key, d.tag, dict(d.headers), d.payload) == (None, None, None, {}, b"")


def test_maxlen_trims_the_stream(redis_url: str) -> None:
    prefix = f"outbox-test-{uuid.uuid4().hex[:10]}:"
    trimmed = RedisBroker(redis_url, prefix=prefix, maxlen=10)
    try:
        trimmed.publisher().publish_batch(
            [Message(id=f"m-{i}", topic="t", payload=b"") for i in range(500)])
        # Approximate trimming keeps whole macro nodes: about 10, never all 500.
        assert trimmed.client.xlen(f"{prefix}t") < 500
    finally:
        trimmed.client.delete(f"{prefix}t")
        trimmed.close()


def test_an_invalid_message_fails_the_batch_before_anything_is_sent(broker: RedisBroker) -> None:
    broken = broken_message()
    with pytest.raises(PublishError, match="cannot be written to a Redis stream"):
        broker.publisher().publish_batch([Message(id="ok", topic="t", payload=b""), broken])
    assert broker.client.xlen(f"{broker.options.prefix}t") == 0


def test_an_unreachable_server_says_what_to_do_without_the_password() -> None:
    down = RedisBroker("redis://:S3cretPw@127.0.0.1:1/0", socket_connect_timeout=1.0)
    with pytest.raises(BrokerUnavailableError) as info:
        down.publisher().publish(Message(id="m", topic="t", payload=b""))
    text = str(info.value)
    assert "S3cretPw" not in text and "redis://:***@127.0.0.1:1/0" in text
    assert "scripts/services up redis" in text


def test_abilities(broker: RedisBroker) -> None:
    assert Abilities.of(broker.subscriber("t", "g")) == Abilities(
        redelivery=False, dead_letter=True, counts_deliveries=True)


def check_outcome(engine: Engine, broker: RedisBroker, handler: Flaky) -> None:
    assert handler.calls == ["flaky"] * 2 + ["poison"] * 3 + ["fine"]
    with engine.connect() as conn:
        assert set(conn.scalars(select(inbox.c.message_id))) == {"flaky", "fine"}
    [dead] = broker.dead_letters("transfers", "bank2")
    assert dead[b"id"] == b"poison"
    assert dead[b"dead-reason"].startswith(b"handler failed 3 times: RuntimeError")


def test_the_idempotent_consumer_holds_retries_and_dead_letters(
        engine: Engine, broker: RedisBroker) -> None:
    publish_three(broker)
    handler = Flaky({"flaky": 1, "poison": float("inf")})
    consumer = IdempotentConsumer(engine, broker.subscriber("transfers", "bank2"), "bank2",
                                  lambda session, message: handler.note(message), config=CONFIG)
    for _ in range(20):
        consumer.run_once()
        if consumer.stats.processed + consumer.stats.duplicates >= 3:
            break
    check_outcome(engine, broker, handler)
    assert consumer.stats.duplicates == 1
    # Everything was acknowledged: the group's pending list is empty.
    assert broker.client.xpending(f"{broker.options.prefix}transfers", "bank2")["pending"] == 0


def test_the_async_consumer_does_the_same(engine: Engine, async_engine: AsyncEngine,
                                          broker: RedisBroker) -> None:
    publish_three(broker)
    handler = Flaky({"flaky": 1, "poison": float("inf")})

    async def handle(session: Any, message: Any) -> None:
        handler.note(message)

    async def main() -> None:
        consumer = AsyncIdempotentConsumer(
            async_engine, broker.async_subscriber("transfers", "bank2"), "bank2", handle,
            config=CONFIG)
        for _ in range(20):
            await consumer.run_once()
            if consumer.stats.processed + consumer.stats.duplicates >= 3:
                break
        await broker.aclose()

    asyncio.run(main())
    check_outcome(engine, RedisBroker(broker.options.url, prefix=broker.options.prefix),
                  handler)
