"""The shipped transport contract on RocketMQ, sync and asyncio: 5.x through its gRPC
proxy (``scripts/rocketmq up``) and 4.9 over the remoting protocol
(``scripts/rocketmq4 up``).

RocketMQ's topics are created ahead and shared by every test (and by the other suites
that run against the same brokers), while the contract's message ids are fixed
("m-1"). So each test gets a token: its publisher puts the token in front of every
message id and sends the contract's topics ("contract", "other") to two real test
topics; each of its subscribers reads as a consumer group of its own (one per test,
contract topic and contract group: RocketMQ wants one subscription per group),
acknowledges and drops every delivery without the token (other tests' messages), and
hands on the rest with the token taken off again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from outbox.message import Message
from outbox.testing.contract import (
    Features,
    LoopThread,
    SyncPublisher,
    SyncSubscriber,
    TransportContract,
)
from outbox.transport import Delivery, SubscriberWrapper
from outbox.typing import Publisher, Subscriber
from outbox_rocketmq import (
    AsyncRocketMQPublisher,
    AsyncRocketMQSubscriber,
    RocketMQConfig,
    RocketMQPublisher,
    RocketMQSubscriber,
)
from outbox_rocketmq.mapping import (
    DEAD_GROUP_PROPERTY,
    DEAD_REASON_PROPERTY,
    MESSAGE_ID_PROPERTY,
    ORIGINAL_TOPIC_PROPERTY,
)
from outbox_rocketmq.remoting.client import MessageQueue, RemotingClient
from outbox_rocketmq.remoting.protocol import Command, RequestCode, ResponseCode
from outbox_rocketmq.subscriber import MIN_INVISIBLE_SECONDS

#: The contract's topics on the real brokers: test topics both scripts create (MIXED
#: on 5.x, where a plain send needs NORMAL or MIXED; any topic takes anything on 4.x).
TOPICS = {"contract": "outbox-test4-normal", "other": "outbox-test4-tx"}
#: Where the subscribers' ``dead_letter`` copies go.
DEAD_LETTER_TOPIC = "outbox-test4-order"
#: RocketMQ's admin request UPDATE_AND_CREATE_SUBSCRIPTIONGROUP (what ``mqadmin
#: updateSubGroup`` sends): a 5.x broker sets no offsets of a group it does not know.
CREATE_SUBSCRIPTION_GROUP = 200

FEATURES_5 = Features(
    # Any process's producer sends to the same topic through the proxy.
    shared_between_processes=True,
    # A popped message comes back once its invisible time is over: the proxy takes no
    # less than 10 s (the contract's timeout is raised to that), and the broker revives
    # it ~3 s later, handed out when the receive's long poll ends; timescale 4 gives
    # the test's wait room for all of that.
    redelivers_after_visibility_timeout=True,
    # A batch is checked whole before anything is sent (a broken message refuses it);
    # a broker failure part-way leaves what went out stored, and the relay sends the
    # rest again (the inbox drops the copies).
    batch_publish=True,
    # A topic's queues (8 here) are popped side by side.
    ordered=False,
    # A plain (NORMAL/MIXED) topic spreads a key's messages over its queues; per-key
    # order on 5.x needs a FIFO topic read by a FIFO group (mqadmin updateSubGroup
    # -o true), which cannot be made per test.
    ordered_per_key=False,
    # retry sets the message's invisible time (change_invisible_duration, at least
    # 1 s; the broker revives it ~3 s after that).
    redelivery=True,
    # dead_letter sends a copy with the reason to the dead-letter topic, then acks.
    dead_letter=True,
    # Delivery.attempt is the broker's delivery attempt, kept across consumers.
    counts_deliveries=True,
    # The 5.x client refuses an empty body: publish raises PublishError saying what
    # to do, before anything is sent.
    empty_payload=False,
    # A new group starts at the end of each queue (the proxy's ConsumeInitMode.MAX),
    # unless the queue's first message is still in the broker's memory: what a late
    # group gets depends on the page cache. Here it starts at the queues' ends when
    # its first subscriber is made.
    late_groups_see_earlier_messages=False,
    # A popped message is invisible to the group's other consumers until it is
    # acknowledged or its invisible time is over.
    exclusive_within_group=True,
    # The 10 s minimum invisible time (+ ~3 s revive) must fit the redelivery test's
    # wait (timescale * (3 + 0.4 * timescale)); a receive also long-polls at least 1 s,
    # even for fetch(..., 0), and retry(0) takes ~4 s.
    timescale=4.0,
)

FEATURES_4 = Features(
    # Any process's producer sends to the same topic on the broker.
    shared_between_processes=True,
    # There is no invisible time on 4.x: the member holds an unacknowledged message
    # until it acks or retries it, or leaves the group (then the queue's next owner
    # starts at the committed offset: test_an_unacknowledged_delivery_comes_back...).
    redelivers_after_visibility_timeout=False,
    # Checked whole before anything is sent, then one SEND_BATCH_MESSAGE per queue:
    # each is stored whole or not at all; a broker failure part-way leaves some queues'
    # parts stored, and the relay sends the batch again (the inbox drops the copies).
    batch_publish=True,
    # A topic's queues (4 here) are pulled side by side.
    ordered=False,
    # A key's messages go to its hash's queue, which one member hands out in order.
    ordered_per_key=True,
    # retry sends the message back (CONSUMER_SEND_MSG_BACK) with the smallest delay
    # level of at least the delay (1 s, 5 s, 10 s, ...).
    redelivery=True,
    # dead_letter sends a copy with the reason to the dead-letter topic, then acks.
    dead_letter=True,
    # NOT the broker's count of deliveries: its reconsume count grows only with a
    # retry (send-back); a message handed out again after its member left the group
    # comes back with attempt 1. The subscriber does not declare it, and the consumer
    # counts in its database.
    counts_deliveries=False,
    # The adapter starts a group the broker has no offsets for at each queue's
    # beginning (here: where the queues stood when the test began, so that only this
    # test's messages are read).
    late_groups_see_earlier_messages=True,
    # Each queue has one owner in the group at a time (copies only around a
    # rebalance, from the committed offset).
    exclusive_within_group=True,
    # A retry goes back through the broker (send-back to the group's retry topic at
    # delay level 1, then a pull of it: ~1.3 s), so the contract's waits are doubled.
    timescale=2.0,
)


class TokenPublisher:
    """The real publisher, with this test's token in front of every message id and the
    contract's topic names replaced by real ones."""

    def __init__(self, inner: Any, token: str) -> None:
        self.inner = inner
        self.token = token
        if callable(getattr(inner, "publish_batch", None)):
            self.publish_batch = self._publish_batch

    def _real(self, message: Message) -> Message:
        # Message.stored: a message that slipped past validation stays as it is, for
        # the adapter to refuse.
        return Message.stored(id=self.token + message.id, topic=TOPICS[message.topic],
                              payload=message.payload, key=message.key, tag=message.tag,
                              headers=message.headers)

    def publish(self, message: Message) -> None:
        self.inner.publish(self._real(message))

    def _publish_batch(self, messages: Sequence[Message]) -> None:
        self.inner.publish_batch([self._real(m) for m in messages])

    def close(self) -> None:
        self.inner.close()


class TokenSubscriber(SubscriberWrapper):
    """The real subscriber, handing on only this test's deliveries (the token taken off
    the id, the contract's topic name back); the others are acknowledged and dropped.
    A delivery handed on carries the real one as its handle. ``retry`` and
    ``dead_letter`` exist only where the inner subscriber has them."""

    def __init__(self, inner: Any, topic: str, token: str) -> None:
        super().__init__(inner)
        self.topic = topic
        self.token = token
        self._pending: list[Delivery] = []
        self._closed = False
        if callable(getattr(inner, "retry", None)):
            self.retry = self._retry
        if callable(getattr(inner, "dead_letter", None)):
            self.dead_letter = self._dead_letter

    def _ours(self, batch: Sequence[Delivery]) -> list[Delivery]:
        ours = []
        for d in batch:
            if d.message_id is not None and d.message_id.startswith(self.token):
                ours.append(dataclasses.replace(
                    d, topic=self.topic, message_id=d.message_id[len(self.token):], handle=d))
            else:
                self.inner.ack(d)  # another test's message
        return ours

    def join(self) -> None:
        """Fetch once without waiting: the member joins its group now (on 4.x a group's
        members share its queues out), not at the test's first fetch. What it got is
        handed out first."""
        self._pending += self._ours(self.inner.fetch(1, 0))

    def fetch(self, max_messages: int, wait_seconds: float) -> list[Delivery]:
        deadline = time.monotonic() + wait_seconds
        got, self._pending = self._pending[:max_messages], self._pending[max_messages:]
        while not got:
            # Fetched again while the wait lasts: what came may all have been foreign
            # (and a young 5.x client answers "not yet" at once).
            got = self._ours(self.inner.fetch(max_messages, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
        return got

    def ack(self, delivery: Delivery) -> None:
        self.inner.ack(delivery.handle)

    def _retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        self.inner.retry(delivery.handle, delay_seconds, error)

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.inner.dead_letter(delivery.handle, reason)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.inner.close()


class RocketMQUnderTest:
    """One test's view of a shared RocketMQ: its token, and consumer groups of its own.

    ``namesrv`` is the name server of the broker behind ``config``: the test's admin
    client creates the groups and sets where they start, and reads the dead-letter
    topic, over the remoting protocol."""

    features = FEATURES_5

    def __init__(self, config: RocketMQConfig, namesrv: str) -> None:
        self.config = config
        self.token = f"ct{uuid.uuid4().hex[:10]}-"
        self.admin = RemotingClient(namesrv)
        self.groups: set[str] = set()
        self.closing: list[Any] = []
        #: Where each queue of each topic stood when the test began.
        self.began = {t: self.end_offsets(t) for t in {*TOPICS.values(), DEAD_LETTER_TOPIC}}

    # -- the admin side ----------------------------------------------------------------

    def _request(self, topic: str, queue: MessageQueue, code: int, **fields: str) -> Command:
        address = self.admin.route(topic).brokers[queue.broker]
        return self.admin.broker(address).request(Command(code, {
            "topic": topic, "queueId": str(queue.queue_id), **fields}), 5.0)

    def end_offsets(self, topic: str) -> dict[MessageQueue, int]:
        return {q: int(self._request(topic, q, RequestCode.GET_MAX_OFFSET).ext_fields["offset"])
                for q in self.admin.route(topic, fresh=True).read_queues}

    def start_offsets(self, topic: str) -> dict[MessageQueue, int]:
        """Where a new group starts: 5.x, at the queues' ends (see FEATURES_5)."""
        return self.end_offsets(topic)

    def group(self, topic: str, group: str) -> str:
        """The real consumer group of the contract's ``group`` on its ``topic``."""
        return f"outbox-contract-{self.token}{topic}-{group}"

    def _new_group(self, topic: str, group: str) -> None:
        """Create ``group`` on the broker, starting at :meth:`start_offsets`."""
        if group in self.groups:
            return  # a later member of the group: it goes on from the group's offsets
        route = self.admin.route(topic)
        for address in route.brokers.values():
            response = self.admin.broker(address).request(Command(
                CREATE_SUBSCRIPTION_GROUP, body=json.dumps({"groupName": group}).encode()), 5.0)
            assert response.code == ResponseCode.SUCCESS, response.remark
        for queue, offset in self.start_offsets(topic).items():
            response = self._request(topic, queue, RequestCode.UPDATE_CONSUMER_OFFSET,
                                     consumerGroup=group, commitOffset=str(offset))
            assert response.code == ResponseCode.SUCCESS, response.remark
        self.groups.add(group)

    # -- TransportUnderTest ------------------------------------------------------------

    def _publisher(self) -> Any:
        return RocketMQPublisher(self.config, list(TOPICS.values()))

    def _subscriber(self, topic: str, group: str, invisible_seconds: int) -> Any:
        return RocketMQSubscriber(self.config, topic, group, dead_letter_topic=DEAD_LETTER_TOPIC,
                                  invisible_seconds=invisible_seconds)

    def publisher(self) -> Publisher:
        publisher = TokenPublisher(self._publisher(), self.token)
        self.closing.append(publisher)
        return publisher

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        real_group = self.group(topic, group)
        self._new_group(TOPICS[topic], real_group)
        # The proxy's minimum invisible time (4.x has none and ignores it).
        invisible = max(MIN_INVISIBLE_SECONDS, math.ceil(visibility_timeout))
        subscriber = TokenSubscriber(self._subscriber(TOPICS[topic], real_group, invisible),
                                     topic, self.token)
        self.closing.append(subscriber)
        subscriber.join()
        return subscriber

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        """The copies on the dead-letter topic since the test began that ``group``'s
        subscriber of ``topic`` sent."""
        real_group = self.group(topic, group)
        reader = self.group("dead-letters", "reader")
        found: list[tuple[str | None, str | None]] = []
        ends = self.end_offsets(DEAD_LETTER_TOPIC)
        for queue, offset in self.began[DEAD_LETTER_TOPIC].items():
            while offset < ends.get(queue, 0):
                result = self.admin.pull(reader, DEAD_LETTER_TOPIC, queue, offset)
                if not result.messages:
                    break
                offset = result.next_offset
                for m in result.messages:
                    p = m.properties
                    message_id = p.get(MESSAGE_ID_PROPERTY, "")
                    if (p.get(DEAD_GROUP_PROPERTY) == real_group
                            and p.get(ORIGINAL_TOPIC_PROPERTY) == TOPICS[topic]
                            and message_id.startswith(self.token)):
                        found.append((message_id[len(self.token):], p.get(DEAD_REASON_PROPERTY)))
        return found

    def _where(self) -> str:
        return self.config.endpoints

    def publish_from_another_process(self, topic: str, ids: Sequence[str]) -> None:
        code = textwrap.dedent("""
            import sys
            from outbox import Message
            from outbox_rocketmq import RocketMQConfig, RocketMQPublisher
            where, topic, token, *ids = sys.argv[1:]
            config = (RocketMQConfig(namesrv=where.removeprefix("namesrv="))
                      if where.startswith("namesrv=") else RocketMQConfig(where))
            publisher = RocketMQPublisher(config, [topic])
            try:
                for i in ids:
                    publisher.publish(Message(topic=topic, id=token + i, payload=i.encode()))
            finally:
                publisher.close()
        """)
        done = subprocess.run([sys.executable, "-c", code, self._where(), TOPICS[topic],
                               self.token, *ids], timeout=60, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr

    def close(self) -> None:
        try:
            for item in reversed(self.closing):
                item.close()
        finally:
            self.admin.close()


class AsyncRocketMQUnderTest(RocketMQUnderTest):
    """The asyncio publisher and subscribers (5.x), driven from a private loop."""

    def __init__(self, config: RocketMQConfig, namesrv: str) -> None:
        super().__init__(config, namesrv)
        self.loop = LoopThread()

    def _publisher(self) -> Any:
        return SyncPublisher(AsyncRocketMQPublisher(self.config, list(TOPICS.values())),
                             self.loop)

    def _subscriber(self, topic: str, group: str, invisible_seconds: int) -> Any:
        return SyncSubscriber(AsyncRocketMQSubscriber(
            self.config, topic, group, dead_letter_topic=DEAD_LETTER_TOPIC,
            invisible_seconds=invisible_seconds), self.loop)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.loop.close()


class RocketMQ4UnderTest(RocketMQUnderTest):
    """The 4.x remoting client: the config names the 4.9 name server."""

    features = FEATURES_4

    def start_offsets(self, topic: str) -> dict[MessageQueue, int]:
        """Where a new group starts: 4.x, where the queues stood when the test began
        (the adapter's "beginning" of a topic that held nothing yet)."""
        return self.began[topic]

    def _where(self) -> str:
        return f"namesrv={self.config.namesrv}"


class AsyncRocketMQ4UnderTest(RocketMQ4UnderTest, AsyncRocketMQUnderTest):
    """The asyncio publisher and subscribers on 4.x."""


class TestRocketMQ(TransportContract):
    @pytest.fixture(params=[
        pytest.param("5-sync", marks=pytest.mark.rocketmq),
        pytest.param("5-async", marks=pytest.mark.rocketmq),
        pytest.param("4-sync", marks=pytest.mark.rocketmq4),
        pytest.param("4-async", marks=pytest.mark.rocketmq4),
    ])
    def contract_transport(self, request: pytest.FixtureRequest) -> Iterator[RocketMQUnderTest]:
        form: str = request.param
        under: RocketMQUnderTest
        if form.startswith("5"):
            config = RocketMQConfig(request.getfixturevalue("rocketmq_endpoints"))
            namesrv = request.getfixturevalue("rocketmq5_namesrv")
            under = (RocketMQUnderTest if form == "5-sync" else AsyncRocketMQUnderTest)(
                config, namesrv)
        else:
            namesrv = request.getfixturevalue("rocketmq4_namesrv")
            config = RocketMQConfig(namesrv=namesrv)
            under = (RocketMQ4UnderTest if form == "4-sync" else AsyncRocketMQ4UnderTest)(
                config, namesrv)
        yield under
        under.close()
