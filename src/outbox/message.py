"""The message envelope and the three outcomes of a local transaction."""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import MessageError

MAX_ID_LENGTH = 64
MAX_TOPIC_LENGTH = 200
MAX_KEY_LENGTH = 200
MAX_TAG_LENGTH = 100

#: Unicode category Cc (C0 controls, DEL, C1 controls), refused in ids, topics, keys
#: and tags: they would forge log lines and break line-based tools.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_NAMES = {"\x00": " (NUL)", "\t": " (TAB)", "\n": " (LF)", "\r": " (CR)",
                  "\x1b": " (ESC)", "\x7f": " (DEL)"}


class TransactionState(enum.Enum):
    """The answer of a local transaction, as in RocketMQ's transaction listener."""

    COMMIT = "commit"
    ROLLBACK = "rollback"
    UNKNOWN = "unknown"


def new_message_id() -> str:
    """A fresh random message id (32 hex characters)."""
    return uuid.uuid4().hex


def _check_text(name: str, value: object, limit: int, *, required: bool) -> None:
    if value is None:
        if required:
            raise MessageError(f"message {name} is required")
        return
    if not isinstance(value, str):
        raise MessageError(f"message {name} must be a string, got {type(value).__name__}")
    if required and not value:
        raise MessageError(f"message {name} must not be empty")
    if len(value) > limit:
        raise MessageError(f"message {name} is {len(value)} characters; the limit is {limit}")
    bad = _CONTROL.search(value)
    if bad is not None:
        # Never quote the raw value: the error ends up in logs and dead-letter reasons.
        char = bad.group()
        raise MessageError(
            f"message {name} must not contain control characters; found "
            f"U+{ord(char):04X}{_CONTROL_NAMES.get(char, '')} at position {bad.start()}: "
            "use printable text"
        )
    if value != value.strip():
        # MySQL compares strings ignoring trailing spaces: "a " would pass for "a".
        raise MessageError(f"message {name} {value!r} must not start or end with whitespace")


@dataclass(frozen=True, slots=True)
class Message:
    """One message: what is published, stored in the outbox and delivered.

    ``id`` identifies the message everywhere (outbox row, transaction log, inbox); two
    deliveries with the same id are the same message. ``key`` orders messages: the
    relay publishes messages with the same key in commit order. ``payload`` is the
    encoded body (see :class:`outbox.codec.JsonCodec`).
    """

    topic: str
    payload: bytes
    id: str = field(default_factory=new_message_id)
    key: str | None = None
    tag: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_text("id", self.id, MAX_ID_LENGTH, required=True)
        _check_text("topic", self.topic, MAX_TOPIC_LENGTH, required=True)
        _check_text("key", self.key, MAX_KEY_LENGTH, required=False)
        _check_text("tag", self.tag, MAX_TAG_LENGTH, required=False)
        if not isinstance(self.payload, bytes):
            raise MessageError(
                f"message payload must be bytes, got {type(self.payload).__name__}; "
                "encode it with a codec first"
            )
        headers: Any = self.headers
        if not isinstance(headers, Mapping):
            raise MessageError("message headers must be a mapping of str to str")
        for k, v in headers.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise MessageError(f"message header {k!r} must map a str to a str")
        # Frozen means frozen: a caller's dict must not change the message later.
        object.__setattr__(self, "headers", MappingProxyType(dict(headers)))

    @classmethod
    def stored(cls, *, id: str, topic: str, payload: bytes, key: str | None, tag: str | None,
               headers: Mapping[str, str]) -> Message:
        """A message read back from the framework's own store, which holds only
        messages that passed the checks when written: built without checking again
        (the relay rebuilds every row it publishes)."""
        message = object.__new__(cls)
        _set_id(message, id)
        _set_topic(message, topic)
        _set_payload(message, payload)
        _set_key(message, key)
        _set_tag(message, tag)
        _set_headers(message, MappingProxyType(dict(headers)) if headers else _NO_HEADERS)
        return message

    def __hash__(self) -> int:
        # The headers mapping is not hashable; the id is what names a message.
        return hash((self.id, self.topic, self.payload))

    def log_fields(self) -> dict[str, Any]:
        """The fields every log event about this message carries."""
        return {"message_id": self.id, "topic": self.topic, "key": self.key}


# The slots' own setters: what ``Message.stored`` fills a frozen message with.
_set_id, _set_topic, _set_payload, _set_key, _set_tag, _set_headers = (
    Message.__dict__[name].__set__ for name in ("id", "topic", "payload", "key", "tag", "headers")
)
#: Read-only, so one is shared by every message without headers.
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
