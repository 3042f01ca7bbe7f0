"""Everything that touches the ``rocketmq`` client module, imported lazily.

``import rocketmq`` reconfigures the process's logging (it calls dictConfig, which
closes existing handlers); the import here puts the application's logging back.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from typing import Any

from outbox.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    OutboxError,
    PublishError,
)
from outbox.log import get_logger
from outbox.message import Message
from outbox.transport import Delivery

from .config import RocketMQConfig
from .mapping import MessageIdFrom, Received, keys_of, ordered_keys, properties_of, to_message
from .mapping import to_delivery as mapped_delivery


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


def to_rocketmq(message: Message) -> Any:
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
    return out


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
    if name in ("IllegalArgumentException", "BadRequestException", "PayloadTooLargeException",
                "PayloadEmptyException"):
        return PublishError(f"{what}: {where} refused the message: {name}: {text}")
    return BrokerUnavailableError(
        f"{what}: {where} is not reachable or did not answer ({name}: {text[:300]}); "
        "check that the proxy runs and listens there"
    )
