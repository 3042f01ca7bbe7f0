"""Normal sends, for a relay that publishes outbox rows to RocketMQ."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from outbox.errors import ConfigurationError
from outbox.message import Message

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

    def publish(self, message: Message) -> None:
        if message.topic not in self.topics:
            raise ConfigurationError(
                f"topic {message.topic!r} is not among this publisher's topics {list(self.topics)}"
            )
        try:
            self._started().send(to_rocketmq(message))
        except ConfigurationError:
            raise
        except Exception as exc:
            raise wrap_error(exc, self.config, f"publishing message {message.id}") from None

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        shutdown_quietly(producer)
