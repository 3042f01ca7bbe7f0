"""Test helpers for users' unit tests (and ours): a real in-memory broker.

:class:`InMemoryBroker` keeps every published message per topic and, per consumer
group, the same delivery state the SQL transport keeps: attempts, visibility,
acknowledgement, retry delay and dead letters. It is thread-safe and lives only
as long as the process.

A message with a delivery time (the ``outbox-deliver-at`` header, see
``Outbox.send(deliver_after=...)``) is not handed out before that time, by the wall
clock (UTC), as the SQL transport does; a waiting fetch picks it up within 50 ms
after it. There is no fake clock: a test of a delay waits it out, so keep it short.

The broker is itself the sync publisher; :meth:`InMemoryBroker.subscriber` hands
out sync subscribers. :meth:`InMemoryBroker.async_publisher` and
:meth:`InMemoryBroker.async_subscriber` are their asyncio forms over the same
state, so a test may publish sync and consume async, or the other way round.

:class:`MinimalSubscriber` (and :class:`AsyncMinimalSubscriber`) wraps any of them
to leave only fetch, ack and close, every delivery's ``attempt`` 1: a broker like
Kafka, for testing a consumer where the idempotent consumer holds, counts and keeps
dead letters itself. :mod:`outbox.testing.contract` is the transport contract, for
a test suite of an adapter of one's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..envelope import DELIVER_AT_HEADER, delivery_time
from ..errors import BrokerUnavailableError, PublishError
from ..message import Message
from ..schema import utcnow
from ..sql_queue import PollWait
from ..transport import Delivery
from ..typing import AsyncSubscriber, Subscriber

#: How often a waiting fetch looks again without being woken (a retry delay ending).
_POLL_SECONDS = 0.05


def broken_message(**fields: Any) -> Message:
    """A :class:`~outbox.Message` that slipped past validation (payload ``None`` unless
    given): what an adapter's publisher must refuse with PublishError, and with it the
    rest of its batch, before anything is sent."""
    broken = object.__new__(Message)
    values: dict[str, Any] = {"topic": "t", "payload": None, "id": "x", "key": None,
                              "tag": None, "headers": {}, **fields}
    for name, value in values.items():
        object.__setattr__(broken, name, value)
    return broken


@dataclass
class _State:
    attempts: int = 0
    visible_at: float = 0.0
    status: str = "ready"
    last_error: str | None = None


@dataclass
class _Group:
    states: dict[int, _State] = field(default_factory=dict)


class _Subscription:
    """What a subscriber of either form is: one topic, one group, one timeout."""

    #: Delivery.attempt is the broker's own count (outbox.typing.CountsDeliveries).
    counts_deliveries = True

    def __init__(self, broker: InMemoryBroker, topic: str, group: str,
                 visibility_timeout: float) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        self.visibility_timeout = visibility_timeout


class InMemoryBroker:
    """Publisher and subscriber factory in memory.

    ``fail_next(n)`` makes the next ``n`` publishes (sync or async) raise
    BrokerUnavailableError, to test a relay's backoff. ``deliver_again(message_id)``
    puts a copy of a published message back on its topic, to test de-duplication.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._log: list[Delivery] = []
        self._groups: dict[tuple[str, str], _Group] = {}
        self._fail_next = 0
        # Wake-up calls of async fetches waiting in some event loop.
        self._watchers: set[Callable[[], object]] = set()
        self.published: list[Message] = []

    # publisher side
    def publish(self, message: Message) -> None:
        self._accept([message], validate=False)

    def publish_batch(self, messages: Sequence[Message]) -> None:
        """Publish all of ``messages`` or, if told to fail, none of them."""
        self._accept(messages, validate=True)

    def _accept(self, messages: Sequence[Message], *, validate: bool) -> None:
        with self._lock:
            if self._fail_next > 0:
                self._fail_next -= 1
                raise BrokerUnavailableError("in-memory broker told to fail this publish")
            for message in messages if validate else ():
                if not isinstance(message.payload, bytes) or not message.id:
                    # Like a database refusing one row: the whole batch is refused.
                    raise PublishError(f"in-memory broker refused message {message.id!r}")
            for message in messages:
                self.published.append(message)
                self._append(Delivery(topic=message.topic, payload=message.payload,
                                      message_id=message.id, attempt=0, key=message.key,
                                      tag=message.tag, headers=dict(message.headers)))

    def put_raw(self, delivery: Delivery) -> None:
        """Put a raw (possibly malformed) delivery on its topic."""
        with self._lock:
            self._append(delivery)

    def _append(self, delivery: Delivery) -> None:
        self._log.append(delivery)
        self._changed()

    def _changed(self) -> None:
        """Wake every waiting fetch, sync or async (the lock is held)."""
        self._lock.notify_all()
        for wake in self._watchers:
            wake()

    @contextlib.contextmanager
    def _watching(self, wake: Callable[[], object]) -> Iterator[None]:
        with self._lock:
            self._watchers.add(wake)
        try:
            yield
        finally:
            with self._lock:
                self._watchers.discard(wake)

    def deliver_again(self, message_id: str) -> None:
        with self._lock:
            original = next(d for d in self._log if d.message_id == message_id)
            self._append(original)

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._fail_next = n

    def close(self) -> None:
        pass

    def messages(self, topic: str) -> list[Message]:
        with self._lock:
            return [m for m in self.published if m.topic == topic]

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> InMemorySubscriber:
        return InMemorySubscriber(self, topic, group, visibility_timeout)

    def async_publisher(self) -> InMemoryAsyncPublisher:
        """An AsyncPublisher (and AsyncBatchPublisher) onto this broker."""
        return InMemoryAsyncPublisher(self)

    def async_subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                         ) -> InMemoryAsyncSubscriber:
        """An AsyncSubscriber of ``topic`` for ``group``: it shares deliveries with the
        sync subscribers of that group, and its fetch waits with asyncio."""
        return InMemoryAsyncSubscriber(self, topic, group, visibility_timeout)

    def dead_letters(self, topic: str, group: str) -> list[tuple[Delivery, str | None]]:
        with self._lock:
            g = self._groups.get((topic, group), _Group())
            return [(self._log[i], s.last_error) for i, s in sorted(g.states.items())
                    if s.status == "dead"]

    # the state machine of deliveries, for subscribers of both forms
    def _fetch(self, sub: _Subscription, max_messages: int) -> list[Delivery]:
        """Claim up to ``max_messages`` visible deliveries (the lock is held)."""
        now = time.monotonic()
        wall: dt.datetime | None = None
        g = self._groups.setdefault((sub.topic, sub.group), _Group())
        out: list[Delivery] = []
        for index, d in enumerate(self._log):
            if d.topic != sub.topic:
                continue
            state = g.states.setdefault(index, _State())
            if state.status != "ready" or state.visible_at > now:
                continue
            if DELIVER_AT_HEADER in d.headers:
                due = delivery_time(d.headers)
                wall = wall or utcnow()
                if due is not None and due > wall:
                    continue  # not before its delivery time
            state.attempts += 1
            state.visible_at = now + sub.visibility_timeout
            out.append(Delivery(topic=d.topic, payload=d.payload, message_id=d.message_id,
                                attempt=state.attempts, key=d.key, tag=d.tag, headers=d.headers,
                                handle=index))
            if len(out) >= max_messages:
                break
        return out

    def _state(self, sub: _Subscription, delivery: Delivery) -> _State:
        return self._groups[(sub.topic, sub.group)].states[delivery.handle]

    def _ack(self, sub: _Subscription, delivery: Delivery) -> None:
        with self._lock:
            self._state(sub, delivery).status = "done"

    def _retry(self, sub: _Subscription, delivery: Delivery, delay_seconds: float,
               error: str) -> None:
        with self._lock:
            state = self._state(sub, delivery)
            state.visible_at = time.monotonic() + delay_seconds
            state.last_error = error
            self._changed()

    def _dead_letter(self, sub: _Subscription, delivery: Delivery, reason: str) -> None:
        with self._lock:
            state = self._state(sub, delivery)
            state.status = "dead"
            state.last_error = reason


class InMemorySubscriber(_Subscription):
    """Subscriber of one topic for one consumer group of the broker."""

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        wait = PollWait(wait_seconds, _POLL_SECONDS)
        with self.broker._lock:
            while True:
                found = self.broker._fetch(self, max_messages)
                pause = wait.pause(found)
                if pause is None:
                    return found
                self.broker._lock.wait(pause)

    def ack(self, delivery: Delivery) -> None:
        self.broker._ack(self, delivery)

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        self.broker._retry(self, delivery, delay_seconds, error)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.broker._dead_letter(self, delivery, reason)

    def close(self) -> None:
        pass


class InMemoryAsyncPublisher:
    """The broker's publishing, awaited; ``fail_next`` applies to it as well."""

    def __init__(self, broker: InMemoryBroker) -> None:
        self.broker = broker

    async def publish(self, message: Message) -> None:
        self.broker.publish(message)

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        """Publish all of ``messages`` or, if told to fail, none of them."""
        self.broker.publish_batch(messages)

    async def close(self) -> None:
        pass


class InMemoryAsyncSubscriber(_Subscription):
    """AsyncSubscriber of one topic for one consumer group of the broker."""

    async def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        """Deliveries as the sync fetch hands them out; the wait is an asyncio one,
        woken by a publish from this loop or from any thread."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:  # called by publishers, from any thread
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(woken.set)

        wait = PollWait(wait_seconds, _POLL_SECONDS)
        # The broker's lock is only ever held briefly (a sync fetch releases it while
        # it waits), so taking it here does not stall the event loop.
        with self.broker._watching(wake):
            while True:
                woken.clear()  # before looking: a publish after this wakes the wait below
                with self.broker._lock:
                    found = self.broker._fetch(self, max_messages)
                pause = wait.pause(found)
                if pause is None:
                    return found
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), pause)

    async def ack(self, delivery: Delivery) -> None:
        self.broker._ack(self, delivery)

    async def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        self.broker._retry(self, delivery, delay_seconds, error)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.broker._dead_letter(self, delivery, reason)

    async def close(self) -> None:
        pass


class MinimalSubscriber:
    """``inner`` with no optional ability: fetch, ack and close only, and every
    delivery's ``attempt`` 1, as Kafka's subscriber has it."""

    def __init__(self, inner: Subscriber) -> None:
        self.inner = inner

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        return [replace(d, attempt=1) for d in self.inner.fetch(max_messages, wait_seconds)]

    def ack(self, delivery: Delivery) -> None:
        self.inner.ack(delivery)

    def close(self) -> None:
        self.inner.close()


class MinimalSubscriberWithDeadLetters(MinimalSubscriber):
    """:class:`MinimalSubscriber` that keeps the inner subscriber's dead-letter
    destination (Kafka's dead-letter topic, say)."""

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.inner.dead_letter(delivery, reason)  # type: ignore[attr-defined]


class AsyncMinimalSubscriber:
    """:class:`MinimalSubscriber` for an asyncio subscriber."""

    def __init__(self, inner: AsyncSubscriber) -> None:
        self.inner = inner

    async def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        found = await self.inner.fetch(max_messages, wait_seconds)
        return [replace(d, attempt=1) for d in found]

    async def ack(self, delivery: Delivery) -> None:
        await self.inner.ack(delivery)

    async def close(self) -> None:
        await self.inner.close()
