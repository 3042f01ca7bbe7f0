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
