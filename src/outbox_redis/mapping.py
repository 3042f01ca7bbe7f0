"""One message as one Redis stream entry, and back.

A topic is the stream ``<prefix><topic>`` (prefix ``outbox:`` by default). An entry
has a field per part of the envelope, readable by any Redis tool (``XRANGE``)::

    id        the message id (the consumer de-duplicates by it)
    key       the ordering key, when there is one
    tag       the tag, when there is one
    payload   the body, bytes as they are
    h:<name>  one field per header (``h:traceparent`` ...)

Reading back is tolerant: an entry another program wrote with missing or
non-UTF-8 fields becomes a :class:`~outbox.Delivery` with those fields None (the
consumer dead-letters it with the reason), never an exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from outbox.errors import PublishError
from outbox.message import Message
from outbox.transport import Delivery

ID, KEY, TAG, PAYLOAD = b"id", b"key", b"tag", b"payload"
HEADER_PREFIX = b"h:"
#: Fields a dead-letter entry adds to the original's.
DEAD_GROUP, DEAD_REASON, DEAD_ENTRY = b"dead-group", b"dead-reason", b"dead-entry"


def stream_key(prefix: str, topic: str) -> str:
    return f"{prefix}{topic}"


def dead_letter_key(prefix: str, topic: str) -> str:
    """The stream that keeps the dead letters of every group of ``topic``."""
    return f"{prefix}{topic}:dead"


def to_fields(message: Message) -> dict[bytes, bytes]:
    """The entry's fields for ``message``; PublishError for a message that is not one."""
    try:
        fields = {ID: message.id.encode(), PAYLOAD: bytes(message.payload)}
        if message.key is not None:
            fields[KEY] = message.key.encode()
        if message.tag is not None:
            fields[TAG] = message.tag.encode()
        for name, value in message.headers.items():
            fields[HEADER_PREFIX + name.encode()] = value.encode()
    except (AttributeError, TypeError, UnicodeEncodeError) as exc:
        raise PublishError(f"message {getattr(message, 'id', None)!r} cannot be written to "
                           f"a Redis stream: {exc}") from exc
    return fields


def _text(value: Any) -> str | None:
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


def to_delivery(topic: str, entry_id: bytes, fields: Mapping[bytes, bytes] | None,
                attempt: int) -> Delivery:
    """The delivery of one entry (``handle``: the entry id)."""
    fields = fields or {}
    headers: dict[str, str] = {}
    for name, value in fields.items():
        if isinstance(name, bytes) and name.startswith(HEADER_PREFIX):
            text_name, text_value = _text(name[len(HEADER_PREFIX):]), _text(value)
            if text_name is not None and text_value is not None:
                headers[text_name] = text_value
    payload = fields.get(PAYLOAD)
    return Delivery(
        topic=topic, payload=payload if isinstance(payload, bytes) else b"",
        message_id=_text(fields.get(ID)) or None, attempt=max(1, attempt),
        key=_text(fields.get(KEY)), tag=_text(fields.get(TAG)), headers=headers,
        handle=entry_id,
    )


def dead_fields(original: Mapping[bytes, bytes], group: str, entry_id: bytes,
                reason: str) -> dict[bytes, bytes]:
    """The dead-letter entry: the original's fields, plus who gave up and why."""
    fields = dict(original)
    fields.update({DEAD_GROUP: group.encode(), DEAD_REASON: reason.encode(),
                   DEAD_ENTRY: entry_id})
    return fields


def delivery_fields(delivery: Delivery) -> dict[bytes, bytes]:
    """The fields to copy into a dead letter, rebuilt from the delivery (which keeps
    every field it could read)."""
    fields = {PAYLOAD: bytes(delivery.payload)}
    if delivery.message_id is not None:
        fields[ID] = delivery.message_id.encode()
    if delivery.key is not None:
        fields[KEY] = delivery.key.encode()
    if delivery.tag is not None:
        fields[TAG] = delivery.tag.encode()
    for name, value in delivery.headers.items():
        fields[HEADER_PREFIX + name.encode()] = value.encode()
    return fields
