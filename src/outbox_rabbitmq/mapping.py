"""One message as one AMQP message, and back; and the names of the topology.

A message travels in AMQP's own fields wherever AMQP has one, so any AMQP client
reads it without this package::

    message_id property    the message id (the consumer de-duplicates by it)
    routing key            the topic, on the prefix's topic exchange
    body                   the payload, bytes as they are
    delivery_mode 2        persistent: kept on disk by the durable queues
    headers                every header of the message, as it is (``traceparent`` ...),
                           plus x-outbox-key and x-outbox-tag when there is one
    content_type property  the message's ``content-type`` header, when it has one
                           (nothing is made up when it has none)

The adapter's own bookkeeping travels in headers starting with ``x-outbox-``:
``x-outbox-attempt`` (how many deliveries a retried copy had before it was made),
``x-outbox-retry-error``, and on a dead letter ``x-outbox-dead-reason``,
``x-outbox-dead-group`` (and ``x-outbox-no-id`` when the message had no id).
RabbitMQ adds ``x-delivery-count`` (a quorum queue's redelivery count) and the
``x-death`` family (dead-lettering). These names, and
``CC``/``BCC`` (which RabbitMQ takes for routing), are reserved: a message with such
a header is refused, since it would not arrive as it was sent.

Reading back is tolerant: a message another program wrote with a missing, empty or
non-UTF-8 id, key, tag or header becomes a :class:`~outbox.Delivery` with those
fields None (or without that header); the consumer dead-letters it with the reason.
Nothing here raises on what arrives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from outbox.errors import PublishError
from outbox.message import Message
from outbox.transport import Delivery

KEY, TAG = "x-outbox-key", "x-outbox-tag"
ATTEMPT, RETRY_ERROR = "x-outbox-attempt", "x-outbox-retry-error"
DEAD_REASON, DEAD_GROUP = "x-outbox-dead-reason", "x-outbox-dead-group"
#: On a dead letter of a message that had no id: aio-pika gives every message it
#: publishes one, so the dead letter's message_id is not the original's.
NO_ID = "x-outbox-no-id"
OWN_PREFIX = "x-outbox-"
#: A quorum queue's count of earlier deliveries of this message (absent or 0 at first).
DELIVERY_COUNT = "x-delivery-count"
CONTENT_TYPE = "content-type"
#: Headers RabbitMQ sets or acts on: never a message's own.
BROKER_HEADERS = frozenset({
    DELIVERY_COUNT, "x-death", "x-first-death-exchange", "x-first-death-queue",
    "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
    "x-last-death-reason", "x-received-from", "CC", "BCC",
})
#: AMQP short strings (message_id, content_type, routing keys, names) hold 255 bytes.
SHORTSTR = 255
#: A content header travels in one frame (128 KiB by default): keep well under it.
MAX_HEADER_BYTES = 64 * 1024
#: Dead-letter reasons and retry errors are cut to this many characters.
MAX_REASON = 8000
MAX_RETRY_ERROR = 1000


# -- names ----------------------------------------------------------------------------


def exchange_name(prefix: str) -> str:
    """The topic exchange every message of ``prefix`` is published to."""
    return prefix


def dead_exchange_name(prefix: str) -> str:
    """The direct exchange dead letters of every group of ``prefix`` go through."""
    return f"{prefix}.dead"


def queue_name(prefix: str, topic: str, group: str) -> str:
    """The quorum queue of ``group`` on ``topic``."""
    return f"{prefix}.{topic}.{group}"


def dead_queue_name(prefix: str, topic: str, group: str) -> str:
    """The queue that keeps the dead letters of ``group`` on ``topic``."""
    return f"{queue_name(prefix, topic, group)}.dead"


def retry_queue_name(queue: str, bucket_ms: int) -> str:
    """The classic queue where ``queue``'s retried copies wait ``bucket_ms``."""
    return f"{queue}.retry.{bucket_ms}ms"


#: The longest wait a retry gets; a longer delay waits this long.
MAX_DELAY_MS = 24 * 3600 * 1000


def retry_bucket_ms(delay_seconds: float) -> int:
    """The wait, in milliseconds, of the bucket a retry after ``delay_seconds`` goes
    to: 0 (no wait) for no delay, else the delay rounded up to 100 ms below a second,
    to whole seconds below a minute, to whole minutes below an hour, to whole hours
    beyond (at most :data:`MAX_DELAY_MS`). A group has at most ~150 buckets, each a
    queue of its own, so every copy in one waits the same and leaves in order."""
    if not delay_seconds > 0:  # also NaN
        return 0
    if delay_seconds * 1000 >= MAX_DELAY_MS:  # also infinity
        return MAX_DELAY_MS
    ms = math.ceil(delay_seconds * 1000)
    for limit, step in ((1000, 100), (60_000, 1000), (3_600_000, 60_000)):
        if ms < limit:
            return -(-ms // step) * step
    return -(-ms // 3_600_000) * 3_600_000


# -- writing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One AMQP message to publish, client-neutral: the sync (pika) and asyncio
    (aio-pika) publishers each turn it into their own."""

    routing_key: str
    body: bytes
    message_id: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = None


def _utf8_len(text: str) -> int:
    return len(text.encode())


def _check_header_size(headers: Mapping[str, Any], what: str) -> None:
    size = sum(_utf8_len(k) + (_utf8_len(v) if isinstance(v, str) else 8) + 6
               for k, v in headers.items())
    if size > MAX_HEADER_BYTES:
        raise PublishError(f"{what}: its headers take {size} bytes; one AMQP content "
                           f"header frame holds about {MAX_HEADER_BYTES}")


def _content_type(headers: Mapping[str, Any]) -> str | None:
    value = headers.get(CONTENT_TYPE)
    if isinstance(value, str) and value and _utf8_len(value) <= SHORTSTR:
        return value
    return None


def to_outgoing(message: Message) -> Outgoing:
    """The AMQP message for ``message``; PublishError for a message that is not one
    (or that AMQP cannot carry as it is)."""
    what = f"message {getattr(message, 'id', None)!r} cannot be sent to RabbitMQ"
    try:
        topic, message_id = message.topic, message.id
        if not isinstance(topic, str) or not isinstance(message_id, str):
            raise TypeError("its topic and id must be strings")
        body = bytes(message.payload)
        headers: dict[str, Any] = {}
        for name, value in message.headers.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError("its headers must map str to str")
            if name in BROKER_HEADERS or name.startswith(OWN_PREFIX):
                raise PublishError(f"{what}: header {name!r} is reserved (RabbitMQ or this "
                                   "adapter sets it)")
            headers[name] = value
        for own, optional in ((KEY, message.key), (TAG, message.tag)):
            if optional is not None:
                if not isinstance(optional, str):
                    raise TypeError("its key and tag must be strings")
                headers[own] = optional
    except (AttributeError, TypeError, ValueError) as exc:
        raise PublishError(f"{what}: {exc}") from exc
    for part, text in (("topic", topic), ("id", message_id)):
        if _utf8_len(text) > SHORTSTR:
            raise PublishError(f"{what}: its {part} takes {_utf8_len(text)} bytes in UTF-8;"
                               f" AMQP holds {SHORTSTR}")
    _check_header_size(headers, what)
    return Outgoing(routing_key=topic, body=body, message_id=message_id, headers=headers,
                    content_type=_content_type(headers))


def _copy(delivery: Delivery, routing_key: str, own: Mapping[str, Any]) -> Outgoing:
    """A copy of ``delivery`` to publish again (retry, dead letter), with the adapter's
    headers ``own``; rebuilt from the delivery, which keeps every field it could read,
    so nothing RabbitMQ added (x-death, x-delivery-count) is carried over."""
    headers: dict[str, Any] = dict(delivery.headers)
    if delivery.key is not None:
        headers[KEY] = delivery.key
    if delivery.tag is not None:
        headers[TAG] = delivery.tag
    headers.update(own)
    return Outgoing(routing_key=routing_key, body=bytes(delivery.payload),
                    message_id=delivery.message_id, headers=headers,
                    content_type=_content_type(headers))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def retry_copy(delivery: Delivery, routing_key: str, error: str) -> Outgoing:
    """The copy that carries a retried delivery: it counts the deliveries so far."""
    return _copy(delivery, routing_key, {ATTEMPT: max(1, delivery.attempt),
                                         RETRY_ERROR: _cut(str(error), MAX_RETRY_ERROR)})


def dead_copy(delivery: Delivery, routing_key: str, group: str, reason: str) -> Outgoing:
    """The dead letter of ``delivery``: the message, plus who gave up and why."""
    own: dict[str, Any] = {ATTEMPT: max(1, delivery.attempt), DEAD_GROUP: group,
                           DEAD_REASON: _cut(str(reason), MAX_REASON)}
    if not delivery.message_id:
        own[NO_ID] = "1"
    return _copy(delivery, routing_key, own)


# -- reading --------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return None
    return None


def _count(value: Any) -> int:
    """A non-negative count from a header that may hold anything."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    text = _text(value)
    if text is not None and text.isascii() and text.isdigit():
        return int(text)
    return 0


def attempt_of(headers: Mapping[str, Any] | None) -> int:
    """The delivery's attempt, 1 the first time: the deliveries a retried copy had
    before it was made (``x-outbox-attempt``), plus the deliveries of this copy
    (``x-delivery-count``, which RabbitMQ raises on each redelivery), plus this one."""
    headers = headers if isinstance(headers, Mapping) else {}
    return _count(headers.get(ATTEMPT)) + _count(headers.get(DELIVERY_COUNT)) + 1


def user_headers(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """The message's own headers: every text header but the reserved ones."""
    found: dict[str, str] = {}
    if not isinstance(headers, Mapping):
        return found
    for name, value in headers.items():
        text_name = _text(name)
        if text_name is None or text_name in BROKER_HEADERS or text_name.startswith(OWN_PREFIX):
            continue
        text_value = _text(value)
        if text_value is not None:
            found[text_name] = text_value
    return found


def to_delivery(topic: str, message_id: Any, headers: Mapping[str, Any] | None, body: Any,
                handle: Any) -> Delivery:
    """The delivery of one AMQP message (``handle``: the subscriber's receipt)."""
    headers = headers if isinstance(headers, Mapping) else {}
    return Delivery(
        topic=topic, payload=bytes(body) if isinstance(body, bytes | bytearray) else b"",
        message_id=_text(message_id) or None, attempt=attempt_of(headers),
        key=_text(headers.get(KEY)), tag=_text(headers.get(TAG)),
        headers=user_headers(headers), handle=handle,
    )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in a group's dead-letter queue, as :meth:`RabbitMQBroker.dead_letters`
    lists it. ``reason`` is the consumer's; for a message RabbitMQ dead-lettered on
    its own (rejected without requeue by another client), RabbitMQ's reason."""

    message_id: str | None
    group: str | None
    reason: str | None
    attempt: int
    key: str | None
    tag: str | None
    headers: Mapping[str, str]
    payload: bytes


def to_dead_letter(message_id: Any, headers: Mapping[str, Any] | None, body: Any
                   ) -> DeadLetter:
    headers = headers if isinstance(headers, Mapping) else {}
    return DeadLetter(
        message_id=None if NO_ID in headers else _text(message_id) or None,
        group=_text(headers.get(DEAD_GROUP)),
        reason=_text(headers.get(DEAD_REASON)) or _text(headers.get("x-first-death-reason")),
        attempt=max(1, _count(headers.get(ATTEMPT))),
        key=_text(headers.get(KEY)), tag=_text(headers.get(TAG)),
        headers=user_headers(headers),
        payload=bytes(body) if isinstance(body, bytes | bytearray) else b"",
    )
