"""A RocketMQ simple consumer as an outbox Subscriber: :class:`RocketMQSubscriber` for
``IdempotentConsumer``, :class:`AsyncRocketMQSubscriber` for ``AsyncIdempotentConsumer``.

The sync class holds the decisions (when a failed receive means "not yet", when the
client must be replaced, what a dead-letter copy carries); the asyncio class awaits
the same steps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

from outbox.errors import ConfigurationError, OutboxError
from outbox.log import get_logger
from outbox.transport import Delivery

from ._aio import BlockingCalls
from ._client import client_configuration, rocketmq, shutdown_quietly, to_delivery, wrap_error
from .config import RocketMQConfig
from .mapping import MessageIdFrom, dead_letter_properties, ordered_keys
from .remoting.consumer import RemotingSubscriber
from .topics import accepted_types, is_fifo

log = get_logger("outbox.rocketmq")

#: The proxy refuses invisible durations below this many seconds on receive.
MIN_INVISIBLE_SECONDS = 10
#: How long after startup "no settings" from the proxy means "not yet" rather than
#: "the proxy forgot this client" (it restarted).
SETTINGS_GRACE_SECONDS = 10.0
#: How long a fetch waits when the proxy has not got a young client's settings yet.
NOT_YET_SECONDS = 0.2


class RocketMQSubscriber:
    """Receives one topic for one consumer group through a RocketMQ SimpleConsumer
    (5.x proxy), or as a member of the group on 4.x brokers when the config names a
    name server (offsets on the broker, retries through the group's retry topic).

    ``group`` is the RocketMQ consumer group: the broker keeps one position per group
    and topic, and each message goes to one member of the group. Unacknowledged
    messages come back after ``invisible_seconds``. ``retry`` uses RocketMQ's own
    redelivery (the message becomes visible again after the delay and its delivery
    attempt grows); past the group's maximum the broker moves it to the group's
    dead-letter topic ``%DLQ%<group>``. ``dead_letter`` (an undecodable message, a
    handler that gave up) sends a copy with the reason in property
    ``OUTBOX_DEAD_REASON`` to ``dead_letter_topic`` and acknowledges the original,
    so nothing is dropped silently.

    ``orderly=True`` (4.x, a config with a name server): per-key order. The member
    locks its queues on the broker and consumes only those it holds; a key's next
    message is handed out only once the one before it was acknowledged or
    dead-lettered; a retry waits its delay in this process, holding its key (the
    retry topic would break the order) while the queue's other keys go on.

    Through the 5.x proxy, order comes from the broker: a FIFO topic (the relay's
    publisher sends each key as its message group) read by a FIFO consumer group
    (``mqadmin updateSubGroup ... -o true``) hands out a queue's next message only
    after the one before it was acknowledged, and a retry holds its queue. On a FIFO
    topic the subscriber receives one message at a time (the broker may hand out
    several of one queue in one receive, and the consumer would handle them all);
    ``orderly=True`` there only checks, at the first fetch, that the topic is FIFO.
    """

    #: Through the 5.x proxy Delivery.attempt is the broker's own count of deliveries
    #: (outbox.typing.CountsDeliveries); on 4.x it is not (see RemotingSubscriber), and
    #: the consumer counts failed attempts in its own database.
    counts_deliveries: bool = True

    def __init__(
        self,
        config: RocketMQConfig,
        topic: str,
        group: str,
        *,
        dead_letter_topic: str,
        invisible_seconds: int = 30,
        message_id_from: MessageIdFrom | None = None,
        orderly: bool = False,
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
        self.message_id_from = message_id_from or MessageIdFrom()
        self.orderly = orderly
        #: With a name server in the config: a member of the group on 4.x brokers.
        self._remoting = RemotingSubscriber(
            config.namesrv, topic, group, dead_letter_topic=dead_letter_topic,
            message_id_from=self.message_id_from, request_timeout=config.request_timeout,
            orderly=orderly,
        ) if config.namesrv is not None else None
        self.counts_deliveries = self._remoting is None
        self._consumer: Any = None
        #: Whether the topic is a 5.x FIFO topic (read from the route at start).
        self._fifo = False
        self._consumer_started = 0.0
        self._dead_producer: Any = None
        self._lock = threading.Lock()

    # -- the steps both forms take (blocking ones run on the async form's pool) ------

    def _started(self) -> Any:
        with self._lock:
            if self._consumer is None:
                rmq = rocketmq()
                consumer = None
                try:
                    consumer = rmq.SimpleConsumer(
                        client_configuration(self.config), self.group,
                        {self.topic: rmq.FilterExpression()}, 1,
                    )
                    consumer.startup()
                    self._fifo = is_fifo(accepted_types(consumer, self.topic))
                except Exception as exc:
                    shutdown_quietly(consumer)
                    raise wrap_error(exc, self.config, f"subscribing to {self.topic}") from None
                if self.orderly and not self._fifo:
                    shutdown_quietly(consumer)
                    raise ConfigurationError(
                        f"orderly=True through the 5.x proxy needs a FIFO topic, and "
                        f"{self.topic!r} is not one: per-key order on 5.x comes from a FIFO "
                        "topic (mqadmin updateTopic ... -a +message.type=FIFO) read by a "
                        "FIFO consumer group (mqadmin updateSubGroup ... -o true)")
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

    def _batch(self, consumer: Any, max_messages: int, wait_seconds: float) -> int:
        """Set up one receive: the long-poll wait, in whole seconds (at least 1), and
        how many messages to ask for (the proxy takes at most 32)."""
        consumer.await_duration = max(1, int(wait_seconds))
        if self._fifo:
            return 1  # a failed message must come back before its queue's next one
        return max(1, min(max_messages, 32))

    def _receive_failed(self, exc: Exception, consumer: Any) -> OutboxError | None:
        """What a failed receive means: None for "not yet" (the proxy has not got a
        young client's settings), else the error to raise, after replacing the client
        unless the cause is the configuration."""
        young = time.monotonic() - self._consumer_started < SETTINGS_GRACE_SECONDS
        if "settings" in str(exc) and "null" in str(exc) and young:
            return None
        error = wrap_error(exc, self.config, f"receiving from {self.topic}")
        if not isinstance(error, ConfigurationError):
            self._restart(consumer)
        return error

    def _ack_failed(self, exc: Exception, delivery: Delivery) -> OutboxError:
        if isinstance(exc, OutboxError):
            return exc
        return wrap_error(exc, self.config, f"acknowledging {delivery.message_id}")

    def _retry_not_set(self, exc: Exception, delivery: Delivery) -> None:
        # It becomes visible again after invisible_seconds anyway.
        log.warning("rocketmq_retry_delay_not_set", error=f"{type(exc).__name__}: {exc}",
                    message_id=delivery.message_id, topic=self.topic)

    def _dead_copy(self, delivery: Delivery, reason: str) -> Any:
        """The copy of ``delivery`` that goes to the dead-letter topic: the body, tag,
        keys and properties of the original, its de-duplication id as the outbox
        message id, RocketMQ's id of the original, and why."""
        original = delivery.handle
        copy = rocketmq().Message()
        copy.topic = self.dead_letter_topic
        copy.body = delivery.payload or b"-"
        if original.tag:
            copy.tag = original.tag
        for key in ordered_keys(original.keys):
            copy.keys = key  # the client's setter adds one key at a time
        for name, value in dead_letter_properties(
                dict(original.properties or {}), message_id=delivery.message_id,
                original_id=original.message_id, reason=reason, group=self.group,
                topic=self.topic).items():
            copy.add_property(name, value)
        return copy

    def _dead_letter_producer(self) -> Any:
        with self._lock:
            if self._dead_producer is None:
                producer = rocketmq().Producer(client_configuration(self.config),
                                               (self.dead_letter_topic,))
                producer.startup()
                self._dead_producer = producer
            return self._dead_producer

    def _dead_letter_failed(self, exc: Exception, delivery: Delivery) -> OutboxError:
        return wrap_error(exc, self.config, "dead-lettering "
                          f"{delivery.message_id} to {self.dead_letter_topic}")

    def _dead_lettered(self, delivery: Delivery, reason: str) -> None:
        log.error("rocketmq_dead_lettered", reason=reason, message_id=delivery.message_id,
                  topic=self.topic, group=self.group)

    # -- the sync Subscriber ---------------------------------------------------------

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        if self._remoting is not None:
            return self._remoting.fetch(max_messages, wait_seconds)
        consumer = self._started()
        count = self._batch(consumer, max_messages, wait_seconds)
        try:
            received = consumer.receive(count, self.invisible_seconds)
        except Exception as exc:
            error = self._receive_failed(exc, consumer)
            if error is None:
                time.sleep(min(wait_seconds, NOT_YET_SECONDS))
                return []
            raise error from None
        return [to_delivery(m, self.message_id_from) for m in received or ()]

    def ack(self, delivery: Delivery) -> None:
        if self._remoting is not None:
            return self._remoting.ack(delivery)
        try:
            self._started().ack(delivery.handle)
        except Exception as exc:
            raise self._ack_failed(exc, delivery) from None

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        if self._remoting is not None:
            return self._remoting.retry(delivery, delay_seconds, error)
        try:
            self._started().change_invisible_duration(delivery.handle, max(1, round(delay_seconds)))
        except Exception as exc:
            self._retry_not_set(exc, delivery)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        if self._remoting is not None:
            return self._remoting.dead_letter(delivery, reason)
        copy = self._dead_copy(delivery, reason)
        try:
            self._dead_letter_producer().send(copy)
        except Exception as exc:
            raise self._dead_letter_failed(exc, delivery) from None
        self.ack(delivery)
        self._dead_lettered(delivery, reason)

    def close(self) -> None:
        if self._remoting is not None:
            self._remoting.close()
        with self._lock:
            consumer, self._consumer = self._consumer, None
            producer, self._dead_producer = self._dead_producer, None
        shutdown_quietly(consumer)
        shutdown_quietly(producer)


class AsyncRocketMQSubscriber:
    """:class:`RocketMQSubscriber` for :class:`outbox.AsyncIdempotentConsumer`, with the
    same options and behaviour. A fetch awaits the client's ``receive_async`` future
    and the dead-letter copy its ``send_async`` future; the calls the client has only
    in blocking form (startup, ack, change-invisible-duration, shutdown) run on a
    small pool of ``workers`` threads. A cancelled fetch loses nothing: what it had
    received becomes visible again after ``invisible_seconds``."""

    counts_deliveries: bool = True  # as the sync subscriber's: see __init__

    def __init__(
        self,
        config: RocketMQConfig,
        topic: str,
        group: str,
        *,
        dead_letter_topic: str,
        invisible_seconds: int = 30,
        message_id_from: MessageIdFrom | None = None,
        workers: int = 2,
        orderly: bool = False,
    ) -> None:
        self._sync = RocketMQSubscriber(config, topic, group, dead_letter_topic=dead_letter_topic,
                                        invisible_seconds=invisible_seconds,
                                        message_id_from=message_id_from, orderly=orderly)
        self._calls = BlockingCalls("outbox-rocketmq-subscriber", workers)
        self.counts_deliveries = self._sync.counts_deliveries

    @property
    def topic(self) -> str:
        return self._sync.topic

    @property
    def group(self) -> str:
        return self._sync.group

    async def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        sync = self._sync
        if sync._remoting is not None:
            return await self._calls.run(sync.fetch, max_messages, wait_seconds)
        consumer = await self._calls.run(sync._started)
        count = sync._batch(consumer, max_messages, wait_seconds)
        try:
            received = await asyncio.wrap_future(
                consumer.receive_async(count, sync.invisible_seconds))
        except Exception as exc:
            error = await self._calls.run(sync._receive_failed, exc, consumer)
            if error is None:
                await asyncio.sleep(min(wait_seconds, NOT_YET_SECONDS))
                return []
            raise error from None
        return [to_delivery(m, sync.message_id_from) for m in received or ()]

    async def ack(self, delivery: Delivery) -> None:
        await self._calls.run(self._sync.ack, delivery)

    async def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        await self._calls.run(self._sync.retry, delivery, delay_seconds, error)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        sync = self._sync
        if sync._remoting is not None:
            return await self._calls.run(sync.dead_letter, delivery, reason)
        copy = sync._dead_copy(delivery, reason)
        try:
            producer = await self._calls.run(sync._dead_letter_producer)
            await asyncio.wrap_future(producer.send_async(copy))
        except Exception as exc:
            raise await self._calls.run(sync._dead_letter_failed, exc, delivery) from None
        await self.ack(delivery)
        sync._dead_lettered(delivery, reason)

    async def close(self) -> None:
        await self._calls.run(self._sync.close)
        self._calls.shutdown(wait=False)
