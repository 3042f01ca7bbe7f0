"""The small interfaces that vary: codec, publisher, subscriber, transaction listener.

Each is a :class:`typing.Protocol`; an implementation need not inherit from it.
Optional abilities are protocols of their own rather than methods that raise.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    A delivery not acknowledged in time is delivered again. ``retry`` makes it
    visible again after ``delay`` seconds; ``dead_letter`` parks it with a reason.
    """

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]: ...

    def ack(self, delivery: Delivery) -> None: ...

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None: ...

    def dead_letter(self, delivery: Delivery, reason: str) -> None: ...


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
    waits without blocking the event loop."""

    async def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]: ...

    async def ack(self, delivery: Delivery) -> None: ...

    async def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None: ...

    async def dead_letter(self, delivery: Delivery, reason: str) -> None: ...

    async def close(self) -> None: ...
