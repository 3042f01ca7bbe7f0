"""A consumer-group member over the remoting protocol, as an outbox ``Subscriber``:
pulls from the queues this member owns, keeps the group's offsets on the broker,
rebalances when members come and go, retries through the broker's retry topic and
its delay levels.

Queues are shared out the way RocketMQ's own clients do it (members and queues
sorted, each member a contiguous share), so a group of Python and Java members
splits its queues cleanly. An offset is committed only up to the first message not
yet acknowledged, so a member that dies leaves nothing unhandled behind: its queues'
next owner starts from there (copies that follow are the inbox's to drop).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from outbox.errors import ConfigurationError
from outbox.log import get_logger
from outbox.transport import Delivery

from ..mapping import MessageIdFrom, dead_letter_properties, received_stored
from ..mapping import to_delivery as mapped_delivery
from .client import MessageQueue, RemotingClient
from .connection import RemotingError
from .protocol import Command, RequestCode, ResponseCode, StoredMessage

log = get_logger("outbox.rocketmq.remoting")

#: The broker's delay levels (its default ``messageDelayLevel``), in seconds.
DELAY_LEVELS = (1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800,
                3600, 7200)
#: How often the member looks at the group's members and the queues.
REBALANCE_SECONDS = 5.0
#: How often committed offsets go to the broker (and on close).
COMMIT_SECONDS = 2.0


def delay_level(seconds: float) -> int:
    """The broker's smallest delay level that waits at least ``seconds`` (the last one
    past its longest)."""
    for level, delay in enumerate(DELAY_LEVELS, start=1):
        if delay >= seconds:
            return level
    return len(DELAY_LEVELS)


def allocate(queues: Sequence[MessageQueue], members: Sequence[str], me: str
             ) -> list[MessageQueue]:
    """``me``'s share: members and queues sorted, shares as even as they go, the
    first members one queue more (RocketMQ's "averagely" strategy)."""
    members = sorted(members)
    if me not in members:
        return []
    ordered = sorted(queues, key=lambda q: (q.broker, q.queue_id))
    index, count, n = members.index(me), len(members), len(ordered)
    size = n // count + (1 if index < n % count else 0)
    start = index * (n // count) + min(index, n % count)
    return ordered[start:start + size]


@dataclass
class _QueueState:
    next_offset: int
    in_flight: set[int] = field(default_factory=set)
    committed: int = -1

    def safe_offset(self) -> int:
        """Up to where everything was handled."""
        return min(self.in_flight) if self.in_flight else self.next_offset


@dataclass(frozen=True)
class _Handle:
    topic: str  # the topic pulled from (the group's retry topic, for a retried one)
    queue: MessageQueue
    stored: StoredMessage


class RemotingSubscriber:
    """Receives ``topic`` for consumer ``group`` from 4.x brokers (the name server
    in ``namesrv``); see :class:`outbox_rocketmq.RocketMQSubscriber`, which builds
    one when its config names a name server."""

    def __init__(self, namesrv: str, topic: str, group: str, *, dead_letter_topic: str,
                 message_id_from: MessageIdFrom | None = None, request_timeout: float = 5.0,
                 max_reconsume_times: int = 16) -> None:
        self.topic = topic
        self.group = group
        self.retry_topic = f"%RETRY%{group}"
        self.dead_letter_topic = dead_letter_topic
        self.message_id_from = message_id_from or MessageIdFrom()
        self.max_reconsume_times = max_reconsume_times
        self.client = RemotingClient(namesrv, request_timeout=request_timeout)
        self._lock = threading.Lock()
        self._queues: dict[tuple[str, MessageQueue], _QueueState] = {}
        self._started = False
        self._last_rebalance = 0.0
        self._last_commit = 0.0
        self._turn = 0

    # -- membership ---------------------------------------------------------------------

    def _start(self) -> None:
        if not self._started:
            self.client.subscribe(self.group, self._topics())
            self.client.start()  # heartbeats keep this member in the group
            self._started = True
            self._rebalance()

    def _topics(self) -> list[str]:
        topics = [self.topic]
        try:
            self.client.route(self.retry_topic)
            topics.append(self.retry_topic)
        except ConfigurationError:
            pass  # the broker creates it with the group's first retry
        return topics

    def _members(self, topic: str) -> list[str]:
        route = self.client.route(topic)
        for address in route.brokers.values():
            response = self.client.broker(address).request(
                Command(RequestCode.GET_CONSUMER_LIST_BY_GROUP, {"consumerGroup": self.group}),
                self.client.request_timeout)
            if response.code == ResponseCode.SUCCESS and response.body:
                try:
                    members = json.loads(response.body).get("consumerIdList") or []
                except ValueError:
                    continue
                if members:
                    return [str(m) for m in members]
        return [self.client.client_id]

    def _rebalance(self) -> None:
        topics = self._topics()
        if self.retry_topic in topics and self.retry_topic not in self.client.subscriptions(
                self.group):
            self.client.subscribe(self.group, topics)
        owned: dict[tuple[str, MessageQueue], _QueueState] = {}
        for topic in topics:
            queues = self.client.route(topic, fresh=True).read_queues
            for queue in allocate(queues, self._members(topic), self.client.client_id):
                with self._lock:
                    known = self._queues.get((topic, queue))
                owned[(topic, queue)] = known or _QueueState(self._first_offset(topic, queue))
        with self._lock:
            lost = [k for k in self._queues if k not in owned]
            self._queues = owned
        for topic, queue in lost:
            log.info("rocketmq_queue_released", topic=topic, queue=queue.queue_id,
                     group=self.group)
        self._last_rebalance = time.monotonic()

    def _first_offset(self, topic: str, queue: MessageQueue) -> int:
        """Where the group stands in the queue; a new group starts at the beginning
        (nothing sent before its first member started is skipped)."""
        address = self.client.route(topic).brokers[queue.broker]
        response = self.client.broker(address).request(Command(
            RequestCode.QUERY_CONSUMER_OFFSET,
            {"consumerGroup": self.group, "topic": topic, "queueId": str(queue.queue_id)}),
            self.client.request_timeout)
        if response.code == ResponseCode.SUCCESS:
            return int(response.ext_fields.get("offset", 0))
        return 0

    # -- the Subscriber ---------------------------------------------------------------

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        self._start()
        deadline = time.monotonic() + max(0.0, wait_seconds)
        while True:
            if time.monotonic() - self._last_rebalance > REBALANCE_SECONDS:
                self._rebalance()
            self._commit_due()
            got = self._pull_round(max(1, min(max_messages, 32)))
            if got or time.monotonic() >= deadline:
                return got
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _pull_round(self, want: int) -> list[Delivery]:
        with self._lock:
            owned = list(self._queues.items())
        if not owned:
            return []
        got: list[Delivery] = []
        self._turn += 1
        for i in range(len(owned)):
            (topic, queue), state = owned[(self._turn + i) % len(owned)]
            if len(got) >= want:
                break
            result = self.client.pull(self.group, topic, queue, state.next_offset,
                                      max_messages=want - len(got))
            if result.code == ResponseCode.PULL_OFFSET_MOVED:
                log.warning("rocketmq_offset_moved", topic=topic, queue=queue.queue_id,
                            offset=state.next_offset, to=result.next_offset)
            with self._lock:
                state.next_offset = result.next_offset
                state.in_flight.update(m.queue_offset for m in result.messages)
            got += [self._delivery(topic, queue, m) for m in result.messages]
        return got

    def _delivery(self, topic: str, queue: MessageQueue, stored: StoredMessage) -> Delivery:
        # A retried message comes from the group's retry topic; it is still a
        # message of the original topic.
        received = received_stored(stored, stored.properties.get("RETRY_TOPIC"))
        return mapped_delivery(received, stored.tag, stored.reconsume_times + 1,
                               _Handle(topic, queue, stored), self.message_id_from)

    def _done(self, delivery: Delivery) -> None:
        handle: _Handle = delivery.handle
        with self._lock:
            state = self._queues.get((handle.topic, handle.queue))
            if state is not None:
                state.in_flight.discard(handle.stored.queue_offset)
        self._commit_due()

    def ack(self, delivery: Delivery) -> None:
        self._done(delivery)

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        handle: _Handle = delivery.handle
        stored = handle.stored
        address = self.client.route(handle.topic).brokers[handle.queue.broker]
        response = self.client.broker(address).request(Command(
            RequestCode.CONSUMER_SEND_MSG_BACK, {
                "offset": str(stored.commit_log_offset), "group": self.group,
                "delayLevel": str(delay_level(delay_seconds)), "originMsgId": stored.msg_id,
                "originTopic": delivery.topic, "unitMode": "false",
                "maxReconsumeTimes": str(self.max_reconsume_times)}),
            self.client.request_timeout)
        if response.code != ResponseCode.SUCCESS:
            # Not handed back: keep it in flight, so the offset stays before it and the
            # group's next start delivers it again.
            log.warning("rocketmq_retry_not_sent", code=response.code, remark=response.remark,
                        message_id=delivery.message_id, topic=delivery.topic)
            raise RemotingError(f"the broker did not take message {delivery.message_id} back "
                                f"for a retry (code {response.code}: {response.remark})")
        self._done(delivery)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        stored: StoredMessage = delivery.handle.stored
        properties = dead_letter_properties(
            stored.properties, message_id=delivery.message_id, original_id=stored.msg_id,
            reason=reason, group=self.group, topic=self.topic)
        self.client.send(self.dead_letter_topic, stored.body or b"-", properties,
                         tag=stored.tag, keys=stored.keys)
        self._done(delivery)
        log.error("rocketmq_dead_lettered", reason=reason, message_id=delivery.message_id,
                  topic=self.topic, group=self.group)

    # -- offsets --------------------------------------------------------------------------

    def _commit_due(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_commit < COMMIT_SECONDS:
            return
        self._last_commit = time.monotonic()
        with self._lock:
            due = [(topic, queue, state.safe_offset()) for (topic, queue), state
                   in self._queues.items() if state.safe_offset() != state.committed]
        for topic, queue, offset in due:
            try:
                address = self.client.route(topic).brokers[queue.broker]
                self.client.broker(address).oneway(Command(RequestCode.UPDATE_CONSUMER_OFFSET, {
                    "consumerGroup": self.group, "topic": topic,
                    "queueId": str(queue.queue_id), "commitOffset": str(offset)}))
            except (RemotingError, KeyError) as exc:
                log.warning("rocketmq_offset_not_committed", topic=topic,
                            queue=queue.queue_id, error=str(exc))
                continue
            with self._lock:
                state = self._queues.get((topic, queue))
                if state is not None:
                    state.committed = offset

    def close(self) -> None:
        if self._started:
            self._commit_due(force=True)
        self.client.close()
