"""Order on a real RocketMQ 4.9 broker (``scripts/rocketmq4 up``), over the remoting
protocol: a key's messages (half messages too) go to the queue its hash picks, as a
Java producer's ``SelectMessageQueueByHash`` does; an orderly consumer hands out a
key's messages one after the other, holding a failed one's key while the queue's
other keys go on, and keeps the order when a member of the group leaves; pulls are
long polls, so an idle consumer asks seldom and a new message arrives at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tenacity

import outbox
from outbox import ConsumerConfig, IdempotentConsumer, Message, ReceivedMessage
from outbox.errors import ConfigurationError
from outbox.message import TransactionState
from outbox_rocketmq import (
    AsyncRocketMQSubscriber,
    RocketMQConfig,
    RocketMQPublisher,
    RocketMQSubscriber,
)
from outbox_rocketmq.halfsend import RemotingHalfSender
from outbox_rocketmq.mapping import MESSAGE_ID_PROPERTY
from outbox_rocketmq.remoting.client import MessageQueue, RemotingClient
from outbox_rocketmq.remoting.protocol import (
    Command,
    RequestCode,
    ResponseCode,
    StoredMessage,
    hash_index,
)

from .rocketmq_support import group_name, unique

pytestmark = [pytest.mark.rocketmq4]

#: A topic of the order tests' own (scripts/rocketmq4 creates it), 4 queues.
FIFO_TOPIC = "outbox-test4-fifo"
DLQ_TOPIC4 = "outbox-test4-order"


@pytest.fixture
def config(rocketmq4_namesrv: str) -> RocketMQConfig:
    return RocketMQConfig(namesrv=rocketmq4_namesrv, producer_group=group_name("order4"))


@pytest.fixture
def admin(rocketmq4_namesrv: str) -> Iterator[RemotingClient]:
    client = RemotingClient(rocketmq4_namesrv)
    yield client
    client.close()


def end_offsets(client: RemotingClient, topic: str) -> dict[MessageQueue, int]:
    """Where each queue of ``topic`` ends now."""
    route = client.route(topic, fresh=True)
    ends = {}
    for queue in route.read_queues:
        response = client.broker(route.brokers[queue.broker]).request(Command(
            RequestCode.GET_MAX_OFFSET, {"topic": topic, "queueId": str(queue.queue_id)}),
            client.request_timeout)
        assert response.code == ResponseCode.SUCCESS, response.remark
        ends[queue] = int(response.ext_fields["offset"])
    return ends


def start_group_at_end(client: RemotingClient, group: str, topic: str) -> None:
    """A new consumer group that starts at the end of every queue of ``topic``, not at
    its start (the topic's history is other tests')."""
    route = client.route(topic)
    for queue, offset in end_offsets(client, topic).items():
        response = client.broker(route.brokers[queue.broker]).request(Command(
            RequestCode.UPDATE_CONSUMER_OFFSET, {
                "consumerGroup": group, "topic": topic, "queueId": str(queue.queue_id),
                "commitOffset": str(offset)}), client.request_timeout)
        assert response.code == ResponseCode.SUCCESS, response.remark


def read_new(client: RemotingClient, topic: str, since: dict[MessageQueue, int],
             wanted: set[str], *, timeout: float, settle: float = 0.0,
             arrived: dict[str, float] | None = None) -> dict[str, list[StoredMessage]]:
    """The stored messages with a wanted outbox id from ``since`` on, in queue order,
    until all arrived (and ``settle`` seconds more); ``arrived`` gets when each did."""
    group = group_name("read4")
    client.subscribe(group, [topic])
    offsets = dict(since)
    found: dict[str, list[StoredMessage]] = {}
    deadline = time.monotonic() + timeout
    settle_until: float | None = None
    while time.monotonic() < (settle_until or deadline):
        for queue in offsets:
            result = client.pull(group, topic, queue, offsets[queue])
            offsets[queue] = result.next_offset
            for m in result.messages:
                mid = m.properties.get(MESSAGE_ID_PROPERTY, "")
                if mid in wanted:
                    found.setdefault(mid, []).append(m)
                    if arrived is not None:
                        arrived.setdefault(mid, time.monotonic())
        if settle_until is None and wanted <= set(found):
            settle_until = time.monotonic() + settle
        time.sleep(0.05)
    return found


def keys_on_one_queue(prefix: str, count: int, queues: int = 4) -> list[str]:
    """``count`` keys that all hash to the same queue."""
    keys: list[str] = []
    i = 0
    while len(keys) < count:
        key = f"{prefix}-{i}"
        if hash_index(key, queues) == hash_index(f"{prefix}-0", queues):
            keys.append(key)
        i += 1
    return keys


def test_a_keys_messages_and_half_messages_go_to_the_queue_its_hash_picks_in_order(
    config: RocketMQConfig, admin: RemotingClient,
) -> None:
    since = end_offsets(admin, FIFO_TOPIC)
    prefix = unique("hash4")
    keys = [f"{prefix}-k{j}" for j in range(6)]
    keyed = [Message(topic=FIFO_TOPIC, id=f"{prefix}-{i:03d}", key=keys[i % 6],
                     payload=b'{"i":%d}' % i) for i in range(48)]
    loose = [Message(topic=FIFO_TOPIC, id=f"{prefix}-loose-{i}", payload=b"{}")
             for i in range(8)]
    publisher = RocketMQPublisher(config, [FIFO_TOPIC])
    try:
        for m in keyed + loose:
            publisher.publish(m)  # one by one: SEND_MESSAGE
    finally:
        publisher.close()
    halves = [Message(topic=FIFO_TOPIC, id=f"{prefix}-half-{i}", key=keys[0], payload=b"{}")
              for i in range(3)]
    sender = RemotingHalfSender(config, [FIFO_TOPIC], lambda r, t: TransactionState.COMMIT)
    try:
        for half in halves:
            sender.end(sender.send_half(half), True)
    finally:
        sender.shutdown()
    everything = keyed + loose + halves
    got = read_new(admin, FIFO_TOPIC, since, {m.id for m in everything}, timeout=30)
    assert {mid: len(c) for mid, c in got.items()} == {m.id: 1 for m in everything}
    write_queues = admin.route(FIFO_TOPIC).write_queues
    for key in keys:
        mine = [got[m.id][0] for m in keyed + halves if m.key == key]
        expected = write_queues[hash_index(key, len(write_queues))].queue_id
        assert {m.queue_id for m in mine} == {expected}, key
        # Sent one after the other, in order. Not so the half messages: the end
        # transaction is one-way and the broker's pool may commit two of them in
        # either order (the README's caveat on half messages and key order).
        offsets = [got[m.id][0].queue_offset for m in keyed if m.key == key]
        assert offsets == sorted(offsets), f"{key}'s messages out of order on the broker"
    assert len({got[m.id][0].queue_id for m in loose}) > 1, "keyless messages spread"


def orderly_consumer(tmp_path: Path, name: str, subscriber: RocketMQSubscriber, handler: Any,
                     **config: Any) -> IdempotentConsumer:
    engine = outbox.create_engine(f"sqlite:///{tmp_path / name}.db")
    outbox.metadata.create_all(engine)
    return IdempotentConsumer(engine, subscriber, "bank2", handler,
                              config=ConsumerConfig(**config))


def test_an_orderly_consumer_holds_a_failed_messages_key_while_other_keys_go_on(
    tmp_path: Path, config: RocketMQConfig, admin: RemotingClient, rocketmq4_namesrv: str,
) -> None:
    prefix = unique("fifo4")
    a, b, c = keys_on_one_queue(prefix, 3)  # one queue: the failure is in its way
    sent = {
        a: [f"{prefix}-a{i}" for i in range(3)],  # a1 fails once
        b: [f"{prefix}-b{i}" for i in range(5)],
        c: [f"{prefix}-c{i}" for i in range(3)],  # c1 always fails: dead-lettered
    }
    order = [sent[a][0], sent[b][0], sent[c][0], sent[a][1], sent[b][1], sent[c][1],
             sent[b][2], sent[a][2], sent[b][3], sent[c][2], sent[b][4]]
    key_of = {mid: key for key, ids in sent.items() for mid in ids}
    group = group_name("fifo")
    start_group_at_end(admin, group, FIFO_TOPIC)
    since = end_offsets(admin, DLQ_TOPIC4)
    publisher = RocketMQPublisher(config, [FIFO_TOPIC])
    try:
        publisher.publish_batch([Message(topic=FIFO_TOPIC, id=mid, key=key_of[mid],
                                         payload=b"{}") for mid in order])
    finally:
        publisher.close()

    calls: list[tuple[str, int, float]] = []  # (id, attempt, when), every handler call
    applied: dict[str, list[str]] = defaultdict(list)

    def handler(session: Any, received: ReceivedMessage) -> None:
        calls.append((received.id, received.attempt, time.monotonic()))
        if received.id == sent[c][1] or (received.id == sent[a][1] and received.attempt == 1):
            raise ValueError(f"refusing {received.id} at attempt {received.attempt}")
        applied[received.key or ""].append(received.id)

    subscriber = RocketMQSubscriber(config, FIFO_TOPIC, group, dead_letter_topic=DLQ_TOPIC4,
                                    orderly=True)
    consumer = orderly_consumer(tmp_path, "fifo", subscriber, handler, max_attempts=2,
                                backoff=tenacity.wait_fixed(2))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(map(len, applied.values())) < 10:
            consumer.run_once(wait_seconds=0.5)
    finally:
        subscriber.close()
    assert dict(applied) == {a: sent[a], b: sent[b], c: [sent[c][0], sent[c][2]]}

    def at(mid: str, attempt: int = 1) -> float:
        [when] = [w for m, n, w in calls if m == mid and n == attempt]
        return when

    # a1 waited its 2 s here (attempt 2 was delivered from this process, not via the
    # retry topic), holding a2; b, on the same queue, went on meanwhile.
    assert at(sent[a][1], 2) - at(sent[a][1], 1) >= 1.9
    assert at(sent[a][2]) > at(sent[a][1], 2)
    assert max(at(mid) for mid in sent[b]) < at(sent[a][1], 2)
    # c1 failed twice (max_attempts), went to the dead-letter topic, then c2 came.
    assert [n for m, n, _ in calls if m == sent[c][1]] == [1, 2]
    assert at(sent[c][2]) > at(sent[c][1], 2)
    dead = read_new(admin, DLQ_TOPIC4, since, {sent[c][1]}, timeout=20)
    assert "refusing" in dead[sent[c][1]][0].properties["OUTBOX_DEAD_REASON"]
    try:
        retried = end_offsets(admin, f"%RETRY%{group}")
    except ConfigurationError:
        retried = {}  # not even created
    assert not any(retried.values()), "nothing went to the group's retry topic"


def fifo_queues(sub: RocketMQSubscriber) -> list[MessageQueue]:
    """The queues of the test topic ``sub`` consumes (it locked them)."""
    assert sub._remoting is not None
    return [q for topic, q in sub._remoting._queues if topic == FIFO_TOPIC]


def test_order_holds_across_two_orderly_members_when_one_leaves(
    tmp_path: Path, config: RocketMQConfig, admin: RemotingClient,
) -> None:
    prefix = unique("pair4")
    keys = [f"{prefix}-k{j}" for j in range(8)]
    messages = [Message(topic=FIFO_TOPIC, id=f"{prefix}-{i:03d}", key=keys[i % 8],
                        payload=b"{}") for i in range(160)]
    group = group_name("fifo-pair")
    start_group_at_end(admin, group, FIFO_TOPIC)
    applied: dict[str, list[str]] = defaultdict(list)
    by_member: dict[str, int] = defaultdict(int)
    engine = outbox.create_engine(f"sqlite:///{tmp_path / 'pair.db'}")
    outbox.metadata.create_all(engine)
    subs = {name: RocketMQSubscriber(config, FIFO_TOPIC, group, dead_letter_topic=DLQ_TOPIC4,
                                     orderly=True) for name in ("a", "b")}

    def handler_of(name: str) -> Any:
        def handler(session: Any, received: ReceivedMessage) -> None:
            applied[received.key or ""].append(received.id)
            by_member[name] += 1
        return handler

    # One service running twice: the same database and inbox.
    consumers = {name: IdempotentConsumer(engine, sub, "bank2", handler_of(name))
                 for name, sub in subs.items()}
    try:
        for sub in subs.values():
            sub.fetch(1, 0.1)  # both in the group before anything is sent
        time.sleep(1.0)
        for sub in subs.values():
            sub._remoting._rebalance()  # type: ignore[union-attr]
        assert {n: len(fifo_queues(s)) for n, s in subs.items()} == {"a": 2, "b": 2}, \
            "each member locks its share of the topic's queues"
        publisher = RocketMQPublisher(config, [FIFO_TOPIC])
        try:
            publisher.publish_batch(messages)
        finally:
            publisher.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(by_member.values()) < 50:
            for consumer in consumers.values():
                consumer.run_once(wait_seconds=0.2)
        assert by_member["a"] and by_member["b"]
        subs["a"].close()  # commits, unlocks and leaves: b takes its queues over
        while time.monotonic() < deadline and sum(by_member.values()) < len(messages):
            consumers["b"].run_once(wait_seconds=0.5)
        assert len(fifo_queues(subs["b"])) == 4
    finally:
        for sub in subs.values():
            sub.close()
        engine.dispose()
    assert sum(by_member.values()) == len(messages)
    for key in keys:
        assert applied[key] == [m.id for m in messages if m.key == key], key


def test_the_async_orderly_subscriber_hands_out_a_keys_next_message_after_the_ack(
    config: RocketMQConfig, admin: RemotingClient,
) -> None:
    prefix = unique("afifo4")
    ids = [f"{prefix}-{i}" for i in range(3)]
    group = group_name("afifo")
    start_group_at_end(admin, group, FIFO_TOPIC)
    publisher = RocketMQPublisher(config, [FIFO_TOPIC])
    try:
        publisher.publish_batch([Message(topic=FIFO_TOPIC, id=mid, key=prefix, payload=b"{}")
                                 for mid in ids])
    finally:
        publisher.close()

    async def run() -> list[list[str]]:
        sub = AsyncRocketMQSubscriber(config, FIFO_TOPIC, group, dead_letter_topic=DLQ_TOPIC4,
                                      orderly=True)
        rounds: list[list[str]] = []
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and sum(map(len, rounds)) < len(ids):
                got = await sub.fetch(32, 1.0)
                if got:
                    rounds.append([d.message_id or "" for d in got])
                for d in got:
                    await sub.ack(d)
        finally:
            await sub.close()
        return rounds

    assert asyncio.run(run()) == [[mid] for mid in ids]  # one at a time, in order


def test_an_idle_consumer_long_polls_and_a_new_message_arrives_at_once(
    config: RocketMQConfig, admin: RemotingClient,
) -> None:
    group = group_name("idle")
    start_group_at_end(admin, group, FIFO_TOPIC)
    sub = RocketMQSubscriber(config, FIFO_TOPIC, group, dead_letter_topic=DLQ_TOPIC4)
    remoting = sub._remoting
    assert remoting is not None
    publisher = RocketMQPublisher(config, [FIFO_TOPIC])
    try:
        sub.fetch(32, 1.0)
        before = remoting.requests_sent
        started = time.monotonic()
        while time.monotonic() - started < 6.0:  # idle: nothing is sent meanwhile
            assert not sub.fetch(32, 1.0)
        after = remoting.requests_sent
        pulls = after.get(RequestCode.PULL_MESSAGE, 0) - before.get(RequestCode.PULL_MESSAGE, 0)
        total = sum(after.values()) - sum(before.values())
        # Polling every 0.1 s it was 5 queues x 10 x 6 s = 300 pulls; now each queue's
        # pull waits on the broker (up to 15 s).
        assert pulls <= 10, after
        assert total <= 30, after

        mid = unique("late")
        got: list[str] = []
        took: list[float] = []

        def wait_for_it() -> None:
            began = time.monotonic()
            for d in sub.fetch(32, 10.0):
                got.append(d.message_id or "")
                sub.ack(d)
            took.append(time.monotonic() - began)

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(1.0)
        sent_at = time.monotonic()
        publisher.publish(Message(topic=FIFO_TOPIC, id=mid, payload=b"{}"))
        waiter.join(15)
        assert got == [mid]
        # at once: well before the fetch's own 10 s (a loaded machine may take a moment)
        assert time.monotonic() - sent_at < 5.0 and took[0] < 6.0, took

        # close() ends a fetch that waits on the broker at once.
        closer = threading.Thread(target=lambda: sub.fetch(32, 30.0))
        closer.start()
        time.sleep(0.5)
        closed_at = time.monotonic()
        sub.close()
        closer.join(10)
        assert not closer.is_alive() and time.monotonic() - closed_at < 3.0
    finally:
        publisher.close()
        sub.close()


def test_a_first_retry_is_back_soon_though_the_retry_topic_came_after_the_member(
    config: RocketMQConfig, admin: RemotingClient,
) -> None:
    """The broker makes a group's retry topic when it first hears of the group; a member
    that started before the name server had its route rebalanced without it. Its first
    retry makes it look again at once, not at the next rebalance (5 s later)."""
    group = group_name("firstretry")
    start_group_at_end(admin, group, FIFO_TOPIC)
    sub = RocketMQSubscriber(config, FIFO_TOPIC, group, dead_letter_topic=DLQ_TOPIC4)
    remoting = sub._remoting
    assert remoting is not None
    routed = remoting._topics
    hide = [True]

    def topics() -> list[str]:  # the retry topic not routed yet, while hide[0]
        return [t for t in routed() if not (hide[0] and t == remoting.retry_topic)]

    remoting._topics = topics  # type: ignore[method-assign]
    publisher = RocketMQPublisher(config, [FIFO_TOPIC])
    try:
        sub.fetch(1, 0.1)
        mid = unique("firstretry")
        publisher.publish(Message(topic=FIFO_TOPIC, id=mid, payload=b"{}"))
        first: list[Any] = []
        deadline = time.monotonic() + 20
        while not first and time.monotonic() < deadline:
            first = [d for d in sub.fetch(32, 1.0) if d.message_id == mid]
        [d] = first
        remoting._rebalance()  # the next regular one: 5 s from now
        assert remoting.retry_topic not in remoting.client.subscriptions(group)
        hide[0] = False
        retried_at = time.monotonic()
        sub.retry(d, 0, "again")  # delay level 1: 1 s
        again = [a for a in sub.fetch(32, 4.0) if a.message_id == mid]
        took = time.monotonic() - retried_at
        assert [a.attempt for a in again] == [2], took
        assert took < 4.5
        assert remoting.retry_topic in remoting.client.subscriptions(group)
        sub.ack(again[0])
    finally:
        publisher.close()
        sub.close()
