"""Delayed delivery on the broker (scripts/rocketmq up creates the DELAY topic
``outbox-test-delay``): a message whose delivery time (header ``outbox-deliver-at``)
is still ahead when the publisher sends it carries it as delivery timestamp, and the
broker holds it until then; a topic that takes no delayed messages refuses it before
anything is sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

import outbox
from outbox import Message
from outbox.envelope import DELIVER_AT_HEADER, format_utc
from outbox.schema import utcnow
from outbox_rocketmq import AsyncRocketMQPublisher, RocketMQConfig, RocketMQPublisher
from outbox_rocketmq._client import client_configuration, rocketmq
from outbox_rocketmq.mapping import MESSAGE_ID_PROPERTY
from outbox_rocketmq.topics import accepted_types, is_delay

from .rocketmq_support import DLQ_TOPIC, MIXED_TOPIC, group_name, unique

pytestmark = [pytest.mark.rocketmq]

DELAY_TOPIC = "outbox-test-delay"
FIFO_TOPIC = "outbox-test-fifo"
#: How far ahead the delayed messages are due.
AHEAD = 3.0


@pytest.fixture
def config(rocketmq_endpoints: str) -> RocketMQConfig:
    return RocketMQConfig(rocketmq_endpoints)


#: Every message of a run carries this tag and the receivers filter on it, so a fresh
#: group does not wade through the topic's history.
TAG = unique("delay")


def due_in(seconds: float, *, topic: str = DELAY_TOPIC) -> Message:
    at = utcnow() + dt.timedelta(seconds=seconds)
    return Message(topic=topic, payload=b'{"n": 1}', id=unique("delay"), key=unique("k"),
                   tag=TAG, headers={DELIVER_AT_HEADER: format_utc(at)})


def due_at(message: Message) -> float:
    """The message's delivery time as a wall-clock timestamp."""
    when = outbox.envelope.delivery_time(message.headers)
    assert when is not None
    return when.replace(tzinfo=dt.UTC).timestamp()


def arrivals(config: RocketMQConfig, topic: str, wanted: set[str], *,
             timeout: float) -> dict[str, float]:
    """The wall-clock time each ``wanted`` id reached a fresh group of ``topic``."""
    rmq = rocketmq()
    consumer = rmq.SimpleConsumer(client_configuration(config), group_name("delay"),
                                  {topic: rmq.FilterExpression(TAG)}, 1)
    consumer.startup()
    seen: dict[str, float] = {}
    try:
        deadline = time.monotonic() + timeout
        while not wanted <= set(seen) and time.monotonic() < deadline:
            try:
                received = consumer.receive(32, 15)
            except Exception:  # a young client's "settings null": not yet
                time.sleep(0.2)
                continue
            for r in received or ():
                seen.setdefault(dict(r.properties or {}).get(MESSAGE_ID_PROPERTY, ""),
                                time.time())
                consumer.ack(r)
    finally:
        consumer.shutdown()
    return seen


def test_the_delay_topic_is_there(config: RocketMQConfig) -> None:
    publisher = RocketMQPublisher(config, [DELAY_TOPIC])
    try:
        types = accepted_types(publisher._started(), DELAY_TOPIC)
    finally:
        publisher.close()
    assert is_delay(types), f"{DELAY_TOPIC} is {sorted(types)}: run scripts/rocketmq up"


def test_a_message_due_later_is_held_by_the_broker_until_then(config: RocketMQConfig) -> None:
    publisher = RocketMQPublisher(config, [DELAY_TOPIC])
    later = due_in(AHEAD)
    now = Message(topic=DELAY_TOPIC, payload=b'{"n": 2}', id=unique("now"), tag=TAG)  # at once
    try:
        publisher.publish(later)
        publisher.publish(now)
        sent = time.time()
    finally:
        publisher.close()
    seen = arrivals(config, DELAY_TOPIC, {later.id, now.id}, timeout=AHEAD + 15)
    assert set(seen) == {later.id, now.id}, seen
    # Not before it was due (the timestamp is rounded up to the second), not much after.
    assert seen[later.id] >= due_at(later), (seen[later.id], due_at(later))
    assert seen[later.id] - due_at(later) < 5.0
    # One without a delivery time (a DELAY topic takes no plain sends) comes at once.
    assert seen[now.id] - sent < min(AHEAD, 2.5)
    print(f"delayed message arrived {seen[later.id] - due_at(later):.2f} s after it was due")


def test_the_async_publisher_delays_the_same_way(config: RocketMQConfig) -> None:
    later = due_in(AHEAD)

    async def publish() -> None:
        publisher = AsyncRocketMQPublisher(config, [DELAY_TOPIC])
        try:
            await publisher.publish_batch([later])
        finally:
            await publisher.close()

    asyncio.run(publish())
    seen = arrivals(config, DELAY_TOPIC, {later.id}, timeout=AHEAD + 15)
    assert due_at(later) <= seen[later.id] < due_at(later) + 5.0


@pytest.mark.parametrize("topic", [DLQ_TOPIC, FIFO_TOPIC])  # NORMAL, FIFO
def test_a_topic_without_delay_refuses_a_message_due_later_before_sending(
    config: RocketMQConfig, topic: str,
) -> None:
    publisher = RocketMQPublisher(config, [topic])
    later = due_in(60, topic=topic)
    try:
        with pytest.raises(outbox.ConfigurationError) as caught:
            publisher.publish(later)
    finally:
        publisher.close()
    text = str(caught.value)
    assert "takes no delayed messages" in text and "DELAY topic" in text
    assert "local outbox" in text and later.id in text


def test_a_mixed_topic_takes_delayed_messages_too(config: RocketMQConfig) -> None:
    publisher = RocketMQPublisher(config, [MIXED_TOPIC])
    later = due_in(AHEAD, topic=MIXED_TOPIC)
    try:
        publisher.publish(later)
    finally:
        publisher.close()
    seen = arrivals(config, MIXED_TOPIC, {later.id}, timeout=AHEAD + 15)
    assert due_at(later) <= seen[later.id] < due_at(later) + 5.0
