"""Normal sends, for a relay that publishes outbox rows to RocketMQ (``Relay`` with
:class:`RocketMQPublisher`, ``AsyncRelay`` with :class:`AsyncRocketMQPublisher`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import Any

from outbox.errors import ConfigurationError, OutboxError
from outbox.message import Message

from ._aio import BlockingCalls
from ._client import client_configuration, rocketmq, shutdown_quietly, to_rocketmq, wrap_error
from .config import RocketMQConfig


class RocketMQPublisher:
    """Publisher of normal messages, for :class:`outbox.Relay`.

    A topic that also receives transactional half messages (the fallback path)
    must be of type MIXED: the proxy refuses a normal send to a TRANSACTION topic.
    """

    def __init__(self, config: RocketMQConfig, topics: Iterable[str]) -> None:
        self.config = config
        self.topics = tuple(dict.fromkeys(topics))
        if not self.topics:
            raise ConfigurationError("name at least one topic the publisher sends to")
        self._producer: Any = None
        self._lock = threading.Lock()

    def _started(self) -> Any:
        with self._lock:
            if self._producer is None:
                producer = rocketmq().Producer(client_configuration(self.config), self.topics)
                try:
                    producer.startup()
                except Exception as exc:
                    raise wrap_error(exc, self.config, "starting the RocketMQ publisher") from None
                self._producer = producer
            return self._producer

    def _outgoing(self, message: Message) -> Any:
        """The client's message for ``message``; refuses a topic not named at start."""
        if message.topic not in self.topics:
            raise ConfigurationError(
                f"topic {message.topic!r} is not among this publisher's topics {list(self.topics)}"
            )
        return to_rocketmq(message)

    def _failed(self, exc: Exception, message: Message) -> OutboxError:
        if isinstance(exc, OutboxError):
            return exc
        return wrap_error(exc, self.config, f"publishing message {message.id}")

    def publish(self, message: Message) -> None:
        """Send ``message``; raises PublishError (BrokerUnavailableError) when it cannot."""
        outgoing = self._outgoing(message)
        try:
            self._started().send(outgoing)
        except Exception as exc:
            raise self._failed(exc, message) from None

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        shutdown_quietly(producer)


class AsyncRocketMQPublisher:
    """:class:`RocketMQPublisher` for :class:`outbox.AsyncRelay`: each send is the
    client's ``send_async`` future, awaited; startup and shutdown (blocking in the
    client) run on a small pool of ``workers`` threads."""

    def __init__(self, config: RocketMQConfig, topics: Iterable[str], *,
                 workers: int = 2) -> None:
        self._sync = RocketMQPublisher(config, topics)
        self._calls = BlockingCalls("outbox-rocketmq-publisher", workers)

    @property
    def config(self) -> RocketMQConfig:
        return self._sync.config

    @property
    def topics(self) -> tuple[str, ...]:
        return self._sync.topics

    async def publish(self, message: Message) -> None:
        """Send ``message`` without blocking the event loop."""
        sync = self._sync
        outgoing = sync._outgoing(message)
        try:
            producer = await self._calls.run(sync._started)
            await asyncio.wrap_future(producer.send_async(outgoing))
        except Exception as exc:
            # Telling a missing topic from a proxy that is down probes a TCP connection.
            raise await self._calls.run(sync._failed, exc, message) from None

    async def close(self) -> None:
        await self._calls.run(self._sync.close)
        self._calls.shutdown(wait=False)
