"""What message types a RocketMQ 5.x topic accepts, as the proxy tells a started gRPC
client (a ``Producer`` or ``SimpleConsumer`` of the ``rocketmq`` module).

A 5.x topic is created with one message type (its ``message.type`` attribute):
``NORMAL``, ``FIFO``, ``DELAY`` or ``TRANSACTION``; ``MIXED`` takes all four (the broker
needs ``enableMixedMessageType=true``). The proxy sends the types with every queue of
the topic's route (``accept_message_types``) and refuses a send of another type
("message type not match"); the client keeps the route of each topic it was started
with and refreshes it every 30 s, so reading it costs no request::

    types = accepted_types(producer, "bank-transfer")   # after producer.startup()
    allows_normal(types)   # a plain send (relay, guard row, fallback row) goes through
    is_fifo(types)         # every send needs a message group (the outbox key)
    allows_delay(types)    # a send may carry a delivery timestamp
    type_name(types)       # "MIXED", "TRANSACTION", ... for messages to people

``accepted_types`` raises what the client raises when it has no route for the topic
(a topic that does not exist, a proxy that is down); ``_client.wrap_error(exc, config,
what)`` turns that into the project's error with what to do. Nothing here sends.

How the relay's publisher uses it (``_client.outgoing``): on a FIFO topic a message's
key is its message group; a delivery time still ahead becomes the delivery timestamp
on a topic that allows DELAY. A MIXED topic is not FIFO (it allows plain sends, and the
publisher sends plain messages there): per-key order on the broker needs a FIFO topic.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from outbox.errors import ConfigurationError

NORMAL = "NORMAL"
FIFO = "FIFO"
DELAY = "DELAY"
TRANSACTION = "TRANSACTION"
#: What a MIXED topic accepts.
MIXED = frozenset({NORMAL, FIFO, DELAY, TRANSACTION})

#: The protocol's ``MessageType`` numbers (``apache.rocketmq.v2``); LITE and PRIORITY
#: come from newer protocol versions (the 5.3 proxy never sends them).
_TYPE_NAMES = {1: NORMAL, 2: FIFO, 3: DELAY, 4: TRANSACTION, 5: "LITE", 6: "PRIORITY"}


def type_names(codes: Iterable[int]) -> frozenset[str]:
    """The names of the protocol's message type numbers; 0 (unspecified) and numbers
    this module does not know are left out."""
    return frozenset(_TYPE_NAMES[c] for c in codes if c in _TYPE_NAMES)


def accepted_types(client: Any, topic: str) -> frozenset[str]:
    """The message types ``topic`` accepts (``NORMAL``, ``FIFO``, ``DELAY``,
    ``TRANSACTION``; all four for a MIXED topic), from the route ``client`` (a started
    5.x client) keeps for it. A topic the client was not started with costs one route
    request (blocking, at most the request timeout).

    Raises what the client raises when there is no route (wrap it with
    ``_client.wrap_error``), and ConfigurationError for a route without queues."""
    route = client._retrieve_topic_route_data(topic)
    queues = list(route.message_queues)
    if not queues:
        raise ConfigurationError(f"topic {topic!r} has no message queues in its route")
    codes: set[int] = set()
    for queue in queues:
        codes.update(queue.accept_message_types)
    return type_names(codes)


def allows_normal(types: frozenset[str]) -> bool:
    """Whether a plain send (no message group, no delivery timestamp, not a half
    message) goes through: NORMAL and MIXED topics. A TRANSACTION topic refuses it, so
    a guard row or a fallback row, which a relay publishes plainly, needs MIXED."""
    return NORMAL in types


def is_fifo(types: frozenset[str]) -> bool:
    """Whether the topic is a FIFO topic: it takes FIFO messages and no plain ones, so
    every send must carry a message group (the broker keeps a group's messages in
    their order, in one queue). MIXED is not: it takes plain sends as well."""
    return FIFO in types and NORMAL not in types


def allows_delay(types: frozenset[str]) -> bool:
    """Whether a send may carry a delivery timestamp (DELAY and MIXED topics)."""
    return DELAY in types


def is_delay(types: frozenset[str]) -> bool:
    """Whether the topic is a DELAY topic: it takes delayed messages and no plain ones,
    so every send carries a delivery timestamp (one already past is delivered at once)."""
    return DELAY in types and NORMAL not in types


def type_name(types: frozenset[str]) -> str:
    """The topic's type as ``mqadmin updateTopic`` names it: ``MIXED`` for all four,
    the one name for one type, else the names joined with ``+`` (``NONE`` for none)."""
    if types >= MIXED:
        return "MIXED"
    if not types:
        return "NONE"
    return "+".join(sorted(types))
