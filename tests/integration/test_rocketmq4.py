"""The RocketMQ adapter on a real RocketMQ 4.9 broker (``scripts/rocketmq4 up``), over
the remoting protocol: the same decorator and transaction log as with 5.x, chosen by
configuration (a name server address instead of a proxy endpoint)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tenacity

import outbox
from outbox import ConsumerConfig, IdempotentConsumer, Message, ReceivedMessage, Relay, RelayConfig
from outbox.errors import BrokerUnavailableError, ConfigurationError
from outbox_rocketmq import (
    RocketMQConfig,
    RocketMQPublisher,
    RocketMQSubscriber,
    RocketMQTransactionalProducer,
)
from outbox_rocketmq.mapping import MESSAGE_ID_PROPERTY
from outbox_rocketmq.remoting.client import RemotingClient
from outbox_rocketmq.remoting.protocol import TRANSACTION_COMMIT_TYPE, StoredMessage

from .helpers import add_messages, capture_events
from .rocketmq_support import (
    LosesEndTransaction,
    check_backs,
    group_name,
    has_log_row,
    has_order,
    make_service,
    unique,
)

pytestmark = [pytest.mark.rocketmq4]

TX_TOPIC = "outbox-test4-tx"
NORMAL_TOPIC = "outbox-test4-normal"
DLQ_TOPIC4 = "outbox-test4-order"  # any topic takes any message on 4.x


@pytest.fixture
def config(rocketmq4_namesrv: str) -> RocketMQConfig:
    return RocketMQConfig(namesrv=rocketmq4_namesrv, producer_group=group_name("bank1"))


def delivered(namesrv: str, topic: str, wanted: set[str], *, timeout: float,
              settle: float = 0.0) -> dict[str, list[StoredMessage]]:
    """Every stored message of ``topic`` with a wanted outbox id, read from the start of
    each queue by a fresh group, until all arrived (and ``settle`` more seconds)."""
    client = RemotingClient(namesrv)
    group = group_name("collect4")
    found: dict[str, list[StoredMessage]] = {}
    try:
        client.subscribe(group, [topic])
        queues = client.route(topic).read_queues
        offsets = dict.fromkeys(queues, 0)
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < (settle_until or deadline):
            pulled = 0
            for queue in queues:
                result = client.pull(group, topic, queue, offsets[queue])
                offsets[queue] = result.next_offset
                pulled += len(result.messages)
                for m in result.messages:
                    mid = m.properties.get(MESSAGE_ID_PROPERTY, "")
                    if mid in wanted:
                        found.setdefault(mid, []).append(m)
            if settle_until is None and wanted <= set(found):
                settle_until = time.monotonic() + settle
            if not pulled:  # at the end of every queue: wait for more (a long history
                time.sleep(0.1)  # of the topic is read at full speed)
    finally:
        client.close()
    return found


def test_the_remoting_client_commits_half_messages_and_answers_check_backs(
    rocketmq4_namesrv: str,
) -> None:
    asked: list[tuple[str, str]] = []

    def checker(stored: StoredMessage) -> int:
        asked.append((stored.properties[MESSAGE_ID_PROPERTY],
                      stored.properties.get("TRANSACTION_CHECK_TIMES", "?")))
        return TRANSACTION_COMMIT_TYPE

    client = RemotingClient(rocketmq4_namesrv, producer_group=group_name("raw"),
                            checker=checker).start([TX_TOPIC])
    ended, lost = unique("ended"), unique("lost")
    try:
        first = client.send(TX_TOPIC, b"{}", {MESSAGE_ID_PROPERTY: ended}, transactional=True)
        client.end_transaction(first, True)
        client.send(TX_TOPIC, b"{}", {MESSAGE_ID_PROPERTY: lost}, transactional=True)
        got = delivered(rocketmq4_namesrv, TX_TOPIC, {ended, lost}, timeout=40)
    finally:
        client.close()
    assert set(got) == {ended, lost}
    assert [mid for mid, _ in asked] == [lost]  # only the one whose commit was lost
    assert asked[0][1] == "1"  # the broker counts its checks: the first one


def test_commit_is_delivered_with_its_properties_and_rollback_never(
    tmp_path: Path, config: RocketMQConfig, rocketmq4_namesrv: str,
) -> None:
    adapter = RocketMQTransactionalProducer(config, [TX_TOPIC])
    service = make_service(f"sqlite:///{tmp_path / 'a.db'}", adapter, TX_TOPIC)
    adapter.start()
    good, bad = unique("good"), unique("bad")
    try:
        service.place_order(good)
        with pytest.raises(ValueError, match="refused"):
            service.place_order(bad, fail=True)
        got = delivered(rocketmq4_namesrv, TX_TOPIC, {good, bad}, timeout=30, settle=3)
    finally:
        adapter.close()
    assert has_order(service.engine, good) and has_log_row(service.engine, good)
    assert not has_order(service.engine, bad)
    assert set(got) == {good} and len(got[good]) == 1
    [message] = got[good]
    assert message.keys == (good,)  # the decorator's key="order_no"
    assert "OUTBOX_CREATED_AT" in message.properties


def test_a_lost_commit_is_delivered_once_through_the_check_back(
    tmp_path: Path, config: RocketMQConfig, rocketmq4_namesrv: str,
) -> None:
    adapter = LosesEndTransaction(config, [TX_TOPIC])
    service = make_service(f"sqlite:///{tmp_path / 'b.db'}", adapter, TX_TOPIC)
    adapter.start()
    order_no = unique("lost-commit")
    try:
        with capture_events() as events:
            service.place_order(order_no)
            got = delivered(rocketmq4_namesrv, TX_TOPIC, {order_no}, timeout=40, settle=3)
    finally:
        adapter.close()
    assert adapter.asked == {order_no: "commit"}
    assert len(got.get(order_no, [])) == 1
    assert "commit" in check_backs(events, order_no)


def test_a_missing_topic_and_a_missing_name_server_are_clear_errors(
    rocketmq4_namesrv: str,
) -> None:
    client = RemotingClient(rocketmq4_namesrv)
    try:
        with pytest.raises(ConfigurationError, match="does not exist"):
            client.route("outbox-no-such-topic")
    finally:
        client.close()
    nowhere = RemotingClient("127.0.0.1:1")
    try:
        with pytest.raises(BrokerUnavailableError, match="no RocketMQ name server answered"):
            nowhere.route(NORMAL_TOPIC)
    finally:
        nowhere.close()


def test_a_relay_publishes_outbox_rows_to_the_4x_broker_in_batches(
    tmp_path: Path, config: RocketMQConfig, rocketmq4_namesrv: str,
) -> None:
    engine = outbox.create_engine(f"sqlite:///{tmp_path / 'relay.db'}")
    outbox.metadata.create_all(engine)
    prefix = unique("relay4")
    messages = [Message(topic=NORMAL_TOPIC, id=f"{prefix}-{i:03d}", key=f"k{i % 7}",
                        tag="t4", payload=b'{"i":%d}' % i, headers={"traceId": f"t{i}"})
                for i in range(250)]
    add_messages(engine, messages)
    publisher = RocketMQPublisher(config, [NORMAL_TOPIC])
    try:
        relay = Relay(engine, publisher, RelayConfig(batch_size=100))
        assert relay.drain(timeout=60) == len(messages)
        got = delivered(rocketmq4_namesrv, NORMAL_TOPIC, {m.id for m in messages}, timeout=30)
    finally:
        publisher.close()
        engine.dispose()
    assert {mid: len(copies) for mid, copies in got.items()} == {m.id: 1 for m in messages}
    sample = got[messages[5].id][0]
    # On the wire: the key and the outbox id (the broker's index finds it by either).
    assert (sample.tag, sample.keys, sample.properties["traceId"]) == (
        "t4", ("k5", messages[5].id), "t5")


def test_a_publisher_names_an_unreachable_name_server() -> None:
    publisher = RocketMQPublisher(RocketMQConfig(namesrv="127.0.0.1:1"), [NORMAL_TOPIC])
    try:
        with pytest.raises(BrokerUnavailableError, match="name server"):
            publisher.publish(Message(topic=NORMAL_TOPIC, payload=b"{}"))
    finally:
        publisher.close()


def consume_until(consumers: list[IdempotentConsumer], done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done():
        for consumer in consumers:
            consumer.run_once(wait_seconds=0.2)


def send_normal(config: RocketMQConfig, messages: list[Message]) -> None:
    publisher = RocketMQPublisher(config, [NORMAL_TOPIC])
    try:
        publisher.publish_batch(messages)
    finally:
        publisher.close()


def subscriber4(config: RocketMQConfig, group: str, **kwargs: Any) -> RocketMQSubscriber:
    return RocketMQSubscriber(config, NORMAL_TOPIC, group, dead_letter_topic=DLQ_TOPIC4,
                              **kwargs)


def test_a_4x_consumer_group_applies_each_message_once_retries_and_dead_letters(
    tmp_path: Path, config: RocketMQConfig, rocketmq4_namesrv: str,
) -> None:
    prefix = unique("c4")
    ok = [Message(topic=NORMAL_TOPIC, id=f"{prefix}-ok-{i}", payload=b'{"i":%d}' % i,
                  key=f"k{i}") for i in range(20)]
    flaky = Message(topic=NORMAL_TOPIC, id=f"{prefix}-flaky", payload=b"{}")
    doomed = Message(topic=NORMAL_TOPIC, id=f"{prefix}-doomed", payload=b"{}")
    send_normal(config, [*ok, flaky, doomed])
    applied: Counter[str] = Counter()
    attempts: Counter[str] = Counter()

    def handler(session: Any, received: ReceivedMessage) -> None:
        if not received.id.startswith(prefix):
            return  # the topic's history
        attempts[received.id] += 1
        if received.id == doomed.id or (received.id == flaky.id and received.attempt == 1):
            raise ValueError(f"refusing {received.id} at attempt {received.attempt}")
        applied[received.id] += 1

    engine = outbox.create_engine(f"sqlite:///{tmp_path / 'bank2.db'}")
    outbox.metadata.create_all(engine)
    group = group_name("bank2")
    subscriber = subscriber4(config, group)
    consumer = IdempotentConsumer(engine, subscriber, "bank2", handler, config=ConsumerConfig(
        max_attempts=2, backoff=tenacity.wait_fixed(1)))
    try:
        consume_until([consumer], lambda: len(applied) == 21 and attempts[doomed.id] >= 2, 90)
    finally:
        subscriber.close()
    assert applied == Counter({m.id: 1 for m in [*ok, flaky]})
    assert attempts[flaky.id] == 2 and attempts[doomed.id] == 2
    dead = delivered(rocketmq4_namesrv, DLQ_TOPIC4, {doomed.id}, timeout=20)
    [copy] = dead[doomed.id]
    assert "refusing" in copy.properties["OUTBOX_DEAD_REASON"]

    # The group's offsets are on the broker: a new member of it starts after them.
    again: Counter[str] = Counter()
    later = subscriber4(config, group)
    try:
        for d in later.fetch(32, 2.0):
            if d.message_id and d.message_id.startswith(prefix):
                again[d.message_id] += 1
            later.ack(d)
    finally:
        later.close()
    assert not again, f"delivered again after their offsets were committed: {dict(again)}"


def test_two_4x_members_share_the_queues_and_each_message_goes_to_one(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    prefix = unique("share4")
    messages = [Message(topic=NORMAL_TOPIC, id=f"{prefix}-{i:03d}", payload=b"{}")
                for i in range(80)]
    group = group_name("pair")
    seen: dict[str, list[str]] = {"a": [], "b": []}
    subs = {name: subscriber4(config, group) for name in seen}
    try:
        for sub in subs.values():  # both in the group before anything is sent
            sub.fetch(1, 0.1)
        time.sleep(1.0)
        for sub in subs.values():
            sub._remoting._rebalance()  # type: ignore[union-attr]
        send_normal(config, messages)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(seen["a"]) + len(seen["b"]) < len(messages):
            for name, sub in subs.items():
                for d in sub.fetch(32, 0.2):
                    if d.message_id and d.message_id.startswith(prefix):
                        seen[name].append(d.message_id)
                    sub.ack(d)
    finally:
        for sub in subs.values():
            sub.close()
    both = seen["a"] + seen["b"]
    assert sorted(both) == sorted(m.id for m in messages)  # each once, none lost
    assert seen["a"] and seen["b"], "the queues were shared between the two members"
