"""Batches and delays on a real RocketMQ 4.9 broker (``scripts/rocketmq4 up``): a
relay's batch goes as SEND_BATCH_MESSAGE requests, one per queue and within the
broker's size limit, and arrives complete, each message with its own id and
properties, a key's messages in order; a message whose delivery time is still ahead
gets the broker's delay level that is not early, and goes on its own."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import outbox
from outbox import Message, Relay, RelayConfig
from outbox.envelope import DELIVER_AT_HEADER, format_utc
from outbox.errors import PublishError
from outbox_rocketmq import AsyncRocketMQPublisher, RocketMQConfig, RocketMQPublisher
from outbox_rocketmq.halfsend import RemotingPlainSender
from outbox_rocketmq.remoting.client import RemotingClient
from outbox_rocketmq.remoting.protocol import RequestCode, hash_index

from .helpers import add_messages
from .rocketmq_support import group_name, unique
from .test_rocketmq4_order import FIFO_TOPIC, end_offsets, read_new

pytestmark = [pytest.mark.rocketmq4]


@pytest.fixture
def config(rocketmq4_namesrv: str) -> RocketMQConfig:
    return RocketMQConfig(namesrv=rocketmq4_namesrv, producer_group=group_name("batch4"))


@pytest.fixture
def admin(rocketmq4_namesrv: str) -> Iterator[RemotingClient]:
    client = RemotingClient(rocketmq4_namesrv)
    yield client
    client.close()


def sent_codes(publisher: RocketMQPublisher) -> dict[int, int]:
    producer = publisher._producer
    assert isinstance(producer, RemotingPlainSender)
    return dict(producer.client.sent)


def test_a_relays_batch_arrives_complete_in_key_order_with_every_property(
    tmp_path: Path, config: RocketMQConfig, admin: RemotingClient,
) -> None:
    since = end_offsets(admin, FIFO_TOPIC)
    prefix = unique("batch4")
    keys = [f"{prefix}-k{j}" for j in range(9)]
    messages = [Message(topic=FIFO_TOPIC, id=f"{prefix}-{i:03d}",
                        key=keys[i % 9] if i % 5 else None, tag=f"t{i % 3}",
                        payload=b'{"i":%d}' % i,
                        headers={"traceId": f"trace-{i}", "KEYS": "not a key"})
                for i in range(300)]
    engine = outbox.create_engine(f"sqlite:///{tmp_path / 'relay.db'}")
    outbox.metadata.create_all(engine)
    add_messages(engine, messages)
    publisher = RocketMQPublisher(config, [FIFO_TOPIC])
    try:
        relay = Relay(engine, publisher, RelayConfig(batch_size=150))
        assert relay.drain(timeout=60) == len(messages)
        codes = sent_codes(publisher)
    finally:
        publisher.close()
        engine.dispose()
    # Two relay batches of 150, each one request per queue: no message sent alone.
    assert codes.get(RequestCode.SEND_MESSAGE, 0) == 0
    assert 2 <= codes[RequestCode.SEND_BATCH_MESSAGE] <= 8, codes
    got = read_new(admin, FIFO_TOPIC, since, {m.id for m in messages}, timeout=30, settle=1)
    assert {mid: len(c) for mid, c in got.items()} == {m.id: 1 for m in messages}
    queues = admin.route(FIFO_TOPIC).write_queues
    for key in keys:
        mine = [got[m.id][0] for m in messages if m.key == key]
        assert {m.queue_id for m in mine} == {queues[hash_index(key, len(queues))].queue_id}
        assert [m.queue_offset for m in mine] == sorted(m.queue_offset for m in mine)
    unique_keys = {got[m.id][0].msg_id for m in messages}
    assert len(unique_keys) == len(messages), "each message its own UNIQ_KEY"
    for m in messages[:20]:
        [stored] = got[m.id]
        assert stored.body == m.payload and stored.tag == m.tag
        assert stored.properties["traceId"] == m.headers["traceId"]
        assert stored.properties["OUTBOX_MESSAGE_ID"] == m.id
        assert "not a key" in stored.properties["OUTBOX_HEADERS"]  # a reserved name, packed
        assert set(stored.keys) == {k for k in (m.key, m.id) if k}


def test_a_large_batch_is_split_within_the_brokers_size_limit(
    config: RocketMQConfig, admin: RemotingClient,
) -> None:
    since = end_offsets(admin, FIFO_TOPIC)
    prefix = unique("big4")
    messages = [Message(topic=FIFO_TOPIC, id=f"{prefix}-{i}", key=prefix,
                        payload=bytes([65 + i]) * (900 * 1024)) for i in range(7)]
    publisher = RocketMQPublisher(config, [FIFO_TOPIC])
    try:
        publisher.publish_batch(messages)  # 6.3 MB for one queue: over 4 MiB
        codes = sent_codes(publisher)
    finally:
        publisher.close()
    assert codes[RequestCode.SEND_BATCH_MESSAGE] == 2, codes
    got = read_new(admin, FIFO_TOPIC, since, {m.id for m in messages}, timeout=30)
    stored = [got[m.id][0] for m in messages]
    assert [s.body for s in stored] == [m.payload for m in messages]
    assert [s.queue_offset for s in stored] == sorted(s.queue_offset for s in stored)


def test_a_batch_the_broker_refuses_raises_and_names_the_messages(
    config: RocketMQConfig,
) -> None:
    messages = [Message(topic=FIFO_TOPIC, id=unique("huge"), payload=b"x" * (5 * 1024 * 1024))]
    publisher = RocketMQPublisher(config, [FIFO_TOPIC])
    try:
        with pytest.raises(PublishError, match=r"1 of 1 messages failed.*" + messages[0].id):
            publisher.publish_batch(messages)
    finally:
        publisher.close()


def due_in(seconds: float) -> dict[str, str]:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return {DELIVER_AT_HEADER: format_utc(now + dt.timedelta(seconds=seconds))}


def test_a_message_due_later_is_delayed_by_the_broker_never_early(
    config: RocketMQConfig, admin: RemotingClient,
) -> None:
    since = end_offsets(admin, FIFO_TOPIC)
    prefix = unique("delay4")
    direct = Message(topic=FIFO_TOPIC, id=f"{prefix}-direct", payload=b"{}", headers=due_in(8))
    now_one = Message(topic=FIFO_TOPIC, id=f"{prefix}-now", payload=b"{}")
    in_batch = Message(topic=FIFO_TOPIC, id=f"{prefix}-batched", payload=b"{}",
                       headers=due_in(4))
    later_one = Message(topic=FIFO_TOPIC, id=f"{prefix}-now2", payload=b"{}")
    publisher = RocketMQPublisher(config, [FIFO_TOPIC])
    sent_at = time.monotonic()
    try:
        publisher.publish(direct)  # due in 8 s: level 3, 10 s
        publisher.publish_batch([now_one, in_batch, later_one])  # due in 4 s: level 2, 5 s
        codes = sent_codes(publisher)
        with pytest.raises(PublishError, match="keep it in the outbox"):
            publisher.publish(Message(topic=FIFO_TOPIC, payload=b"{}", headers=due_in(3 * 3600)))
    finally:
        publisher.close()
    assert codes[RequestCode.SEND_MESSAGE] == 2  # the direct one and the delayed one alone
    arrived: dict[str, float] = {}
    ids = {direct.id, now_one.id, in_batch.id, later_one.id}
    got = read_new(admin, FIFO_TOPIC, since, ids, timeout=30, arrived=arrived)
    assert set(got) == ids
    after = {mid: when - sent_at for mid, when in arrived.items()}
    # The levels are 5 s apart, so that a loaded machine's slower reads cannot blur them.
    assert after[now_one.id] < 4.0 and after[later_one.id] < 4.0, after
    assert 4.9 <= after[in_batch.id] < 9.5, after  # not before it was due (4 s): 5 s
    assert 9.9 <= after[direct.id] < 20.0, after  # not before it was due (8 s): 10 s
    assert got[direct.id][0].properties["OUTBOX_DELIVER_AT"] == direct.headers[DELIVER_AT_HEADER]


def test_the_async_publisher_sends_a_4x_batch_as_batch_requests(
    config: RocketMQConfig, admin: RemotingClient,
) -> None:
    since = end_offsets(admin, FIFO_TOPIC)
    prefix = unique("abatch4")
    messages = [Message(topic=FIFO_TOPIC, id=f"{prefix}-{i}", key=f"{prefix}-k{i % 4}",
                        payload=b"{}") for i in range(40)]

    async def publish() -> dict[int, int]:
        publisher = AsyncRocketMQPublisher(config, [FIFO_TOPIC])
        try:
            await publisher.publish_batch(messages)
            return sent_codes(publisher._sync)
        finally:
            await publisher.close()

    codes = asyncio.run(publish())
    assert codes.get(RequestCode.SEND_MESSAGE, 0) == 0 and codes[RequestCode.SEND_BATCH_MESSAGE]
    got = read_new(admin, FIFO_TOPIC, since, {m.id for m in messages}, timeout=30)
    assert {mid: len(c) for mid, c in got.items()} == {m.id: 1 for m in messages}
