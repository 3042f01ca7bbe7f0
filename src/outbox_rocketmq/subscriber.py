"""A RocketMQ simple consumer as an outbox Subscriber, for IdempotentConsumer."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog

from outbox.errors import ConfigurationError
from outbox.transport import Delivery

from ._client import client_configuration, rocketmq, shutdown_quietly, to_delivery, wrap_error
from .config import RocketMQConfig

log = structlog.get_logger("outbox.rocketmq")

#: The proxy refuses invisible durations below this many seconds on receive.
MIN_INVISIBLE_SECONDS = 10
#: How long after startup "no settings" from the proxy means "not yet" rather than
#: "the proxy forgot this client" (it restarted).
SETTINGS_GRACE_SECONDS = 10.0
DEAD_REASON_PROPERTY = "OUTBOX_DEAD_REASON"


class RocketMQSubscriber:
    """Receives one topic for one consumer group through a RocketMQ SimpleConsumer.

    Unacknowledged messages come back after ``invisible_seconds``. ``retry`` uses
    RocketMQ's own redelivery (the message becomes visible again after the delay
    and its delivery attempt grows); past the group's maximum the broker moves it
    to the group's dead-letter topic ``%DLQ%<group>``. ``dead_letter`` (an
    undecodable message, a handler that gave up) sends a copy with the reason in
    property ``OUTBOX_DEAD_REASON`` to ``dead_letter_topic`` and acknowledges the
    original, so nothing is dropped silently.
    """

    def __init__(
        self,
        config: RocketMQConfig,
        topic: str,
        group: str,
        *,
        dead_letter_topic: str,
        invisible_seconds: int = 30,
    ) -> None:
        if invisible_seconds < MIN_INVISIBLE_SECONDS:
            raise ConfigurationError(
                f"invisible_seconds must be at least {MIN_INVISIBLE_SECONDS} (a proxy limit)"
            )
        if not dead_letter_topic or dead_letter_topic == topic:
            raise ConfigurationError("dead_letter_topic must name another (NORMAL) topic")
        self.config = config
        self.topic = topic
        self.group = group
        self.dead_letter_topic = dead_letter_topic
        self.invisible_seconds = invisible_seconds
        self._consumer: Any = None
        self._consumer_started = 0.0
        self._dead_producer: Any = None
        self._lock = threading.Lock()

    def _started(self) -> Any:
        with self._lock:
            if self._consumer is None:
                rmq = rocketmq()
                try:
                    consumer = rmq.SimpleConsumer(
                        client_configuration(self.config), self.group,
                        {self.topic: rmq.FilterExpression()}, 1,
                    )
                    consumer.startup()
                except Exception as exc:
                    raise wrap_error(exc, self.config, f"subscribing to {self.topic}") from None
                self._consumer = consumer
                self._consumer_started = time.monotonic()
            return self._consumer

    def _restart(self, consumer: Any) -> None:
        """Drop ``consumer`` so that the next fetch starts a new one.

        A client started before the proxy restarted never recovers: its receives
        fail, or the new proxy, which never got the client's settings, answers
        "settings null" for ever. Acknowledgements of messages received earlier
        still work through the new client (a receipt belongs to the group).
        """
        with self._lock:
            if self._consumer is not consumer:
                return  # another thread did it already
            self._consumer = None
        log.warning("rocketmq_consumer_restarting", topic=self.topic, group=self.group)
        shutdown_quietly(consumer)

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        consumer = self._started()
        # The client long-polls for its await duration, in whole seconds (at least 1).
        consumer.await_duration = max(1, int(wait_seconds))
        try:
            received = consumer.receive(max(1, min(max_messages, 32)), self.invisible_seconds)
        except Exception as exc:
            young = time.monotonic() - self._consumer_started < SETTINGS_GRACE_SECONDS
            if "settings" in str(exc) and "null" in str(exc) and young:
                # Right after startup the proxy has not got the consumer's settings yet.
                time.sleep(min(wait_seconds, 0.2))
                return []
            error = wrap_error(exc, self.config, f"receiving from {self.topic}")
            if not isinstance(error, ConfigurationError):
                self._restart(consumer)
            raise error from None
        return [to_delivery(m) for m in received or ()]

    def ack(self, delivery: Delivery) -> None:
        try:
            self._started().ack(delivery.handle)
        except Exception as exc:
            raise wrap_error(exc, self.config, f"acknowledging {delivery.message_id}") from None

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        try:
            self._started().change_invisible_duration(delivery.handle, max(1, round(delay_seconds)))
        except Exception as exc:
            # It becomes visible again after invisible_seconds anyway.
            log.warning("rocketmq_retry_delay_not_set", error=f"{type(exc).__name__}: {exc}",
                        message_id=delivery.message_id, topic=self.topic)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        rmq = rocketmq()
        copy = rmq.Message()
        copy.topic = self.dead_letter_topic
        copy.body = delivery.payload or b"-"
        received = delivery.handle
        for name, value in dict(received.properties or {}).items():
            if value and value.strip():
                copy.add_property(name, value)
        copy.add_property(DEAD_REASON_PROPERTY, reason.strip() or "no reason given")
        copy.add_property("OUTBOX_DEAD_GROUP", self.group)
        copy.add_property("OUTBOX_ORIGINAL_TOPIC", self.topic)
        try:
            with self._lock:
                if self._dead_producer is None:
                    producer = rmq.Producer(client_configuration(self.config),
                                            (self.dead_letter_topic,))
                    producer.startup()
                    self._dead_producer = producer
            self._dead_producer.send(copy)
        except Exception as exc:
            raise wrap_error(exc, self.config, "dead-lettering "
                             f"{delivery.message_id} to {self.dead_letter_topic}") from None
        self.ack(delivery)
        log.error("rocketmq_dead_lettered", reason=reason, message_id=delivery.message_id,
                  topic=self.topic, group=self.group)

    def close(self) -> None:
        with self._lock:
            consumer, self._consumer = self._consumer, None
            producer, self._dead_producer = self._dead_producer, None
        shutdown_quietly(consumer)
        shutdown_quietly(producer)
