"""Everything that touches the ``rocketmq`` client module, imported lazily.

``import rocketmq`` reconfigures the process's logging (it calls dictConfig, which
closes existing handlers); the import here puts the application's logging back.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import math
import socket
from typing import Any

from outbox.envelope import delivery_time, format_utc
from outbox.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    OutboxError,
    PublishError,
)
from outbox.log import get_logger
from outbox.message import Message
from outbox.schema import utcnow
from outbox.transport import Delivery

from .config import RocketMQConfig
from .mapping import MessageIdFrom, Received, keys_of, ordered_keys, properties_of, to_message
from .mapping import to_delivery as mapped_delivery
from .topics import accepted_types, allows_delay, is_delay, is_fifo, type_name

#: The longest message group the proxy takes (its ``maxMessageGroupSize``, in Java
#: chars, i.e. UTF-16 code units).
MAX_MESSAGE_GROUP = 64


@functools.cache
def rocketmq() -> Any:
    """The client module, imported once with the application's logging preserved."""
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate, lg.disabled)
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    try:
        import rocketmq as module
    except ImportError as exc:
        raise ConfigurationError(
            'the RocketMQ adapter needs its client: pip install "outbox[rocketmq]"'
        ) from exc
    finally:
        root.handlers[:], root.level = saved_root
        for name, (handlers, level, propagate, disabled) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
            lg.disabled = disabled
    return module


def shutdown_quietly(client: Any) -> None:
    """Shut a producer or consumer down; a failure only gets logged (we are leaving)."""
    if client is None:
        return
    try:
        client.shutdown()
    except Exception as exc:
        get_logger("outbox.rocketmq").warning(
            "rocketmq_shutdown_failed", error=f"{type(exc).__name__}: {exc}")


def client_configuration(config: RocketMQConfig) -> Any:
    rmq = rocketmq()
    credentials = (
        rmq.Credentials(config.access_key, config.secret_key)
        if config.access_key is not None else rmq.Credentials()
    )
    # The client wants whole seconds: a float breaks its gRPC calls deep inside.
    timeout = max(1, math.ceil(config.request_timeout))
    return rmq.ClientConfiguration(config.endpoints, credentials, config.namespace, timeout)


def to_rocketmq(message: Message, *, message_group: str | None = None,
                delivery_timestamp: int | None = None) -> Any:
    """The client's message for ``message``; with a FIFO ``message_group``, or a
    ``delivery_timestamp`` (whole seconds since the epoch, what the client sends)."""
    if not message.payload:
        # The 5.x client refuses it itself ("body should not be blank").
        raise PublishError(
            f"message {message.id!r} has an empty payload, which the RocketMQ 5 client "
            "refuses; give it at least one byte (b'{}', say), or publish it over the "
            "remoting protocol (RocketMQConfig(namesrv=...)), which carries it")
    rmq = rocketmq()
    out = rmq.Message()
    out.topic = message.topic
    out.body = message.payload
    if message.tag:
        out.tag = message.tag
    for key in keys_of(message):
        out.keys = key  # the client adds each to its set of keys
    for name, value in properties_of(message).items():
        out.add_property(name, value)
    if message_group is not None:
        out.message_group = message_group
    if delivery_timestamp is not None:
        out.delivery_timestamp = delivery_timestamp
    return out


def _java_length(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _acceptable_group(group: str) -> bool:
    """What the proxy takes as a message group: not blank, at most 64 Java chars, no
    ISO control characters (U+0000-U+001F, U+007F-U+009F)."""
    return (bool(group.strip()) and _java_length(group) <= MAX_MESSAGE_GROUP
            and not any(c <= "\x1f" or "\x7f" <= c <= "\x9f" for c in group))


def message_group(message: Message) -> str:
    """The FIFO message group ``message`` is sent with: its key, so that the broker
    keeps a key's messages in their order (in one queue, and a FIFO consumer group
    gets the next only after the one before it). A message without a key gets its
    id: a group of its own, ordered with nothing else. A key (or id) the proxy would
    refuse as a group (longer than 64 chars, control characters) is replaced by a
    digest of it, ``sha256-`` and 48 hex digits: the same key, the same group."""
    value = message.key or message.id
    if _acceptable_group(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return "sha256-" + digest[:48]


def _epoch(when: dt.datetime) -> float:
    return when.replace(tzinfo=dt.UTC).timestamp()


def for_topic(message: Message, client: Any, config: RocketMQConfig, *,
             now: dt.datetime | None = None) -> Any:
    """The client's message for a plain (not transactional) send of ``message`` on
    the 5.x proxy, as the topic's type (:mod:`.topics`, from ``client``'s route) asks:

    - FIFO topic: the message group is the key (:func:`message_group`).
    - A delivery time (header ``outbox-deliver-at``) still ahead of ``now``: on a
      topic that allows DELAY (DELAY, MIXED) the delivery timestamp, rounded up to the
      second (never early); on any other topic ConfigurationError: use a DELAY topic,
      or leave the holding to the local outbox, whose relay publishes a row only once
      it is due.
    - DELAY topic (it takes no plain sends): every message carries a delivery
      timestamp; one that is due (or has none) carries the current second, and the
      broker delivers it at once.

    When the route cannot be read (a topic that does not exist, a client without
    routes) the message goes as a plain one, and the send reports why; unless it is
    to be delayed, which needs the topic's type: then the wrapped route error."""
    due = delivery_time(message.headers)
    now = utcnow() if now is None else now
    hold = due if due is not None and due > now else None  # still ahead: hold it back
    try:
        types = accepted_types(client, message.topic)
    except Exception as exc:
        if hold is not None:
            raise wrap_error(exc, config, f"publishing message {message.id}") from None
        return to_rocketmq(message)
    if hold is not None and not allows_delay(types):
        raise ConfigurationError(
            f"message {message.id} is to be delivered at {format_utc(hold)}, but topic "
            f"{message.topic!r} ({type_name(types)}) takes no delayed messages: send it to "
            "a DELAY topic (or MIXED), or leave the holding to the local outbox (its "
            "relay publishes a row only once it is due)"
        )
    if is_fifo(types):
        return to_rocketmq(message, message_group=message_group(message))
    if hold is not None:
        return to_rocketmq(message, delivery_timestamp=math.ceil(_epoch(hold)))
    if is_delay(types):
        return to_rocketmq(message, delivery_timestamp=math.floor(_epoch(now)))
    return to_rocketmq(message)


def received(message: Any) -> Received:
    """What the mapping reads of a message the 5.x client received."""
    return Received(
        topic=message.topic, body=bytes(message.body or b""),
        keys=ordered_keys(message.keys), properties=dict(message.properties or {}),
        rocketmq_id=message.message_id or None,
    )


def from_rocketmq(message: Any) -> Message:
    """The outbox message inside a received (or checked-back) RocketMQ message."""
    return to_message(received(message), message.tag)


def to_delivery(message: Any, id_from: MessageIdFrom) -> Delivery:
    return mapped_delivery(received(message), message.tag,
                           int(message.delivery_attempt or 1), message, id_from)


def proxy_listens(config: RocketMQConfig) -> bool:
    """Whether the first endpoint accepts a TCP connection (on the error path only)."""
    host, _, port = config.endpoints.split(";")[0].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def wrap_error(exc: BaseException, config: RocketMQConfig, what: str) -> OutboxError:
    """Turn a client error into one of ours, with what to do about it."""
    text = str(exc)
    name = type(exc).__name__
    lowered = text.lower()
    where = f"RocketMQ proxy {config.endpoints}"
    if name in ("UnauthorizedException", "ForbiddenException") or "signature" in lowered:
        return ConfigurationError(
            f"{what}: {where} refused the credentials ({name}); check access_key and "
            "secret_key and the ACL of the topic"
        )
    missing = "failed to fetch topic" in lowered and proxy_listens(config)
    if missing or name == "NotFoundException" or "no topic route" in lowered:
        # The client says the same when the proxy is down and when the topic is
        # missing; a proxy that accepts connections means the topic is missing.
        return ConfigurationError(
            f"{what}: {where} has no route for the topic: it does not exist (or is not "
            "visible with these credentials); create it with mqadmin updateTopic, e.g. "
            "OUTBOX_RMQ_TOPICS=name:TRANSACTION scripts/rocketmq up"
        )
    if "message type not match" in lowered or "messagetype" in lowered.replace(" ", ""):
        return ConfigurationError(
            f"{what}: the topic's message type does not allow this send ({text}); "
            "transactional sends need a TRANSACTION topic, and the outbox fallback needs MIXED"
        )
    if "max delay time" in lowered:
        return PublishError(
            f"{what}: {where} refused the delivery time ({text}); the proxy holds a message "
            "at most its maxDelayTimeMills (one day by default): leave longer holds to "
            "the local outbox"
        )
    if name in ("IllegalArgumentException", "BadRequestException", "PayloadTooLargeException",
                "PayloadEmptyException"):
        return PublishError(f"{what}: {where} refused the message: {name}: {text}")
    return BrokerUnavailableError(
        f"{what}: {where} is not reachable or did not answer ({name}: {text[:300]}); "
        "check that the proxy runs and listens there"
    )
