"""NATS JetStream beyond the contract: the message format other tools see, the
de-duplication window, NAK delays and delivery counts, dead letters, hostile
messages, refused topics, an unreachable server, and the idempotent consumer over
it (which retries through NAK delays and dead-letters into the broker)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.js import api
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncEngine

import outbox_nats.broker
from outbox import ConsumerConfig, IdempotentConsumer, JsonCodec, Message
from outbox.aio import AsyncIdempotentConsumer
from outbox.brokers import open_broker
from outbox.errors import BrokerUnavailableError, ConfigurationError, PublishError
from outbox.schema import inbox
from outbox.typing import Abilities
from outbox_nats import DeadLetter, NatsBroker
from outbox_nats.mapping import stream_name

from .broker_support import Flaky, publish_three
from .test_nats_contract import delete_streams, unique_prefix

pytestmark = pytest.mark.nats
CONFIG = ConsumerConfig(max_attempts=3, backoff=lambda state: 0.02, wait_seconds=0.3)


@pytest.fixture
def broker(nats_url: str) -> Iterator[NatsBroker]:
    prefix = unique_prefix()
    opened = open_broker(nats_url, prefix=prefix)
    assert isinstance(opened, NatsBroker)
    yield opened
    opened.close()
    delete_streams(nats_url, prefix)


def on_server(url: str, work: Any) -> Any:
    """Run ``work(js)`` on a connection of its own: what another NATS program sees."""
    async def main() -> Any:
        nc = await nats.connect(url)
        try:
            return await work(nc, nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def stored(broker: NatsBroker, topic: str) -> int:
    """How many messages the topic's stream holds (0: no stream)."""
    async def count(nc: Any, js: Any) -> int:
        try:
            info = await js.stream_info(stream_name(f"{broker.options.prefix}{topic}"))
        except nats.js.errors.NotFoundError:
            return 0
        return int(info.state.messages)

    return int(on_server(broker.options.url, count))


def test_a_message_is_readable_by_a_plain_nats_subscriber(broker: NatsBroker) -> None:
    subject = f"{broker.options.prefix}t"

    async def listen(nc: Any, js: Any) -> Any:
        sub = await nc.subscribe(subject)
        await nc.flush()
        await asyncio.to_thread(broker.publisher().publish, Message(
            id="m-1", topic="t", key="k", tag="debit", payload=b"\x00body",
            headers={"traceparent": "00-ab-cd-01", "ünï": "✓", "pad": " x "}))
        return await sub.next_msg(timeout=5)

    msg = on_server(broker.options.url, listen)
    assert (msg.subject, msg.data) == (subject, b"\x00body")
    assert msg.headers == {"Nats-Msg-Id": "m-1", "Outbox-Key": "k", "Outbox-Tag": "debit",
                       "traceparent": "00-ab-cd-01",
                       "Outbox-Headers": '{"\\u00fcn\\u00ef":"\\u2713","pad":" x "}'}
    [d] = broker.subscriber("t", "g").fetch(10, 2.0)
    assert dict(d.headers) == {"traceparent": "00-ab-cd-01", "ünï": "✓", "pad": " x "}


def test_the_same_id_is_stored_once_within_the_duplicate_window(broker: NatsBroker) -> None:
    pub = broker.publisher()
    pub.publish(Message(id="m-1", topic="t", payload=b"first"))
    pub.publish(Message(id="m-1", topic="t", payload=b"second"))
    pub.publish_batch([Message(id="m-2", topic="t", payload=b""),
                       Message(id="m-2", topic="t", payload=b"")])
    assert stored(broker, "t") == 2
    got = broker.subscriber("t", "g").fetch(10, 2.0)
    assert [(d.message_id, d.payload) for d in got] == [("m-1", b"first"), ("m-2", b"")]


def test_past_the_duplicate_window_the_id_is_stored_again(nats_url: str) -> None:
    prefix = unique_prefix()
    short = NatsBroker(nats_url, prefix=prefix, duplicate_window=0.3)
    try:
        short.publisher().publish(Message(id="m-1", topic="t", payload=b""))
        time.sleep(0.6)
        short.publisher().publish(Message(id="m-1", topic="t", payload=b""))
        assert stored(short, "t") == 2
    finally:
        short.close()
        delete_streams(nats_url, prefix)


def test_a_nak_delay_hides_the_message_and_every_delivery_is_counted(
        broker: NatsBroker) -> None:
    sub = broker.subscriber("t", "g")
    broker.publisher().publish(Message(id="m-1", topic="t", payload=b""))
    [d] = sub.fetch(10, 2.0)
    assert d.attempt == 1
    retried = time.monotonic()
    sub.retry(d, 1.0, "handler failed")
    assert sub.fetch(10, 0.6) == []
    [again] = sub.fetch(10, 3.0)
    assert time.monotonic() - retried >= 0.9
    assert (again.message_id, again.attempt) == ("m-1", 2)
    sub.retry(again, 0, "again")
    [third] = sub.fetch(10, 2.0)
    assert third.attempt == 3
    sub.ack(third)
    sub.ack(third)  # twice is no error
    assert sub.fetch(10, 0.3) == []


def test_a_dead_letter_lands_in_the_dead_stream_and_the_original_stays_out(
        broker: NatsBroker) -> None:
    sub = broker.subscriber("t", "g", visibility_timeout=0.3)
    broker.publisher().publish(Message(id="m-1", topic="t", key="k", tag="debit",
                                       headers={"traceparent": "00-ab", "ünï": "✓"},
                                       payload=b"body"))
    [d] = sub.fetch(10, 2.0)
    sub.dead_letter(d, "handler failed 3 times:\nRuntimeError: no")
    sub.dead_letter(d, "handler failed 3 times:\nRuntimeError: no")  # kept once
    time.sleep(0.5)  # past the visibility timeout
    assert sub.fetch(10, 0.3) == []
    assert broker.subscriber("t", "g").fetch(10, 0.3) == []
    letter = DeadLetter(message_id="m-1", group="g",
                        reason="handler failed 3 times: RuntimeError: no", sequence=1,
                        payload=b"body", key="k", tag="debit",
                        headers={"traceparent": "00-ab", "ünï": "✓"})
    assert broker.dead_letters("t", "g") == [letter]
    assert broker.dead_letters("t") == [letter]
    assert broker.dead_letters("t", "other") == []
    assert broker.dead_letters("never-used") == []
    assert stored(broker, "t") == 1  # the original is kept, settled for the group
    dead_stream = stream_name(f"{broker.options.prefix}t.dead")

    async def dead_count(nc: Any, js: Any) -> int:
        return int((await js.stream_info(dead_stream)).state.messages)

    assert on_server(broker.options.url, dead_count) == 1


def test_a_hostile_message_becomes_a_delivery_with_none_fields(broker: NatsBroker) -> None:
    sub = broker.subscriber("t", "g")
    sub.fetch(1, 0)  # the stream and the group exist from here on

    async def publish(nc: Any, js: Any) -> None:
        await js.publish(f"{broker.options.prefix}t", b"raw",
                         headers={"Outbox-Headers": "[1, 2", "x": "y"})
        await js.publish(f"{broker.options.prefix}t", b"")

    on_server(broker.options.url, publish)
    got = sub.fetch(10, 2.0)
    assert [(d.message_id, d.key, d.tag, dict(d.headers), d.payload) for d in got] == [
        (None, None, None, {"x": "y"}, b"raw"), (None, None, None, {}, b"")]


def test_a_deleted_stream_and_consumer_are_made_again(broker: NatsBroker,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_nats.broker, "CONSUMER_CHECK_INTERVAL", 0.0)
    sub, pub = broker.subscriber("t", "g"), broker.publisher()
    pub.publish(Message(id="m-1", topic="t", payload=b""))
    assert [d.message_id for d in sub.fetch(10, 2.0)] == ["m-1"]
    stream = stream_name(f"{broker.options.prefix}t")

    async def delete(nc: Any, js: Any) -> None:
        await js.delete_stream(stream)

    on_server(broker.options.url, delete)
    assert sub.fetch(10, 0.2) == []  # noticed: stream and consumer made again
    pub.publish(Message(id="m-2", topic="t", payload=b""))
    assert [d.message_id for d in sub.fetch(10, 2.0)] == ["m-2"]


@pytest.mark.parametrize("topic", ["has space", "a.*", "a.>", "a..b", ".a", "a.",
                                   "orders.dead"])
def test_a_topic_that_cannot_be_a_subject_is_refused(broker: NatsBroker, topic: str) -> None:
    with pytest.raises(PublishError, match="cannot be a NATS subject") as info:
        broker.publisher().publish_batch([Message(id="ok", topic="t", payload=b""),
                                          Message(id="bad", topic=topic, payload=b"")])
    assert "forbid spaces, '*' and '>'" in str(info.value)
    assert stored(broker, "t") == 0  # nothing of the batch was sent
    with pytest.raises(ConfigurationError, match="cannot be a NATS subject"):
        broker.subscriber(topic, "g")


def test_without_a_prefix_the_servers_own_subjects_are_refused(nats_url: str) -> None:
    bare = NatsBroker(nats_url, prefix="")
    try:
        with pytest.raises(PublishError, match=r"starts with '\$'"):
            bare.publisher().publish(Message(id="m", topic="$JS.API.STREAM.NAMES", payload=b""))
        with pytest.raises(ConfigurationError, match=r"starts with '\$'"):
            bare.subscriber("$SYS.REQ", "g")
    finally:
        bare.close()


def test_bad_settings_are_refused(nats_url: str) -> None:
    with pytest.raises(ConfigurationError, match="prefix"):
        NatsBroker(nats_url, prefix="a b.")
    with pytest.raises(ConfigurationError, match="duplicate_window"):
        NatsBroker(nats_url, duplicate_window=0)
    broker = NatsBroker(nats_url)
    with pytest.raises(ConfigurationError, match="topic and a group"):
        broker.subscriber("t", "")
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        broker.subscriber("t", "g", visibility_timeout=0)


def test_a_message_past_max_payload_fails_the_batch_before_anything_is_sent(
        broker: NatsBroker) -> None:
    with pytest.raises(PublishError, match="max_payload"):
        broker.publisher().publish_batch([Message(id="ok", topic="t", payload=b""),
                                          Message(id="big", topic="t", payload=b"x" * 2**20)])
    assert stored(broker, "t") == 0


def test_an_unreachable_server_says_what_to_do_without_the_password() -> None:
    down = NatsBroker("nats://outbox:S3cretPw@127.0.0.1:1", connect_timeout=1.0)
    try:
        with pytest.raises(BrokerUnavailableError) as info:
            down.publisher().publish(Message(id="m", topic="t", payload=b""))
        text = str(info.value)
        assert "S3cretPw" not in text and "nats://outbox:***@127.0.0.1:1" in text
        assert "scripts/nats up" in text

        async def main() -> str:
            try:
                await down.async_subscriber("t", "g").fetch(1, 0)
            except BrokerUnavailableError as exc:
                return str(exc)
            finally:
                await down.aclose()
            raise AssertionError("no error")

        text = asyncio.run(main())
        assert "S3cretPw" not in text and "scripts/nats up" in text
    finally:
        down.close()


def test_a_wrong_password_is_named_without_being_shown(nats_url: str) -> None:
    wrong = NatsBroker(nats_url.replace(":outbox@", ":Wr0ngPw@"), connect_timeout=1.0)
    try:
        with pytest.raises(BrokerUnavailableError, match="refused the user or password") as info:
            wrong.publisher().publish(Message(id="m", topic="t", payload=b""))
        assert "Wr0ngPw" not in str(info.value)
    finally:
        wrong.close()


def test_abilities(broker: NatsBroker) -> None:
    everything = Abilities(redelivery=True, dead_letter=True, counts_deliveries=True)
    assert Abilities.of(broker.subscriber("t", "g")) == everything
    assert Abilities.of(broker.async_subscriber("t", "g")) == everything


def check_outcome(engine: Engine, broker: NatsBroker, handler: Flaky) -> None:
    # Retried through NAK delays, not held in place: the order across messages varies.
    assert Counter(handler.calls) == {"flaky": 2, "poison": 3, "fine": 1}
    with engine.connect() as conn:
        assert set(conn.scalars(select(inbox.c.message_id))) == {"flaky", "fine"}
    [dead] = broker.dead_letters("transfers", "bank2")
    assert dead.message_id == "poison"
    assert (dead.reason or "").startswith("handler failed 3 times: RuntimeError")
    assert stored(broker, "transfers") == 3

    async def settled(nc: Any, js: Any) -> tuple[int, int]:
        info = await js.consumer_info(stream_name(f"{broker.options.prefix}transfers"), "bank2")
        return info.num_ack_pending, info.num_pending

    # Everything was settled: nothing in flight, nothing left to deliver.
    assert on_server(broker.options.url, settled) == (0, 0)


def done(stats: Any) -> bool:
    return bool(stats.processed + stats.duplicates >= 2 and stats.dead_lettered >= 1)


def test_the_idempotent_consumer_retries_and_dead_letters(
        engine: Engine, broker: NatsBroker) -> None:
    publish_three(broker)
    handler = Flaky({"flaky": 1, "poison": float("inf")})
    consumer = IdempotentConsumer(engine, broker.subscriber("transfers", "bank2"), "bank2",
                                  lambda session, message: handler.note(message), config=CONFIG)
    for _ in range(30):
        consumer.run_once()
        if done(consumer.stats):
            break
    check_outcome(engine, broker, handler)
    assert (consumer.stats.processed, consumer.stats.dead_lettered) == (2, 1)
    assert consumer.stats.retried == 3


def test_the_async_consumer_does_the_same(engine: Engine, async_engine: AsyncEngine,
                                          broker: NatsBroker) -> None:
    publish_three(broker)
    handler = Flaky({"flaky": 1, "poison": float("inf")})

    async def handle(session: Any, message: Any) -> None:
        handler.note(message)

    async def main() -> None:
        consumer = AsyncIdempotentConsumer(
            async_engine, broker.async_subscriber("transfers", "bank2"), "bank2", handle,
            config=CONFIG)
        try:
            for _ in range(30):
                await consumer.run_once()
                if done(consumer.stats):
                    break
        finally:
            await broker.aclose()

    asyncio.run(main())
    check_outcome(engine, broker, handler)


def test_a_delivery_the_consumer_already_applied_is_a_duplicate(
        engine: Engine, nats_url: str) -> None:
    """Past the duplicate window JetStream stores an id again; the inbox drops it."""
    prefix = unique_prefix()
    short = NatsBroker(nats_url, prefix=prefix, duplicate_window=0.3)
    try:
        handler = Flaky({})
        consumer = IdempotentConsumer(engine, short.subscriber("transfers", "bank2"), "bank2",
                                      lambda session, message: handler.note(message),
                                      config=CONFIG)
        message = Message(id="once", topic="transfers", payload=JsonCodec().encode({}))
        short.publisher().publish(message)
        consumer.run_once()
        time.sleep(0.5)
        short.publisher().publish(message)
        for _ in range(10):
            consumer.run_once()
            if consumer.stats.duplicates:
                break
        assert (handler.calls, consumer.stats.processed, consumer.stats.duplicates) == (
            ["once"], 1, 1)
    finally:
        short.close()
        delete_streams(nats_url, prefix)


def test_streams_are_named_after_their_subjects(broker: NatsBroker) -> None:
    broker.publisher().publish(Message(id="m", topic="orders.created", payload=b""))
    broker.publisher().publish(Message(id="m", topic="orders_created", payload=b""))

    async def names(nc: Any, js: Any) -> set[str]:
        return {i.config.name for i in await js.streams_info()
                if i.config.name.startswith(stream_name(broker.options.prefix[:-1]))}

    found = on_server(broker.options.url, names)
    plain = stream_name(f"{broker.options.prefix}orders.created")
    assert plain == f"{broker.options.prefix[:-1]}_orders_created"
    assert plain in found and len(found) == 2  # orders_created: the same, plus a hash
    info = on_server(broker.options.url, lambda nc, js: js.stream_info(plain))
    assert info.config.storage == api.StorageType.FILE
    assert info.config.duplicate_window == 120.0
    assert info.config.subjects == [f"{broker.options.prefix}orders.created"]
