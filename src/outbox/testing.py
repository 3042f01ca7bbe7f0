"""Test helpers for users' unit tests (and ours): a real in-memory broker.

:class:`InMemoryBroker` keeps every published message per topic and, per consumer
group, the same delivery state the SQL transport keeps: attempts, visibility,
acknowledgement, retry delay and dead letters. It is thread-safe and lives only
as long as the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import BrokerUnavailableError, PublishError
from .message import Message
from .transport import Delivery


@dataclass
class _State:
    attempts: int = 0
    visible_at: float = 0.0
    status: str = "ready"
    last_error: str | None = None


@dataclass
class _Group:
    states: dict[int, _State] = field(default_factory=dict)


class InMemoryBroker:
    """Publisher and subscriber factory in memory.

    ``fail_next(n)`` makes the next ``n`` publishes raise BrokerUnavailableError, to
    test a relay's backoff. ``deliver_again(message_id)`` puts a copy of a published
    message back on its topic, to test de-duplication.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._log: list[Delivery] = []
        self._groups: dict[tuple[str, str], _Group] = {}
        self._fail_next = 0
        self.published: list[Message] = []

    # publisher side
    def publish(self, message: Message) -> None:
        with self._lock:
            if self._fail_next > 0:
                self._fail_next -= 1
                raise BrokerUnavailableError("in-memory broker told to fail this publish")
            self.published.append(message)
            self._append(Delivery(topic=message.topic, payload=message.payload,
                                  message_id=message.id, attempt=0, key=message.key,
                                  tag=message.tag, headers=dict(message.headers)))

    def publish_batch(self, messages: Sequence[Message]) -> None:
        """Publish all of ``messages`` or, if told to fail, none of them."""
        with self._lock:
            if self._fail_next > 0:
                self._fail_next -= 1
                raise BrokerUnavailableError("in-memory broker told to fail this publish")
            for message in messages:
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
        self._lock.notify_all()

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

    def dead_letters(self, topic: str, group: str) -> list[tuple[Delivery, str | None]]:
        with self._lock:
            g = self._groups.get((topic, group), _Group())
            return [(self._log[i], s.last_error) for i, s in sorted(g.states.items())
                    if s.status == "dead"]

    def _fetch(self, sub: InMemorySubscriber, max_messages: int) -> list[Delivery]:
        now = time.monotonic()
        g = self._groups.setdefault((sub.topic, sub.group), _Group())
        out: list[Delivery] = []
        for index, d in enumerate(self._log):
            if d.topic != sub.topic:
                continue
            state = g.states.setdefault(index, _State())
            if state.status != "ready" or state.visible_at > now:
                continue
            state.attempts += 1
            state.visible_at = now + sub.visibility_timeout
            out.append(Delivery(topic=d.topic, payload=d.payload, message_id=d.message_id,
                                attempt=state.attempts, key=d.key, tag=d.tag, headers=d.headers,
                                handle=index))
            if len(out) >= max_messages:
                break
        return out


class InMemorySubscriber:
    def __init__(self, broker: InMemoryBroker, topic: str, group: str, visibility_timeout: float):
        self.broker = broker
        self.topic = topic
        self.group = group
        self.visibility_timeout = visibility_timeout

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        deadline = time.monotonic() + wait_seconds
        with self.broker._lock:
            while True:
                found = self.broker._fetch(self, max_messages)
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                self.broker._lock.wait(min(remaining, 0.05))

    def _state(self, delivery: Delivery) -> _State:
        return self.broker._groups[(self.topic, self.group)].states[delivery.handle]

    def ack(self, delivery: Delivery) -> None:
        with self.broker._lock:
            self._state(delivery).status = "done"

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        with self.broker._lock:
            state = self._state(delivery)
            state.visible_at = time.monotonic() + delay_seconds
            state.last_error = error
            self.broker._lock.notify_all()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        with self.broker._lock:
            state = self._state(delivery)
            state.status = "dead"
            state.last_error = reason

    def close(self) -> None:
        pass
