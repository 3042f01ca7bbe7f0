"""A consumer-group member over the remoting protocol, as an outbox ``Subscriber``:
pulls from the queues this member owns, keeps the group's offsets on the broker,
rebalances when members come and go, retries through the broker's retry topic and
its delay levels, or, ``orderly``, in per-key order.

Queues are shared out the way RocketMQ's own clients do it (members and queues
sorted, each member a contiguous share), so a group of Python and Java members
splits its queues cleanly. An offset is committed only up to the first message not
yet acknowledged, so a member that dies leaves nothing unhandled behind: its queues'
next owner starts from there (copies that follow are the inbox's to drop).

Pulls are long polls: each owned queue has at most one pull out, which the broker
holds until a message arrives (or :data:`LONG_POLL_SECONDS` pass), so an idle member
sends a request per queue every few seconds, and a new message is handed out as
soon as the broker has it. A fetch waits for those answers at most its
``wait_seconds``; a pull still out then stays out for the next fetch.

Orderly (:class:`RemotingSubscriber` with ``orderly=True``): the member locks its
queues on the broker (LOCK_BATCH_MQ, renewed every :data:`LOCK_RENEW_SECONDS` well
inside the broker's 60 s) and consumes only those it holds; a queue it gives up in
a rebalance, or all of them on close, is committed and unlocked at once. Of each
key (a queue holds all of a key's messages when the producer picked the queue by
the key's hash, as outbox does) one message is out at a time: the next only once
that one was acknowledged or dead-lettered. A retried message waits its delay here,
in memory, holding its key (the retry topic would break the order), while the other
keys of the queue go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, wait
from dataclasses import dataclass, field
from typing import Any

from outbox.errors import ConfigurationError, OutboxError
from outbox.log import get_logger
from outbox.transport import Delivery

from ..mapping import MessageIdFrom, dead_letter_properties, received_stored
from ..mapping import to_delivery as mapped_delivery
from .client import (
    DELAY_LEVELS,
    MessageQueue,
    PullResult,
    RemotingClient,
    level_at_least,
    pull_timeout,
)
from .connection import RemotingError
from .protocol import Command, ProtocolError, RequestCode, ResponseCode, StoredMessage

log = get_logger("outbox.rocketmq.remoting")

#: How often the member looks at the group's members and the queues.
REBALANCE_SECONDS = 5.0
#: After this member's first retry of a group without a retry topic yet, how often a
#: fetch looks for the topic the broker creates (instead of at the next rebalance).
RETRY_TOPIC_LOOK_SECONDS = 0.5
#: How often committed offsets go to the broker (and on close).
COMMIT_SECONDS = 2.0
#: How long the broker holds a pull when the queue has nothing new (the Java push
#: consumer's 15 s).
LONG_POLL_SECONDS = 15.0
#: A pull that came back empty sooner than this is not sent again before it passed
#: (a broker that does not hold pulls is not asked in a busy loop).
EMPTY_PULL_PAUSE_SECONDS = 1.0
#: After a failed pull, the queue's next pull waits this long.
PULL_ERROR_PAUSE_SECONDS = 1.0
#: Messages asked for in one pull.
PULL_BATCH = 32
#: Orderly: how often the member renews its queue locks (the broker drops a lock not
#: renewed for 60 s), how long it counts a lock as held after the last renewal (it
#: stops handing out a queue's messages then, well before another member may take
#: it), and how often it tries again for a queue another member still holds.
LOCK_RENEW_SECONDS = 20.0
LOCK_VALID_SECONDS = 30.0
LOCK_RETRY_SECONDS = 1.0
#: Orderly: messages of one queue kept in memory at most, waiting for their key.
ORDERLY_BUFFER = 512


def delay_level(seconds: float) -> int:
    """The broker's smallest delay level that waits at least ``seconds`` (the last one
    past its longest)."""
    return level_at_least(seconds) or len(DELAY_LEVELS)


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


QueueKey = tuple[str, MessageQueue]  # (topic, queue)


def _by_topic(keys: Iterable[QueueKey]) -> dict[str, list[MessageQueue]]:
    """Queues grouped by their topic."""
    grouped: dict[str, list[MessageQueue]] = {}
    for topic, queue in keys:
        grouped.setdefault(topic, []).append(queue)
    return grouped


@dataclass(eq=False)
class _QueueState:
    next_offset: int
    #: Offsets pulled and not yet acknowledged (handed out or still buffered).
    in_flight: set[int] = field(default_factory=set)
    committed: int = -1
    #: Pulled, not handed out yet, in queue order.
    buffer: list[Delivery] = field(default_factory=list)
    #: The pull out for this queue, when it was sent and when it is given up.
    pull: Future[PullResult] | None = None
    pull_sent: float = 0.0
    pull_deadline: float = 0.0
    not_before: float = 0.0
    #: Orderly: the key of each message out (handed out, or waiting for its retry),
    #: and the retries waiting: offset -> (when, the next delivery).
    busy: dict[str, int] = field(default_factory=dict)
    held: dict[int, tuple[float, Delivery]] = field(default_factory=dict)

    def safe_offset(self) -> int:
        """Up to where everything was handled."""
        return min(self.in_flight) if self.in_flight else self.next_offset

    def drop_pull(self) -> None:
        if self.pull is not None:
            self.pull.cancel()
            self.pull = None


@dataclass(frozen=True)
class _Handle:
    topic: str  # the topic pulled from (the group's retry topic, for a retried one)
    queue: MessageQueue
    stored: StoredMessage
    state: _QueueState  # the queue's state when it was pulled (gone if the queue went)


class RemotingSubscriber:
    """Receives ``topic`` for consumer ``group`` from 4.x brokers (the name server
    in ``namesrv``); see :class:`outbox_rocketmq.RocketMQSubscriber`, which builds
    one when its config names a name server. ``orderly``: per-key order (see the
    module's description)."""

    #: Delivery.attempt is one more than the broker's reconsume count, which grows
    #: only with a send-back (retry), not when a message comes again after its member
    #: left the group or crashed: not a count of deliveries, so the consumer counts
    #: failed attempts in its own database (outbox.typing.CountsDeliveries).
    counts_deliveries = False

    def __init__(self, namesrv: str, topic: str, group: str, *, dead_letter_topic: str,
                 message_id_from: MessageIdFrom | None = None, request_timeout: float = 5.0,
                 max_reconsume_times: int = 16, orderly: bool = False) -> None:
        self.topic = topic
        self.group = group
        self.retry_topic = f"%RETRY%{group}"
        self.dead_letter_topic = dead_letter_topic
        self.message_id_from = message_id_from or MessageIdFrom()
        self.max_reconsume_times = max_reconsume_times
        self.orderly = orderly
        self.client = RemotingClient(namesrv, request_timeout=request_timeout)
        self.client.on_consumers_changed = self._members_changed
        self._lock = threading.Lock()
        #: The queues this member consumes (orderly: those allocated and locked).
        self._queues: dict[QueueKey, _QueueState] = {}
        #: Orderly: the queues allocated to this member, and until when each lock
        #: counts as held.
        self._allocated: set[QueueKey] = set()
        self._locked_until: dict[QueueKey, float] = {}
        #: One lock or unlock exchange with the brokers at a time (a renewal must not
        #: lock again a queue a rebalance is giving up).
        self._lock_io = threading.Lock()
        self._last_lock = 0.0
        self._started = False
        self._closed = False
        self._last_rebalance = 0.0
        self._rebalance_now = False
        #: When to look again for the retry topic a retry has made the broker create
        #: (0: not looking).
        self._retry_topic_due = 0.0
        self._retry_topic_until = 0.0
        self._last_commit = 0.0
        self._turn = 0
        self._wake: Future[None] = Future()
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    # -- membership ---------------------------------------------------------------------

    def _start(self) -> None:
        if self._closed:
            raise RemotingError(f"the subscriber of {self.topic} for group {self.group} "
                                "is closed")
        if not self._started:
            self.client.subscribe(self.group, self._topics())
            self.client.start()  # heartbeats keep this member in the group
            self._started = True
            self._rebalance()
            if self.orderly and self._renewer is None:
                self._renewer = threading.Thread(target=self._renew, daemon=True,
                                                 name="outbox-rmq-lock")
                self._renewer.start()

    def _members_changed(self, group: str) -> None:
        if group in ("", self.group):
            self._rebalance_now = True
            self._poke()

    def _poke(self) -> None:
        """Wake a fetch that waits (from any thread, holding any lock)."""
        with contextlib.suppress(InvalidStateError):  # woken already
            self._wake.set_result(None)

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
        self._rebalance_now = False
        topics = self._topics()
        if self.retry_topic in topics:
            self._retry_topic_due = 0.0
        if self.retry_topic in topics and self.retry_topic not in self.client.subscriptions(
                self.group):
            self.client.subscribe(self.group, topics)
        allocated: list[QueueKey] = []
        for topic in topics:
            queues = self.client.route(topic, fresh=True).read_queues
            allocated += [(topic, q) for q in
                          allocate(queues, self._members(topic), self.client.client_id)]
        self._last_rebalance = time.monotonic()
        if self.orderly:
            self._rebalance_orderly(set(allocated))
            return
        owned: dict[QueueKey, _QueueState] = {}
        for topic, queue in allocated:
            with self._lock:
                known = self._queues.get((topic, queue))
            owned[(topic, queue)] = known or _QueueState(self._first_offset(topic, queue))
        with self._lock:
            lost = [(k, s) for k, s in self._queues.items() if k not in owned]
            self._queues = owned
        for (topic, queue), state in lost:
            state.drop_pull()
            log.info("rocketmq_queue_released", topic=topic, queue=queue.queue_id,
                     group=self.group)

    def _retry_topic_routed(self) -> bool:
        """After a first retry: whether the retry topic the broker made has a route now
        (a lookup at the name server when one is due; the rebalance then takes it in)."""
        now = time.monotonic()
        if not self._retry_topic_due or now < self._retry_topic_due:
            return False
        if self.retry_topic in self._topics():
            return True
        # Not routed yet: look again soon, for a while (then at each rebalance).
        self._retry_topic_due = (now + RETRY_TOPIC_LOOK_SECONDS
                                 if now < self._retry_topic_until else 0.0)
        return False

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

    # -- orderly: locks -------------------------------------------------------------------

    def _rebalance_orderly(self, allocated: set[QueueKey]) -> None:
        with self._lock_io:
            with self._lock:
                self._allocated = allocated
                lost = [(k, s) for k, s in self._queues.items() if k not in allocated]
                for key, _ in lost:
                    del self._queues[key]
                    self._locked_until.pop(key, None)
            if lost:
                self._release(lost)
            self._lock_allocated()

    def _release(self, queues: list[tuple[QueueKey, _QueueState]]) -> None:
        """Give queues up: their offsets committed (awaited, so that the next owner
        reads them; after a failure the rest go one-way, so that a broker that does not
        answer holds up a close once), then their locks."""
        wait_answer = True
        for (topic, queue), state in queues:
            state.drop_pull()
            try:
                self._commit_one(topic, queue, state.safe_offset(), wait_answer=wait_answer)
            except (RemotingError, KeyError) as exc:
                wait_answer = False
                log.warning("rocketmq_offset_not_committed", topic=topic,
                            queue=queue.queue_id, error=str(exc))
            log.info("rocketmq_queue_released", topic=topic, queue=queue.queue_id,
                     group=self.group)
        for topic, mqs in _by_topic(key for key, _ in queues).items():
            self.client.unlock_queues(self.group, topic, mqs)

    def _lock_allocated(self) -> None:
        """Lock (or renew) every allocated queue; a queue newly held starts from the
        group's offset as the broker has it now (its last owner committed before it
        unlocked); one whose lock went to another member is no longer consumed. The
        caller holds ``_lock_io``."""
        self._last_lock = time.monotonic()
        with self._lock:
            allocated = set(self._allocated)
        for topic, mqs in _by_topic(allocated).items():
            asked = time.monotonic()
            locked = self.client.lock_queues(self.group, topic, mqs)
            for queue in mqs:
                key = (topic, queue)
                with self._lock:
                    had = key in self._queues
                if queue in locked:
                    state = None if had else self._locked_state(topic, queue)
                    with self._lock:
                        if key in self._allocated:
                            self._locked_until[key] = asked + LOCK_VALID_SECONDS
                            if state is not None and key not in self._queues:
                                self._queues[key] = state
                                log.info("rocketmq_queue_locked", topic=topic,
                                         queue=queue.queue_id, group=self.group)
                elif had:
                    # Not ours (any more): another member holds it, or the broker was
                    # not reached. Nothing more is handed out, what was pulled is
                    # forgotten, and a lock taken again starts from the committed offset.
                    with self._lock:
                        state = self._queues.pop(key, None)
                        self._locked_until.pop(key, None)
                    if state is not None:
                        state.drop_pull()
                        log.warning("rocketmq_queue_lock_lost", topic=topic,
                                    queue=queue.queue_id, group=self.group)

    def _locked_state(self, topic: str, queue: MessageQueue) -> _QueueState | None:
        try:
            return _QueueState(self._first_offset(topic, queue))
        except RemotingError as exc:
            log.warning("rocketmq_offset_not_read", topic=topic, queue=queue.queue_id,
                        error=str(exc))
            return None

    def _locks_due(self) -> bool:
        """Orderly: an allocated queue not held yet is asked for again every second."""
        with self._lock:
            missing = any(k not in self._queues for k in self._allocated)
        return missing and time.monotonic() - self._last_lock >= LOCK_RETRY_SECONDS

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_RENEW_SECONDS):
            try:
                with self._lock_io:
                    if not self._stop.is_set():
                        self._lock_allocated()
            except Exception as exc:  # the broker may be restarting: next time
                log.warning("rocketmq_lock_renewal_failed",
                            error=f"{type(exc).__name__}: {exc}")

    def _lock_held(self, key: QueueKey, now: float) -> bool:
        return not self.orderly or self._locked_until.get(key, 0.0) > now

    # -- the Subscriber ---------------------------------------------------------------

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        self._start()
        want = max(1, min(max_messages, PULL_BATCH))
        began = time.monotonic()
        deadline = began + max(0.0, wait_seconds)
        errors: list[BaseException] = []
        while not self._closed:
            with self._lock:
                if self._wake.done():
                    self._wake = Future()
                wake = self._wake
            if (self._rebalance_now or self._retry_topic_routed()
                    or time.monotonic() - self._last_rebalance > REBALANCE_SECONDS):
                self._rebalance()
            elif self.orderly and self._locks_due():
                with self._lock_io:
                    self._lock_allocated()
            self._commit_due()
            self._harvest(errors)
            got = self._hand_out(want)
            if got:
                return got
            self._send_pulls(errors)
            now = time.monotonic()
            # Pulls just sent get a moment to answer even when the caller would not wait.
            until = max(deadline, began + 0.05) if not errors else deadline
            if now >= until:
                break
            waiting: list[Future[Any]] = [wake]
            next_at = until
            with self._lock:
                for state in self._queues.values():
                    if state.pull is not None:
                        waiting.append(state.pull)
                        next_at = min(next_at, state.pull_deadline)
                    elif state.not_before > now:
                        next_at = min(next_at, state.not_before)
                    for when, _ in state.held.values():
                        next_at = min(next_at, when)
                if self.orderly and any(k not in self._queues for k in self._allocated):
                    next_at = min(next_at, self._last_lock + LOCK_RETRY_SECONDS)
            next_at = min(next_at, self._last_rebalance + REBALANCE_SECONDS)
            if self._retry_topic_due:
                next_at = min(next_at, self._retry_topic_due)
            wait(waiting, timeout=max(0.0, next_at - now), return_when=FIRST_COMPLETED)
        if errors and not self._closed:
            raise errors[0]
        return []

    def _send_pulls(self, errors: list[BaseException]) -> None:
        """A pull for each queue that has none out and room for what it brings."""
        now = time.monotonic()
        wait_ms = int(LONG_POLL_SECONDS * 1000)
        with self._lock:
            due = [(k, s) for k, s in self._queues.items()
                   if s.pull is None and s.not_before <= now and self._lock_held(k, now)
                   and len(s.buffer) < (ORDERLY_BUFFER if self.orderly else 1)]
        for (topic, queue), state in due:
            try:
                pull = self.client.pull_async(self.group, topic, queue, state.next_offset,
                                              max_messages=PULL_BATCH, wait_ms=wait_ms)
            except (RemotingError, OutboxError, ProtocolError) as exc:
                errors.append(exc)
                state.not_before = now + PULL_ERROR_PAUSE_SECONDS
                continue
            with self._lock:
                state.pull = pull
                state.pull_sent = now
                state.pull_deadline = now + pull_timeout(self.client.request_timeout, wait_ms)
            pull.add_done_callback(lambda _f: self._poke())

    def _harvest(self, errors: list[BaseException]) -> None:
        """What the pulls out brought: messages into their queue's buffer."""
        now = time.monotonic()
        with self._lock:
            items = [(k, s) for k, s in self._queues.items() if s.pull is not None]
        for (topic, queue), state in items:
            pull = state.pull
            assert pull is not None
            if not pull.done():
                if now > state.pull_deadline:
                    state.drop_pull()
                    state.not_before = now + PULL_ERROR_PAUSE_SECONDS
                    errors.append(RemotingError(
                        f"RocketMQ did not answer a pull of {topic} queue {queue.queue_id} "
                        f"in {now - state.pull_sent:.0f} s"))
                continue
            state.pull = None
            try:
                result = pull.result()
            except (RemotingError, OutboxError, ProtocolError) as exc:
                errors.append(exc)
                state.not_before = now + PULL_ERROR_PAUSE_SECONDS
                continue
            if result.code == ResponseCode.PULL_OFFSET_MOVED:
                log.warning("rocketmq_offset_moved", topic=topic, queue=queue.queue_id,
                            offset=state.next_offset, to=result.next_offset)
            elif not result.messages and now - state.pull_sent < EMPTY_PULL_PAUSE_SECONDS:
                state.not_before = state.pull_sent + EMPTY_PULL_PAUSE_SECONDS
            deliveries = [self._delivery(topic, queue, m, state) for m in result.messages]
            with self._lock:
                state.next_offset = result.next_offset
                state.in_flight.update(m.queue_offset for m in result.messages)
                state.buffer += deliveries

    def _hand_out(self, want: int) -> list[Delivery]:
        now = time.monotonic()
        got: list[Delivery] = []
        with self._lock:
            owned = list(self._queues.items())
            if not owned:
                return []
            self._turn += 1
            for i in range(len(owned)):
                key, state = owned[(self._turn + i) % len(owned)]
                if len(got) >= want:
                    break
                if not self.orderly:
                    take, state.buffer = (state.buffer[:want - len(got)],
                                          state.buffer[want - len(got):])
                    got += take
                elif self._lock_held(key, now):
                    got += self._next_in_order(state, want - len(got), now)
        return got

    @staticmethod
    def _next_in_order(state: _QueueState, room: int, now: float) -> list[Delivery]:
        """Orderly: retries whose time came, then the buffer's first message of each
        key that has none out (a message without a key is its own)."""
        got: list[Delivery] = []
        for offset in sorted(state.held):
            when, delivery = state.held[offset]
            if when <= now and len(got) < room:
                del state.held[offset]
                got.append(delivery)
        keep: list[Delivery] = []
        for delivery in state.buffer:
            key = delivery.key
            if len(got) >= room or (key is not None and key in state.busy):
                keep.append(delivery)
                continue
            if key is not None:
                state.busy[key] = delivery.handle.stored.queue_offset
            got.append(delivery)
        state.buffer = keep
        return got

    def _delivery(self, topic: str, queue: MessageQueue, stored: StoredMessage,
                  state: _QueueState) -> Delivery:
        # A retried message comes from the group's retry topic; it is still a
        # message of the original topic.
        received = received_stored(stored, stored.properties.get("RETRY_TOPIC"))
        return mapped_delivery(received, stored.tag, stored.reconsume_times + 1,
                               _Handle(topic, queue, stored, state), self.message_id_from)

    def _done(self, delivery: Delivery) -> None:
        handle: _Handle = delivery.handle
        offset = handle.stored.queue_offset
        with self._lock:
            state = handle.state
            state.in_flight.discard(offset)
            state.held.pop(offset, None)
            if delivery.key is not None and state.busy.get(delivery.key) == offset:
                del state.busy[delivery.key]
        self._commit_due()

    def ack(self, delivery: Delivery) -> None:
        self._done(delivery)

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        handle: _Handle = delivery.handle
        if self.orderly:
            # Handed out again from here after the delay; its key waits meanwhile.
            again = dataclasses.replace(delivery, attempt=delivery.attempt + 1)
            with self._lock:
                if handle.stored.queue_offset in handle.state.in_flight:
                    handle.state.held[handle.stored.queue_offset] = (
                        time.monotonic() + max(0.0, delay_seconds), again)
            self._poke()
            return
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
        if not self._retry_topic_due and self.retry_topic not in self.client.subscriptions(
                self.group):
            # The group's first retry: the broker creates the retry topic now. Look for
            # it from the next fetch on, not only at the next rebalance (up to 5 s).
            self._retry_topic_due = time.monotonic()
            self._retry_topic_until = self._retry_topic_due + REBALANCE_SECONDS * 6
            self._poke()

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
            due = [(topic, queue, state, state.safe_offset()) for (topic, queue), state
                   in self._queues.items() if state.safe_offset() != state.committed]
        for topic, queue, state, offset in due:
            try:
                self._commit_one(topic, queue, offset)
            except (RemotingError, KeyError) as exc:
                log.warning("rocketmq_offset_not_committed", topic=topic,
                            queue=queue.queue_id, error=str(exc))
                continue
            with self._lock:
                state.committed = offset

    def _commit_one(self, topic: str, queue: MessageQueue, offset: int, *,
                    wait_answer: bool = False) -> None:
        address = self.client.route(topic).brokers[queue.broker]
        command = Command(RequestCode.UPDATE_CONSUMER_OFFSET, {
            "consumerGroup": self.group, "topic": topic,
            "queueId": str(queue.queue_id), "commitOffset": str(offset)})
        conn = self.client.broker(address)
        if wait_answer:
            conn.request(command, min(self.client.request_timeout, 3.0))
        else:
            conn.oneway(command)

    @property
    def requests_sent(self) -> dict[int, int]:
        """Requests this member sent to the name server and brokers, by request code."""
        return dict(self.client.sent)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._poke()
        if self._started:
            if self.orderly:
                with self._lock_io:
                    with self._lock:
                        queues = list(self._queues.items())
                        self._queues = {}
                        self._allocated = set()
                    self._release(queues)
            else:
                self._commit_due(force=True)
        with self._lock:
            left = list(self._queues.values())
        for state in left:
            state.drop_pull()
        self.client.close()
        if self._renewer is not None and threading.current_thread() is not self._renewer:
            self._renewer.join(2.0)
