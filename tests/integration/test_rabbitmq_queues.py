"""RabbitMQ beyond the contract, as other AMQP clients see it: quorum queues, confirms,
the message format, delayed retries that come back to their own group only, dead
letters, stale handles and lost connections, an unreachable server, and the
idempotent consumer over it all (which retries through the broker)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import ConsumerConfig, IdempotentConsumer, Message
from outbox.aio import AsyncIdempotentConsumer
from outbox.brokers import open_broker
from outbox.errors import BrokerUnavailableError, ConfigurationError, PublishError
from outbox.schema import inbox
from outbox.typing import Abilities
from outbox_rabbitmq import RabbitMQBroker

from . import broker_support
from .broker_support import Flaky

pytestmark = pytest.mark.rabbitmq
CONFIG = ConsumerConfig(max_attempts=3, backoff=lambda state: 0.02, wait_seconds=0.3)


class Plain:
    """A plain pika client, to look at what the adapter made as any AMQP client would."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))

    def channel(self) -> Any:
        return self.connection.channel()

    def count(self, queue: str) -> int:
        """Messages ready in ``queue`` (passive declare: fails if there is none)."""
        channel = self.channel()
        try:
            return int(channel.queue_declare(queue, passive=True).method.message_count)
        finally:
            channel.close()

    def peek(self, queue: str, timeout: float = 5.0) -> tuple[Any, Any, bytes]:
        """The first message of ``queue``, left there."""
        channel = self.channel()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                method, properties, body = channel.basic_get(queue, auto_ack=False)
                if method is not None:
                    channel.basic_nack(method.delivery_tag, requeue=True)
                    return method, properties, body
                time.sleep(0.05)
            raise AssertionError(f"nothing in {queue} within {timeout}s")
        finally:
            channel.close()

    def refused(self, queue: str, **declare: Any) -> str:
        """The error text of declaring ``queue`` again with other settings."""
        channel = self.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            channel.queue_declare(queue, **declare)
        assert info.value.reply_code == 406
        return str(info.value.reply_text)

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def broker(rabbitmq_url: str) -> Iterator[RabbitMQBroker]:
    opened = open_broker(rabbitmq_url, prefix=f"outbox-test-{uuid.uuid4().hex[:10]}")
    assert isinstance(opened, RabbitMQBroker)
    yield opened
    opened.close()
    opened.delete_declared()
    opened.close()


@pytest.fixture
def plain(rabbitmq_url: str) -> Iterator[Plain]:
    client = Plain(rabbitmq_url)
    yield client
    client.close()


def q(broker: RabbitMQBroker, topic: str = "t", group: str = "g") -> str:
    return f"{broker.options.prefix}.{topic}.{group}"


def fetch_one(sub: Any, wait: float = 3.0) -> Any:
    got = sub.fetch(10, wait)
    assert len(got) == 1, [d.message_id for d in got]
    return got[0]


def cut(connection: Any) -> None:
    """Break a pika connection's socket under it, as a network fault would."""
    connection._impl._transport._sock.shutdown(socket.SHUT_RDWR)


def test_the_groups_queues_are_durable_quorum_queues(broker: RabbitMQBroker,
                                                      plain: Plain) -> None:
    sub = broker.subscriber("t", "g")
    dead = q(broker) + ".dead"
    group_arguments = {"x-dead-letter-exchange": f"{broker.options.prefix}.dead",
                       "x-dead-letter-routing-key": dead}
    for queue, arguments in ((q(broker), group_arguments), (dead, {})):
        assert plain.count(queue) == 0
        text = plain.refused(queue, durable=True,
                             arguments={**arguments, "x-queue-type": "classic"})
        assert "'x-queue-type'" in text and "current is 'quorum'" in text
        assert "'durable'" in plain.refused(queue, durable=False,
                                            arguments={**arguments, "x-queue-type": "quorum"})
    broker.publisher().publish(Message(id="m", topic="t", payload=b""))
    sub.retry(fetch_one(sub), 5.0, "later")
    # A retry bucket is a classic queue (a queue-wide TTL, so its copies leave in order).
    text = plain.refused(q(broker) + ".retry.5000ms", durable=True, arguments={
        "x-queue-type": "quorum", "x-message-ttl": 5000, "x-expires": 65_000,
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q(broker)})
    assert "current is 'classic'" in text


def test_a_confirmed_batch_is_in_the_queue_when_publish_returns(
        broker: RabbitMQBroker, plain: Plain) -> None:
    broker.declare_group("t", "g")
    broker.publisher().publish_batch(
        [Message(id=f"m-{i}", topic="t", payload=b"x" * 100) for i in range(300)])
    assert plain.count(q(broker)) == 300


def test_a_message_is_readable_by_a_plain_amqp_client(broker: RabbitMQBroker,
                                                      plain: Plain) -> None:
    broker.declare_group("accounts", "g")
    broker.publisher().publish(Message(
        id="m-1", topic="accounts", key="acct-1", tag="debit", payload=b"\x00body",
        headers={"traceparent": "00-ab-cd-01", "ü": "✓", "content-type": "application/json"}))
    method, properties, body = plain.peek(q(broker, "accounts"))
    assert (method.exchange, method.routing_key) == (broker.options.prefix, "accounts")
    assert (properties.message_id, properties.delivery_mode, properties.content_type, body) == (
        "m-1", 2, "application/json", b"\x00body")
    # basic.get on a quorum queue adds x-delivery-count 0; the rest is the message's.
    assert properties.headers == {"traceparent": "00-ab-cd-01", "ü": "✓",
                                  "content-type": "application/json",
                                  "x-outbox-key": "acct-1", "x-outbox-tag": "debit",
                                  "x-delivery-count": 0}


@pytest.mark.parametrize("form", ["sync", "async"])
def test_a_hostile_message_becomes_a_delivery_with_none_fields_and_can_be_parked(
        broker: RabbitMQBroker, plain: Plain, form: str) -> None:
    hostile = pika.BasicProperties(headers={"x-outbox-key": b"\xff", "n": 5, "ok": "fine",
                                            "x-outbox-attempt": "many"})

    def publish() -> None:
        plain.channel().basic_publish(broker.options.prefix, "t", b"", hostile)

    if form == "sync":
        sub = broker.subscriber("t", "g")
        publish()
        d = fetch_one(sub)
        sub.dead_letter(d, "delivery has no message id")
    else:
        async def main() -> Any:
            sub = broker.async_subscriber("t", "g")
            publish()
            [d] = await sub.fetch(10, 3.0)
            await sub.dead_letter(d, "delivery has no message id")
            await sub.close()
            return d

        d = asyncio.run(main())
    assert (d.message_id, d.key, d.tag, dict(d.headers), d.payload, d.attempt) == (
        None, None, None, {"ok": "fine"}, b"", 1)
    [dead] = broker.dead_letters("t", "g")
    assert (dead.message_id, dead.reason, dead.group) == (
        None, "delivery has no message id", "g")


def test_a_topic_without_groups_is_refused_not_dropped(rabbitmq_url: str,
                                                       broker: RabbitMQBroker,
                                                       plain: Plain) -> None:
    message = Message(id="m-1", topic="nobody", payload=b"")
    with pytest.raises(PublishError, match="no queue bound for topic 'nobody'") as info:
        broker.publisher().publish(message)
    assert "declare_group" in str(info.value)

    async def publish_async() -> None:
        pub = broker.async_publisher()
        try:
            await pub.publish(message)
        finally:
            await pub.close()

    with pytest.raises(PublishError, match="no queue bound for topic 'nobody'"):
        asyncio.run(publish_async())
    broker.declare_group("nobody", "g")  # what the relay's resend finds, later
    broker.publisher().publish(message)
    assert plain.count(q(broker, "nobody", "g")) == 1
    dropping = RabbitMQBroker(rabbitmq_url, prefix=broker.options.prefix, unroutable="drop")
    try:
        dropping.publisher().publish(Message(id="m-2", topic="nobody-else", payload=b""))
    finally:
        dropping.close()


@pytest.mark.parametrize("form", ["sync", "async"])
def test_a_retry_waits_its_delay_and_comes_back_to_its_own_group_only(
        broker: RabbitMQBroker, plain: Plain, form: str) -> None:
    loop = asyncio.new_event_loop()

    def wrap(sub: Any) -> Any:
        if form == "sync":
            return sub

        class Sync:
            def __getattr__(self, name: str) -> Any:
                method = getattr(sub, name)
                return lambda *args: loop.run_until_complete(method(*args))

        return Sync()

    make = broker.subscriber if form == "sync" else broker.async_subscriber
    try:
        sub, other = wrap(make("t", "g")), wrap(make("t", "other"))
        broker.publisher().publish(Message(id="m-1", topic="t", headers={"h": "v"},
                                           payload=b"p"))
        other.ack(fetch_one(other))
        sub.retry(fetch_one(sub), 1.0, "handler failed: boom")
        retried = time.monotonic()
        assert plain.count(q(broker) + ".retry.1000ms") == 1
        assert plain.count(q(broker)) == 0
        assert sub.fetch(10, 0.6) == []
        again = fetch_one(sub, 3.0)
        assert time.monotonic() - retried >= 0.95
        assert (again.message_id, again.payload, dict(again.headers), again.attempt) == (
            "m-1", b"p", {"h": "v"}, 2)
        sub.ack(again)
        assert other.fetch(10, 0.5) == []  # the other group had it once, and only once
        sub.close()
        other.close()
    finally:
        loop.close()


def test_the_attempt_counts_retries_and_redeliveries_together(broker: RabbitMQBroker) -> None:
    sub = broker.subscriber("t", "g")
    broker.publisher().publish(Message(id="m-1", topic="t", payload=b""))
    first = fetch_one(sub)
    assert first.attempt == 1
    sub.retry(first, 0, "again")
    second = fetch_one(sub)
    assert second.attempt == 2
    sub.close()  # never acknowledged: RabbitMQ gives it back, and counts it
    third = fetch_one(broker.subscriber("t", "g"))
    assert third.attempt == 3


def test_an_unacknowledged_delivery_waits_for_its_channel_not_a_timeout(
        broker: RabbitMQBroker) -> None:
    sub = broker.subscriber("t", "g", visibility_timeout=0.2)
    other = broker.subscriber("t", "g")
    broker.publisher().publish(Message(id="m-1", topic="t", payload=b""))
    fetch_one(sub)
    time.sleep(0.4)
    assert other.fetch(10, 0.3) == [] and sub.fetch(10, 0.1) == []
    sub.close()
    assert fetch_one(other).attempt == 2


def test_a_dead_letter_lands_in_the_groups_dead_queue_with_the_reason(
        broker: RabbitMQBroker, plain: Plain) -> None:
    sub = broker.subscriber("t", "g")
    broker.publisher().publish(Message(id="bad", topic="t", key="k", payload=b"p"))
    reason = "handler failed 3 times: RuntimeError: " + "x" * 1500
    sub.dead_letter(fetch_one(sub), reason)
    _, properties, body = plain.peek(q(broker) + ".dead")
    assert (properties.message_id, body) == ("bad", b"p")
    assert properties.headers["x-outbox-dead-reason"] == reason
    assert properties.headers["x-outbox-dead-group"] == "g"
    assert properties.headers["x-outbox-key"] == "k"
    listed = broker.dead_letters("t", "g")
    assert [(d.message_id, d.reason, d.group, d.key) for d in listed] == [
        ("bad", reason, "g", "k")]
    assert broker.dead_letters("t", "g") == listed  # listing leaves them in place
    assert plain.count(q(broker)) == 0 and sub.fetch(10, 0.3) == []
    assert broker.dead_letters("t", "never-declared") == []


def test_a_stale_handle_settles_nothing_else(broker: RabbitMQBroker) -> None:
    sub = broker.subscriber("t", "g")
    broker.publisher().publish(Message(id="m-1", topic="t", payload=b""))
    old = fetch_one(sub)
    sub.close()  # the delivery goes back; its handle is dead
    new = fetch_one(sub)  # the same subscriber, on a new channel
    assert new.handle.tag == old.handle.tag  # the same delivery tag, on another channel
    sub.ack(old)
    sub.retry(old, 0, "stale")
    sub.dead_letter(old, "stale")
    assert broker.dead_letters("t", "g") == []
    sub.close()
    # None of it touched the new delivery: it comes back once more.
    assert fetch_one(broker.subscriber("t", "g")).attempt == 3


def test_a_lost_connection_is_opened_again(broker: RabbitMQBroker) -> None:
    sub = broker.subscriber("t", "g")
    pub = broker.publisher()
    pub.publish(Message(id="m-1", topic="t", payload=b""))
    held = fetch_one(sub)
    for client in (sub, pub):
        link = client._link
        assert link is not None
        cut(link.connection)
    pub.publish(Message(id="m-2", topic="t", payload=b""))  # opened again, at once
    got = {d.message_id: d for d in sub.fetch(10, 3.0)}
    while len(got) < 2:
        got.update({d.message_id: d for d in sub.fetch(10, 3.0)})
    assert got["m-1"].attempt == 2  # the lost channel's delivery came back
    sub.ack(held)  # dead handle: nothing
    for d in got.values():
        sub.ack(d)
    sub.close()
    assert broker.subscriber("t", "g").fetch(10, 0.5) == []


def test_a_deleted_queue_is_declared_again(broker: RabbitMQBroker, plain: Plain) -> None:
    sub = broker.subscriber("t", "g")
    assert sub.fetch(10, 0) == []  # consuming
    plain.channel().queue_delete(q(broker))
    assert sub.fetch(10, 0.3) == []  # the consumer was cancelled: the queue comes back
    broker.publisher().publish(Message(id="m-1", topic="t", payload=b""))
    assert fetch_one(sub).message_id == "m-1"


def test_an_unreachable_server_says_what_to_do_without_the_password(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    down = RabbitMQBroker("amqp://outbox:S3cretPw@127.0.0.1:1/%2F", connect_timeout=1.0)
    message = Message(id="m", topic="t", payload=b"")
    errors = []
    for attempt in (lambda: down.publisher().publish(message),
                    lambda: down.subscriber("t", "g"),
                    lambda: asyncio.run(down.async_publisher().publish(message))):
        with pytest.raises(BrokerUnavailableError) as info:
            attempt()
        errors.append(str(info.value))
    for text in errors:
        assert "S3cretPw" not in text and "amqp://outbox:***@127.0.0.1:1/%2F" in text
        assert "scripts/rabbitmq up" in text
    assert "S3cretPw" not in caplog.text


def test_a_wrong_password_is_refused_without_showing_it(rabbitmq_url: str) -> None:
    wrong = rabbitmq_url.replace("outbox:outbox@", "outbox:Wr0ngPw@")
    with pytest.raises(BrokerUnavailableError, match="refused the login") as info:
        RabbitMQBroker(wrong).publisher().publish(Message(id="m", topic="t", payload=b""))
    assert "Wr0ngPw" not in str(info.value) and "outbox:***@" in str(info.value)


def test_bad_settings_are_refused(rabbitmq_url: str, broker: RabbitMQBroker) -> None:
    for options in ({"colour": "red"}, {"unroutable": "ignore"}, {"prefix": "amq.x"},
                    {"prefetch": 0}, {"confirm_timeout": 0}):
        with pytest.raises(ConfigurationError):
            RabbitMQBroker(rabbitmq_url, **options)
    with pytest.raises(ConfigurationError, match="amqp://"):
        RabbitMQBroker("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match="wildcards"):
        broker.subscriber("orders.#", "g")
    with pytest.raises(ConfigurationError, match="too long"):
        broker.subscriber("t" * 200, "g" * 40)
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        broker.subscriber("t", "g", visibility_timeout=0)


def test_a_queue_of_the_same_name_with_other_settings_is_explained(
        broker: RabbitMQBroker, plain: Plain) -> None:
    plain.channel().queue_declare(q(broker), durable=True)  # a classic queue
    broker.options.note("queue", q(broker))
    with pytest.raises(ConfigurationError, match="exists with other settings"):
        broker.subscriber("t", "g")


def test_abilities(broker: RabbitMQBroker) -> None:
    everything = Abilities(redelivery=True, dead_letter=True, counts_deliveries=True)
    assert Abilities.of(broker.subscriber("t", "g")) == everything
    assert Abilities.of(broker.async_subscriber("t", "g")) == everything


def publish_three(broker: RabbitMQBroker) -> None:
    broker.declare_group("transfers", "bank2")  # before the relay publishes
    broker_support.publish_three(broker)


def done(stats: Any) -> bool:
    return bool(stats.processed + stats.duplicates >= 3 and stats.dead_lettered >= 1)


def check_outcome(engine: Engine, broker: RabbitMQBroker, handler: Flaky, plain: Plain) -> None:
    # Retried through the broker, so other messages went on meanwhile: count, not order.
    assert sorted(handler.calls) == sorted(["flaky"] * 2 + ["poison"] * 3 + ["fine"])
    assert handler.calls[0] == "flaky"
    with engine.connect() as conn:
        assert set(conn.scalars(select(inbox.c.message_id))) == {"flaky", "fine"}
    [dead] = broker.dead_letters("transfers", "bank2")
    assert dead.message_id == "poison" and dead.attempt == 3
    assert (dead.reason or "").startswith("handler failed 3 times: RuntimeError")
    broker.close()  # whatever was still unacknowledged would be back in the queue now
    assert plain.count(q(broker, "transfers", "bank2")) == 0


def test_the_idempotent_consumer_retries_through_the_broker_and_dead_letters(
        engine: Engine, broker: RabbitMQBroker, plain: Plain) -> None:
    publish_three(broker)
    handler = Flaky({"flaky": 1, "poison": float("inf")})
    consumer = IdempotentConsumer(engine, broker.subscriber("transfers", "bank2"), "bank2",
                                  lambda session, message: handler.note(message), config=CONFIG)
    for _ in range(40):
        consumer.run_once()
        if done(consumer.stats):
            break
    assert consumer.stats.duplicates == 1 and consumer.stats.retried == 3
    check_outcome(engine, broker, handler, plain)


def test_the_async_consumer_does_the_same(engine: Engine, async_engine: AsyncEngine,
                                          broker: RabbitMQBroker, plain: Plain) -> None:
    publish_three(broker)
    handler = Flaky({"flaky": 1, "poison": float("inf")})

    async def handle(session: Any, message: Any) -> None:
        handler.note(message)

    async def main() -> None:
        consumer = AsyncIdempotentConsumer(
            async_engine, broker.async_subscriber("transfers", "bank2"), "bank2", handle,
            config=CONFIG)
        for _ in range(40):
            await consumer.run_once()
            if done(consumer.stats):
                break
        await broker.aclose()

    asyncio.run(main())
    check_outcome(engine, broker, handler, plain)
