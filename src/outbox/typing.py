"""The small interfaces that vary: codec, publisher, subscriber, transaction listener.

Each is a :class:`typing.Protocol`; an implementation need not inherit from it.
Optional abilities are protocols of their own rather than methods that raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .message import Message, TransactionState
from .transport import Delivery


@runtime_checkable
class Codec(Protocol):
    """Turns a payload object into bytes and back; decode raises DecodeError."""

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


@runtime_checkable
class Publisher(Protocol):
    """Publishes one message to a broker; raises PublishError when it cannot."""

    def publish(self, message: Message) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchPublisher(Protocol):
    """Optional ability: publish several messages in one round trip, all or none."""

    def publish_batch(self, messages: Sequence[Message]) -> None: ...


@runtime_checkable
class Subscriber(Protocol):
    """Hands out deliveries of one topic to one consumer group, with acknowledgement.

    The whole duty of a broker's subscriber: ``fetch`` waits up to ``wait_seconds``
    for at most ``max_messages`` deliveries, ``ack`` settles one for good (commits its
    offset, acknowledges it), ``close`` lets go of the connection. A delivery that is
    never acknowledged must come back some time (after a visibility timeout, a
    rebalance or a reconnect), so nothing is lost.

    Everything else is an optional ability, a protocol of its own: :class:`Redelivery`
    (deliver again after a delay), :class:`DeadLetterDestination` (park a message
    with a reason, broker-side) and :class:`CountsDeliveries` (``Delivery.attempt`` is
    the broker's own count). Where a subscriber lacks one, the idempotent consumer
    provides it itself: it holds the delivery and tries it again in place, writes the
    dead letter to its own database, and counts attempts next to its inbox.
    """

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]: ...

    def ack(self, delivery: Delivery) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Redelivery(Protocol):
    """Optional ability: deliver ``delivery`` again after ``delay_seconds`` (0: at
    once), to this group, as a new delivery with ``attempt`` one higher; the one in
    hand is settled by it. ``error`` says why, for the broker's own records."""

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None: ...


@runtime_checkable
class DeadLetterDestination(Protocol):
    """Optional ability: park ``delivery`` for good, broker-side, with ``reason``
    (a dead-letter queue, topic or stream), and settle it for this group."""

    def dead_letter(self, delivery: Delivery, reason: str) -> None: ...


@runtime_checkable
class CountsDeliveries(Protocol):
    """Optional ability: ``Delivery.attempt`` is the broker's own count of deliveries
    of this message to this group (1 the first time), kept across reconnects and
    crashes of the consumer. Declared by a true class attribute ``counts_deliveries``;
    without it the consumer counts failed attempts in its own database."""

    @property
    def counts_deliveries(self) -> bool: ...


@runtime_checkable
class LocalTransactionListener(Protocol):
    """The two duties of a transactional message's producer side.

    ``execute`` runs the local transaction for ``message`` (``arg`` is whatever the
    producer passes along) and says whether it committed. ``check`` answers the
    broker's check-back from durable state: COMMIT if the transaction committed,
    ROLLBACK if it did not and never will, UNKNOWN only while it may still commit.
    """

    def execute(self, message: Message, arg: Any) -> TransactionState: ...

    def check(self, message: Message) -> TransactionState: ...


@runtime_checkable
class Closeable(Protocol):
    def close(self) -> None: ...


# -- asyncio forms: the same duties, awaited in the service's event loop --------------


@runtime_checkable
class AsyncPublisher(Protocol):
    """Publishes one message from the event loop; raises PublishError when it cannot."""

    async def publish(self, message: Message) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class AsyncBatchPublisher(Protocol):
    """Optional ability: publish several messages in one round trip, all or none."""

    async def publish_batch(self, messages: Sequence[Message]) -> None: ...


@runtime_checkable
class AsyncSubscriber(Protocol):
    """:class:`Subscriber` for asyncio: every method is a coroutine and ``fetch``
    waits without blocking the event loop. Its optional abilities are
    :class:`AsyncRedelivery`, :class:`AsyncDeadLetterDestination` and
    :class:`CountsDeliveries`."""

    async def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]: ...

    async def ack(self, delivery: Delivery) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class AsyncRedelivery(Protocol):
    """:class:`Redelivery` for asyncio."""

    async def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None: ...


@runtime_checkable
class AsyncDeadLetterDestination(Protocol):
    """:class:`DeadLetterDestination` for asyncio."""

    async def dead_letter(self, delivery: Delivery, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Abilities:
    """Which optional abilities a (sync or asyncio) subscriber has."""

    redelivery: bool
    dead_letter: bool
    counts_deliveries: bool

    @classmethod
    def of(cls, subscriber: object) -> Abilities:
        return cls(
            redelivery=callable(getattr(subscriber, "retry", None)),
            dead_letter=callable(getattr(subscriber, "dead_letter", None)),
            counts_deliveries=getattr(subscriber, "counts_deliveries", False) is True,
        )
