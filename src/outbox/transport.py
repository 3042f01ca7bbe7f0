"""What a subscriber hands out: one delivery of one message to one consumer group."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import DecodeError
from .message import Message


@dataclass(frozen=True, slots=True)
class Delivery:
    """A received message as the transport saw it, before any validation.

    Fields may be missing or malformed (a hostile producer can put anything on a
    topic); :meth:`to_message` validates them. ``attempt`` counts deliveries of this
    message to this group, starting at 1. ``handle`` is the transport's own receipt.
    """

    topic: str
    payload: bytes
    message_id: str | None
    attempt: int
    key: str | None = None
    tag: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    handle: Any = None

    def to_message(self) -> Message:
        if not self.message_id:
            raise DecodeError("delivery has no message id; it cannot be de-duplicated")
        try:
            return Message(
                id=self.message_id, topic=self.topic, payload=self.payload,
                key=self.key, tag=self.tag, headers=dict(self.headers),
            )
        except Exception as exc:  # a MessageError here means the sender broke the format
            raise DecodeError(f"delivery is not a valid message: {exc}") from exc


#: The optional abilities a wrapper passes on from the subscriber it wraps.
ABILITY_NAMES = frozenset({"retry", "dead_letter", "counts_deliveries"})


class SubscriberWrapper:
    """Base for a subscriber wrapping another (a filter, a probe, a fault injector).

    ``fetch``, ``ack`` and ``close`` pass through; override what you change. The
    optional abilities (``retry``, ``dead_letter``, ``counts_deliveries``) are the
    inner subscriber's, and only if it has them, so the idempotent consumer still
    provides what the broker lacks. Works for sync and asyncio subscribers alike:
    an asyncio subclass overrides ``fetch``/``ack``/``close`` with coroutines (see
    :class:`AsyncSubscriberWrapper`).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def fetch(self, max_messages: int, wait_seconds: float) -> Any:
        return self.inner.fetch(max_messages, wait_seconds)

    def ack(self, delivery: Delivery) -> Any:
        return self.inner.ack(delivery)

    def close(self) -> Any:
        return self.inner.close()

    def __getattr__(self, name: str) -> Any:
        if name in ABILITY_NAMES:
            return getattr(self.inner, name)  # AttributeError if the inner one lacks it
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


class AsyncSubscriberWrapper(SubscriberWrapper):
    """:class:`SubscriberWrapper` for an asyncio subscriber."""

    async def fetch(self, max_messages: int, wait_seconds: float) -> Any:
        return await self.inner.fetch(max_messages, wait_seconds)

    async def ack(self, delivery: Delivery) -> None:
        await self.inner.ack(delivery)

    async def close(self) -> None:
        await self.inner.close()
