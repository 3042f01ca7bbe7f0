"""Brokers by URL: ``open_broker("kafka://127.0.0.1:9092")`` and the like.

A broker adapter is a module with a ``connect(url, **options)`` function returning a
:class:`Broker`: the one object from which the relay takes its publisher and a
consumer its subscriber, in sync and asyncio forms. The URL's scheme picks the
adapter:

====================  ===================  ================================
scheme                module               install
====================  ===================  ================================
``redis``/``rediss``  ``outbox_redis``     ``pip install 'outbox[redis]'``
``kafka``             ``outbox_kafka``     ``pip install 'outbox[kafka]'``
``amqp``/``amqps``    ``outbox_rabbitmq``  ``pip install 'outbox[rabbitmq]'``
``nats``/``tls``      ``outbox_nats``      ``pip install 'outbox[nats]'``
====================  ===================  ================================

A package of the user's own joins the table through the ``outbox.brokers`` entry
point group (name: the scheme, value: ``module:connect``). Passwords in a URL never
appear in an error message or a log line: the URL is shown with them masked.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigurationError
from .typing import AsyncPublisher, AsyncSubscriber, Publisher, Subscriber


@runtime_checkable
class Broker(Protocol):
    """One broker, reached from one URL; hands out publishers and subscribers.

    ``publisher()`` is what the relay publishes through (it has ``publish_batch``
    where the broker can batch); ``subscriber(topic, group)`` is what an
    :class:`~outbox.IdempotentConsumer` reads from. The ``async_`` forms are the same
    for asyncio services. A subscriber's ``options`` are the adapter's own; every
    adapter of the project takes ``visibility_timeout`` (seconds before an
    unacknowledged delivery may come back, where the broker has such a time). Whatever
    the broker needs before it can carry a topic
    (a stream, a queue, an exchange) is declared by these calls, idempotently.
    """

    def publisher(self) -> Publisher: ...

    def subscriber(self, topic: str, group: str, **options: Any) -> Subscriber: ...

    def async_publisher(self) -> AsyncPublisher: ...

    def async_subscriber(self, topic: str, group: str, **options: Any) -> AsyncSubscriber: ...

    def close(self) -> None: ...


#: scheme -> (module, extra to install)
BUILTIN: dict[str, tuple[str, str]] = {
    "redis": ("outbox_redis", "redis"),
    "rediss": ("outbox_redis", "redis"),
    "kafka": ("outbox_kafka", "kafka"),
    "amqp": ("outbox_rabbitmq", "rabbitmq"),
    "amqps": ("outbox_rabbitmq", "rabbitmq"),
    "nats": ("outbox_nats", "nats"),
    "tls": ("outbox_nats", "nats"),
}

ENTRY_POINT_GROUP = "outbox.brokers"


def masked(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query,
                       parts.fragment))


def _connector(scheme: str) -> Callable[..., Any]:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == scheme:
            loaded = ep.load()
            if not callable(loaded):
                raise ConfigurationError(
                    f"entry point {ep.value!r} of {ENTRY_POINT_GROUP} is not a function")
            return loaded  # type: ignore[no-any-return]
    if scheme not in BUILTIN:
        known = ", ".join(sorted(BUILTIN))
        raise ConfigurationError(
            f"no broker adapter for URLs starting {scheme}://; known: {known} (or register "
            f"one under the {ENTRY_POINT_GROUP!r} entry point group)")
    module_name, extra = BUILTIN[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"{scheme}:// URLs need the {module_name} adapter and its client library "
            f"({exc.name or exc}); install it with  pip install 'outbox[{extra}]'"
        ) from exc
    connect: Callable[..., Any] = module.connect
    return connect


def scheme_of(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ConfigurationError(
            f"broker URL {masked(url)!r} has no scheme; write it like redis://HOST:PORT/DB "
            "(or the scheme of an adapter of your own)")
    return scheme.lower()


def open_broker(url: str, **options: Any) -> Broker:
    """The :class:`Broker` for ``url``, by its scheme (see the module's table)."""
    broker = _connector(scheme_of(url))(url, **options)
    if not isinstance(broker, Broker):
        raise ConfigurationError(
            f"the adapter for {scheme_of(url)}:// returned {type(broker).__name__}, which "
            "lacks publisher/subscriber/async_publisher/async_subscriber/close")
    return broker
