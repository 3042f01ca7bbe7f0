"""One message as one Kafka record, and back.

A topic is the Kafka topic ``<prefix><topic>`` (no prefix by default, so other tools
see the names the services use). A record carries the envelope in Kafka's own
fields, readable by any Kafka tool::

    key                     the ordering key (UTF-8), absent when there is none: Kafka
                            puts one key's records on one partition, in order
    header outbox-id        the message id (the consumer de-duplicates by it)
    header outbox-tag       the tag, when there is one
    header <name>           each of the message's headers as it is (``traceparent``
                            travels natively)
    value                   the body, bytes as they are

Reading back is tolerant: a record another program wrote with missing or non-UTF-8
fields becomes a :class:`~outbox.Delivery` with those fields None (the consumer
dead-letters it with the reason), never an exception.
"""

from __future__ import annotations

import re
from typing import Any

from outbox.errors import ConfigurationError, PublishError
from outbox.message import Message
from outbox.transport import Delivery

ID_HEADER, TAG_HEADER = "outbox-id", "outbox-tag"
RESERVED = frozenset({ID_HEADER, TAG_HEADER})
#: Headers a dead-letter record adds to the original's.
DEAD_GROUP, DEAD_REASON, DEAD_FROM = "outbox-dead-group", "outbox-dead-reason", "outbox-dead-from"
DEAD_SUFFIX = ".dead"
_LEGAL = re.compile(r"[A-Za-z0-9._-]+")
MAX_TOPIC = 249

Header = tuple[str, str | bytes | None]


def topic_name(prefix: str, topic: str) -> str:
    """The Kafka topic of ``topic``; ConfigurationError for a name Kafka refuses."""
    name = f"{prefix}{topic}"
    if not _LEGAL.fullmatch(name) or len(name) > MAX_TOPIC - len(DEAD_SUFFIX) or \
            name in (".", ".."):
        raise ConfigurationError(
            f"{name!r} cannot be a Kafka topic: use letters, digits, '.', '_' and '-' only, "
            f"at most {MAX_TOPIC - len(DEAD_SUFFIX)} characters")
    return name


def dead_letter_topic(prefix: str, topic: str) -> str:
    """The topic that keeps the dead letters of every group of ``topic``."""
    return topic_name(prefix, topic) + DEAD_SUFFIX


def to_record(message: Message) -> tuple[bytes | None, bytes, list[Header]]:
    """(key, value, headers) for ``message``; PublishError for a message that is not one."""
    try:
        headers: list[Header] = [(ID_HEADER, message.id.encode())]
        if message.tag is not None:
            headers.append((TAG_HEADER, message.tag.encode()))
        for name, value in message.headers.items():
            if name in RESERVED:
                raise ValueError(f"header {name!r} is the adapter's own; rename it")
            headers.append((name, value.encode()))
        key = message.key.encode() if message.key is not None else None
        value_ = bytes(message.payload)
    except (AttributeError, TypeError, ValueError, UnicodeEncodeError) as exc:
        raise PublishError(f"message {getattr(message, 'id', None)!r} cannot be written to "
                           f"Kafka: {exc}") from exc
    return key, value_, headers


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


def to_delivery(topic: str, key: Any, value: Any, headers: Any, handle: Any) -> Delivery:
    """The delivery of one record (``attempt`` 1: Kafka does not count deliveries)."""
    message_id = tag = None
    extra: dict[str, str] = {}
    for item in headers if isinstance(headers, list) else ():
        if not isinstance(item, tuple) or len(item) != 2:
            continue
        name, text = _text(item[0]), _text(item[1])
        if name is None or text is None:
            continue
        if name == ID_HEADER:
            message_id = text or None
        elif name == TAG_HEADER:
            tag = text
        else:
            extra[name] = text
    return Delivery(topic=topic, payload=value if isinstance(value, bytes) else b"",
                    message_id=message_id, attempt=1, key=_text(key), tag=tag,
                    headers=extra, handle=handle)


def delivery_record(delivery: Delivery) -> tuple[bytes | None, bytes, list[Header]]:
    """(key, value, headers) rebuilt from a delivery, to copy into a dead letter."""
    headers: list[Header] = []
    if delivery.message_id is not None:
        headers.append((ID_HEADER, delivery.message_id.encode()))
    if delivery.tag is not None:
        headers.append((TAG_HEADER, delivery.tag.encode()))
    headers.extend((n, v.encode()) for n, v in delivery.headers.items())
    key = delivery.key.encode() if delivery.key is not None else None
    return key, bytes(delivery.payload), headers


def dead_headers(headers: list[Header], group: str, origin: str, reason: str
                 ) -> list[Header]:
    """The dead-letter record's headers: the original's, plus who gave up, where, why."""
    return [*headers, (DEAD_GROUP, group.encode()), (DEAD_FROM, origin.encode()),
            (DEAD_REASON, reason.encode())]
