"""How an outbox message looks on RocketMQ, for every client (5.x gRPC, 4.x remoting)
and for the services on the other side, whatever language they are written in.

- body: the payload bytes; tag: the message's tag; keys: its key and its outbox id
  (so the broker's index finds a message by our id: ``mqadmin queryMsgByKey``, the
  console, ``outbox rocketmq-recover``).
- ``OUTBOX_MESSAGE_ID``: the outbox message id (RocketMQ gives every send an id of
  its own; ours is the one the receivers de-duplicate on); ``OUTBOX_KEY``: its key,
  which of the keys is the message's own.
- Every header is a user property of its own name, so a Java service reads it
  with ``getUserProperty("traceId")`` and its own properties reach our handlers.
  The framework's headers (``outbox-created-at``) travel as ``OUTBOX_CREATED_AT``.
- A header RocketMQ cannot carry as a property of that name (a name RocketMQ keeps
  for itself, such as ``KEYS``, or one of ours; a blank value; characters the 4.x
  wire format uses as separators) travels inside ``OUTBOX_HEADERS``, a JSON object,
  and comes back out of it.

Nothing here imports a RocketMQ client: the clients turn these parts into their own
message objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from outbox.envelope import INTERNAL_PREFIX, decode_headers, encode_headers
from outbox.errors import ConfigurationError
from outbox.message import Message
from outbox.transport import Delivery

from .remoting.protocol import StoredMessage

#: The user property carrying the outbox message id.
MESSAGE_ID_PROPERTY = "OUTBOX_MESSAGE_ID"
#: The user property carrying the message key (one of the message's keys).
KEY_PROPERTY = "OUTBOX_KEY"
#: The user property carrying, as one JSON object, the headers that cannot be
#: properties of their own (and every header, in messages of earlier versions).
HEADERS_PROPERTY = "OUTBOX_HEADERS"
#: The prefix of the framework's own properties.
PROPERTY_PREFIX = "OUTBOX_"
#: What a dead-letter copy carries besides the original's properties: why, for which
#: group, from which topic, and RocketMQ's own id of the original.
DEAD_REASON_PROPERTY = "OUTBOX_DEAD_REASON"
DEAD_GROUP_PROPERTY = "OUTBOX_DEAD_GROUP"
ORIGINAL_TOPIC_PROPERTY = "OUTBOX_ORIGINAL_TOPIC"
ORIGINAL_ID_PROPERTY = "OUTBOX_ORIGINAL_ID"
#: The header that lists every key of a received message (space-separated, sorted);
#: ``Message.key`` is the first of them.
KEYS_HEADER = f"{INTERNAL_PREFIX}keys"

#: Property names RocketMQ keeps for itself (its ``MessageConst``), 4.x and 5.x.
RESERVED_PROPERTIES = frozenset({
    "KEYS", "TAGS", "WAIT", "DELAY", "RETRY_TOPIC", "REAL_TOPIC", "REAL_QID",
    "TRAN_MSG", "PGROUP", "MIN_OFFSET", "MAX_OFFSET", "BUYER_ID", "ORIGIN_MESSAGE_ID",
    "TRANSFER_FLAG", "CORRECTION_FLAG", "MQ2_FLAG", "RECONSUME_TIME", "MSG_REGION",
    "TRACE_ON", "UNIQ_KEY", "EXTEND_UNIQ_INFO", "MAX_RECONSUME_TIMES",
    "CONSUME_START_TIME", "INNER_NUM", "INNER_BASE", "DUP_INFO",
    "CHECK_IMMUNITY_TIME_IN_SECONDS", "TRAN_PREPARED_QUEUE_OFFSET",
    "TRANSACTION_CHECK_TIMES", "INSTANCE_ID", "CORRELATION_ID", "REPLY_TO_CLIENT",
    "TTL", "ARRIVE_TIME", "PUSH_REPLY_TIME", "CLUSTER", "MSG_TYPE", "POP_CK",
    "POP_CK_OFFSET", "1ST_POP_TIME", "PROPERTY_FORWARD_QUEUE_ID", "REDIRECT",
    "INNER_MULTI_DISPATCH", "INNER_MULTI_QUEUE_OFFSET", "TRACE_CONTEXT",
    "TIMER_DELAY_SEC", "TIMER_DELIVER_MS", "TIMER_ENQUEUE_MS", "TIMER_DEQUEUE_MS",
    "TIMER_ROLL_TIMES", "TIMER_OUT_MS", "TIMER_DEL_UNIQKEY", "TIMER_DELAY_LEVEL",
    "BORN_TIMESTAMP", "SHARDING_KEY",
})

#: A property name a header may use as it is.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
#: An internal header that maps onto an ``OUTBOX_...`` property and back.
_INTERNAL_NAME = re.compile(re.escape(INTERNAL_PREFIX) + r"[a-z0-9]+(-[a-z0-9]+)*")
#: The framework's properties that are not headers.
_STRUCTURAL = frozenset({MESSAGE_ID_PROPERTY, KEY_PROPERTY, HEADERS_PROPERTY})


def _is_reserved(name: str) -> bool:
    upper = name.upper()
    return (upper in RESERVED_PROPERTIES or name.startswith("__")
            or upper.startswith(PROPERTY_PREFIX))


def _carriable(value: str) -> bool:
    # 4.x packs properties as name \x01 value \x02; the 5.x proxy refuses blank values.
    return bool(value.strip()) and "\x01" not in value and "\x02" not in value


def header_property(name: str) -> str | None:
    """The property a header travels as, or None when it must go inside
    ``OUTBOX_HEADERS``."""
    if _INTERNAL_NAME.fullmatch(name):
        return PROPERTY_PREFIX + name[len(INTERNAL_PREFIX):].replace("-", "_").upper()
    if _PLAIN_NAME.fullmatch(name) and not _is_reserved(name):
        return name
    return None


def keys_of(message: Message) -> list[str]:
    """The RocketMQ keys a message is sent with: its key, then its id."""
    return list(dict.fromkeys(k for k in (message.key, message.id) if k))


def properties_of(message: Message) -> dict[str, str]:
    """The user properties a message is sent with."""
    properties = {MESSAGE_ID_PROPERTY: message.id}
    if message.key:
        properties[KEY_PROPERTY] = message.key
    packed: dict[str, str] = {}
    for name, value in message.headers.items():
        target = header_property(name)
        if target is not None and _carriable(value):
            properties[target] = value
        else:
            packed[name] = value
    if packed:
        properties[HEADERS_PROPERTY] = encode_headers(packed)
    return properties


def headers_of(properties: Mapping[str, str], keys: Sequence[str] = ()) -> dict[str, str]:
    """The headers a received message's user properties carry (system properties
    and the framework's structural ones left out), with :data:`KEYS_HEADER` when the
    message has more than one key."""
    headers: dict[str, str] = {}
    for name, value in properties.items():
        if name in _STRUCTURAL:
            continue
        if name.startswith(PROPERTY_PREFIX):
            rest = name[len(PROPERTY_PREFIX):]
            if re.fullmatch(r"[A-Z0-9]+(_[A-Z0-9]+)*", rest):
                headers[INTERNAL_PREFIX + rest.lower().replace("_", "-")] = value
            continue
        if _is_reserved(name):
            continue
        headers[name] = value
    headers.update(decode_headers(properties.get(HEADERS_PROPERTY)))
    if len(keys) > 1:
        headers[KEYS_HEADER] = " ".join(keys)
    return headers


def dead_letter_properties(properties: Mapping[str, str], *, message_id: str | None,
                           original_id: str | None, reason: str, group: str,
                           topic: str) -> dict[str, str]:
    """The user properties of a dead-letter copy: the original's (RocketMQ's own, the
    ``__``-prefixed system ones and blank ones left out), its de-duplication id as the
    outbox message id, RocketMQ's id of the original, and why."""
    out = {name: value for name, value in properties.items()
           if value.strip() and name.upper() not in RESERVED_PROPERTIES
           and not name.startswith("__")}  # the broker's own (__SHARDINGKEY of FIFO)
    if message_id:
        out[MESSAGE_ID_PROPERTY] = message_id
    if original_id:
        out[ORIGINAL_ID_PROPERTY] = str(original_id)
    out[DEAD_REASON_PROPERTY] = reason.strip() or "no reason given"
    out[DEAD_GROUP_PROPERTY] = group
    out[ORIGINAL_TOPIC_PROPERTY] = topic
    return out


def ordered_keys(keys: Iterable[str] | str | None) -> tuple[str, ...]:
    """A received message's keys in a fixed order: sorted (the 5.x client hands them
    over as a set; the 4.x wire format as one space-separated string)."""
    if keys is None:
        return ()
    if isinstance(keys, str):
        keys = keys.split(" ")
    return tuple(sorted({k for k in keys if k and k.strip()}))


# -- where the de-duplication id comes from ---------------------------------------------


@dataclass(frozen=True)
class Received:
    """What an id source may read of a received message, whichever client got it."""

    topic: str
    body: bytes
    keys: tuple[str, ...]
    properties: Mapping[str, str]
    rocketmq_id: str | None = None


def received_stored(stored: StoredMessage, topic: str | None = None) -> Received:
    """What the mapping reads of a message a 4.x broker sent (pulled, or checked
    back), as a message of ``topic`` (a retried one comes from the group's retry topic)."""
    return Received(topic=topic or stored.topic, body=stored.body,
                    keys=ordered_keys(stored.keys), properties=stored.properties,
                    rocketmq_id=stored.msg_id)


#: An id source: the de-duplication id of a received message, or None.
IdSource = Callable[[Received], str | None]


@dataclass(frozen=True)
class MessageIdFrom:
    """Where a consumer takes a received message's de-duplication id from: the
    sources in order, the first that gives one wins; with none, the message is
    dead-lettered ("delivery has no message id"), never applied twice.

    The default reads the outbox's own property, which every message sent through
    outbox carries. For messages from other services::

        MessageIdFrom.property("OUTBOX_MESSAGE_ID", "txNo")  # our id, else a property
        MessageIdFrom.json_field("txNo")                     # the write-up's body field
        MessageIdFrom.keys()                                 # the message's (first) key
        MessageIdFrom.outbox_then(MessageIdFrom.json_field("txNo"))
    """

    sources: tuple[IdSource, ...] = field(default_factory=lambda: (_property(MESSAGE_ID_PROPERTY),))
    description: str = f"property {MESSAGE_ID_PROPERTY}"

    def __call__(self, received: Received) -> str | None:
        for source in self.sources:
            value = source(received)
            if value is not None and value.strip():
                return value.strip()
        return None

    @classmethod
    def property(cls, *names: str) -> MessageIdFrom:
        """The first of these user properties that the message has."""
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigurationError("MessageIdFrom.property needs one or more property names")
        return cls(tuple(_property(n) for n in names), "property " + ", ".join(names))

    @classmethod
    def keys(cls) -> MessageIdFrom:
        """The message's key (the first in sorted order when it has several)."""
        return cls((lambda r: r.keys[0] if r.keys else None,), "the message keys")

    @classmethod
    def json_field(cls, *path: str) -> MessageIdFrom:
        """A field of a JSON object body, e.g. ``json_field("txNo")`` or
        ``json_field("transfer", "id")``; a number is used as its text."""
        if not path or not all(isinstance(p, str) and p for p in path):
            raise ConfigurationError("MessageIdFrom.json_field needs a field name")
        return cls((lambda r: _json_field(r.body, path),), "body field " + ".".join(path))

    @classmethod
    def rocketmq_id(cls) -> MessageIdFrom:
        """RocketMQ's own message id. A producer that sends again after a timeout
        sends a new id, so copies are not recognized: prefer a business id."""
        return cls((lambda r: r.rocketmq_id,), "RocketMQ's message id")

    @classmethod
    def outbox_then(cls, *others: MessageIdFrom) -> MessageIdFrom:
        """The outbox's own id, else the given sources in order."""
        default = cls()
        sources = default.sources + tuple(s for o in others for s in o.sources)
        return cls(sources, "; then ".join([default.description,
                                            *(o.description for o in others)]))


def _property(name: str) -> IdSource:
    return lambda r: r.properties.get(name)


def _json_field(body: bytes, path: Sequence[str]) -> str | None:
    try:
        value: object = json.loads(body)
    except (ValueError, RecursionError):
        return None
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str | int):
        return str(value)
    return None


def key_and_keys(received: Received) -> tuple[str | None, tuple[str, ...]]:
    """A received message's key, and its keys as the handler sees them. Our messages
    name their key (``OUTBOX_KEY``) and carry their id among the keys, which is left
    out here; another producer's message gets its first key in sorted order."""
    keys = received.keys
    key = None
    own_id = received.properties.get(MESSAGE_ID_PROPERTY)
    if own_id is not None:
        key = received.properties.get(KEY_PROPERTY)
        keys = tuple(k for k in keys if k != own_id or k == key)
    if key is None:
        key = keys[0] if keys else None
    return key, keys


def to_delivery(received: Received, tag: str | None, attempt: int, handle: object,
                id_from: MessageIdFrom) -> Delivery:
    """A received message as the consumer's :class:`~outbox.transport.Delivery`."""
    key, keys = key_and_keys(received)
    return Delivery(
        topic=received.topic, payload=received.body, message_id=id_from(received),
        attempt=attempt, key=key, tag=tag or None,
        headers=headers_of(received.properties, keys), handle=handle,
    )


def to_message(received: Received, tag: str | None) -> Message:
    """The outbox message inside a received (or checked-back) message; raises
    MessageError when it is not one of ours (no outbox id)."""
    key, keys = key_and_keys(received)
    return Message(
        id=received.properties.get(MESSAGE_ID_PROPERTY) or "", topic=received.topic,
        payload=received.body, key=key, tag=tag or None,
        headers=headers_of(received.properties, keys),
    )
