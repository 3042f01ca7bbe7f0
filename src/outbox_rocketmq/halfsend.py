"""The two ways the transactional producer reaches RocketMQ, behind one small face:
the 5.x gRPC proxy through the official client, or a 4.x (or 5.x) broker directly over
the remoting protocol. Which one is configuration (``RocketMQConfig.namesrv``).

Both send a half message, end it (commit or rollback), and hand the broker's
check-backs to ``answer``, which reads the transaction log and returns the local
outcome (UNKNOWN for "ask again").
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from outbox.envelope import delivery_time
from outbox.errors import OutboxError
from outbox.message import Message, TransactionState
from outbox.schema import utcnow

from ._client import client_configuration, received, rocketmq, shutdown_quietly, to_rocketmq
from ._client import wrap_error as grpc_error
from .config import RocketMQConfig
from .mapping import Received, keys_of, properties_of, received_stored
from .remoting.client import (
    MessageQueue,
    OutgoingMessage,
    RemotingClient,
    SendResult,
    send_delay_level,
)
from .remoting.protocol import (
    MAX_MESSAGE_BYTES,
    TRANSACTION_COMMIT_TYPE,
    TRANSACTION_NOT_TYPE,
    TRANSACTION_ROLLBACK_TYPE,
    StoredMessage,
    stored_size,
)

#: Answers a check-back: the received half message (and its tag) -> the local outcome.
Answer = Callable[[Received, "str | None"], TransactionState]


class HalfSender(Protocol):
    def send_half(self, message: Message) -> Any: ...
    def end(self, handle: Any, commit: bool) -> None: ...
    def send(self, message: Message) -> None:
        """A plain (not transactional) send through the same client."""
    def shutdown(self) -> None: ...


def send_message(client: RemotingClient, message: Message, *,
                 transactional: bool = False) -> SendResult:
    """Send an outbox message over the remoting protocol (a half message with
    ``transactional``). A message with a key goes to the queue its key hashes to
    (as a Java producer's ``SelectMessageQueueByHash`` picks it), so a key's
    messages stay in order on the broker; a half message too (its commit lands in
    the queue chosen here). A normal message whose delivery time
    (``outbox-deliver-at``) is still ahead gets the broker's smallest delay level
    that waits at least that long (PublishError past 2 h)."""
    return client.send(message.topic, message.payload, properties_of(message),
                       tag=message.tag, keys=keys_of(message),
                       transactional=transactional, queue_key=message.key,
                       delay_level=None if transactional else delay_level_of(message))


def delay_level_of(message: Message, now: dt.datetime | None = None) -> int | None:
    """The broker delay level a direct send of ``message`` needs: None when it has no
    delivery time or that time has come."""
    due = delivery_time(message.headers)
    if due is None:
        return None
    now = now or utcnow()
    return send_delay_level((due - now).total_seconds())


class GrpcHalfSender:
    """Through the 5.x proxy: the official client's producer and transactions."""

    def __init__(self, config: RocketMQConfig, topics: Sequence[str], answer: Answer) -> None:
        rmq = rocketmq()
        resolutions = {TransactionState.COMMIT: rmq.TransactionResolution.COMMIT,
                       TransactionState.ROLLBACK: rmq.TransactionResolution.ROLLBACK}
        unknown = rmq.TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED

        class Checker(rmq.TransactionChecker):  # type: ignore[name-defined,misc]
            def check(self, message: Any) -> Any:
                return resolutions.get(answer(received(message), message.tag), unknown)

        self.config = config
        self.producer = rmq.Producer(client_configuration(config), tuple(topics), Checker())
        try:
            self.producer.startup()
        except Exception as exc:
            raise grpc_error(exc, config, "starting the RocketMQ producer") from None

    def send_half(self, message: Message) -> Any:
        try:
            transaction = self.producer.begin_transaction()
            self.producer.send(to_rocketmq(message), transaction)
        except OutboxError:
            raise
        except Exception as exc:
            raise grpc_error(exc, self.config, f"sending half message {message.id}") from None
        return transaction

    def end(self, handle: Any, commit: bool) -> None:
        if commit:
            handle.commit()
        else:
            handle.rollback()

    def send(self, message: Message) -> None:
        try:
            self.producer.send(to_rocketmq(message))
        except Exception as exc:
            raise grpc_error(exc, self.config, f"sending {message.id}") from None

    def shutdown(self) -> None:
        shutdown_quietly(self.producer)


class RemotingHalfSender:
    """Straight to the brokers over the remoting protocol (4.x has no proxy)."""

    def __init__(self, config: RocketMQConfig, topics: Sequence[str], answer: Answer) -> None:
        states = {TransactionState.COMMIT: TRANSACTION_COMMIT_TYPE,
                  TransactionState.ROLLBACK: TRANSACTION_ROLLBACK_TYPE}

        def check(stored: StoredMessage) -> int:
            return states.get(answer(received_stored(stored), stored.tag), TRANSACTION_NOT_TYPE)

        assert config.namesrv is not None
        self.client = RemotingClient(config.namesrv, producer_group=config.producer_group,
                                     checker=check, request_timeout=config.request_timeout)
        self.client.start(topics)

    def send_half(self, message: Message) -> SendResult:
        return send_message(self.client, message, transactional=True)

    def end(self, handle: Any, commit: bool) -> None:
        self.client.end_transaction(handle, commit)

    def send(self, message: Message) -> None:
        send_message(self.client, message)

    def shutdown(self) -> None:
        self.client.close()


class RemotingPlainSender:
    """Normal sends straight to the brokers (what a relay's publisher uses on 4.x), in
    the 5.x client's shape: ``send`` blocks, ``send_async`` returns a future (run on a
    few threads; one connection carries many requests at once). ``send_batch``
    sends a relay's batch as SEND_BATCH_MESSAGE requests, one queue's share at a
    time."""

    def __init__(self, config: RocketMQConfig, topics: Sequence[str], workers: int = 8) -> None:
        assert config.namesrv is not None
        self.client = RemotingClient(config.namesrv, request_timeout=config.request_timeout)
        self.client.start(topics)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="outbox-rmq-send")

    def send(self, message: Message) -> SendResult:
        return send_message(self.client, message)

    def send_async(self, message: Message) -> Future[SendResult]:
        return self._pool.submit(self.send, message)

    def send_batch(self, messages: Sequence[Message]) -> list[BatchPart]:
        """Send ``messages`` as batches and return at once, one :class:`BatchPart` per
        queue: a queue's messages in the batch's order, sent in SEND_BATCH_MESSAGE
        requests within the broker's size limit, one after the other; the queues
        concurrently. A message with a key goes to its key's queue (per-key order), the
        others round the queues. A message with a delivery time still ahead goes on
        its own (the broker delays no batch). After a failure no part sends more."""
        stop = threading.Event()
        parts: dict[tuple[str, MessageQueue], BatchPart] = {}
        for message in messages:
            route = self.client.route(message.topic)
            queue = self.client.choose_queue(route, message.key)
            part = parts.setdefault((message.topic, queue),
                                    BatchPart(message.topic, queue, [], stop=stop))
            part.messages.append(message)
        for part in parts.values():
            part.future = self._pool.submit(self._send_part, part)
        return list(parts.values())

    def _send_part(self, part: BatchPart) -> BatchPart:
        try:
            for chunk in batch_chunks(part.topic, part.messages):
                if part.stop.is_set():
                    return part
                part.current = chunk
                if len(chunk) == 1 and delay_level_of(chunk[0]) is not None:
                    send_message(self.client, chunk[0])
                else:
                    self.client.send_batch(part.topic, part.queue, [
                        OutgoingMessage(m.payload, properties_of(m), m.tag, keys_of(m))
                        for m in chunk])
                part.sent += len(chunk)
            part.current = []
        except Exception as exc:
            part.error = exc
            part.stop.set()
        return part

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


@dataclass(eq=False)
class BatchPart:
    """One queue's share of a batch: its messages in the batch's order, how many
    were acknowledged so far (the first ``sent``), the chunk in flight, and the
    failure that ended it. ``future`` resolves to the part when it is done; ``stop``
    (shared by a batch's parts) set, a part sends nothing more."""

    topic: str
    queue: MessageQueue
    messages: list[Message]
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    current: list[Message] = field(default_factory=list)
    error: BaseException | None = None
    future: Future[BatchPart] = field(default_factory=Future)


#: Room a broker may add to each message of a batch when it stores it (its own
#: properties), on top of the stored size computed here.
BATCH_MESSAGE_SLACK = 512


def batch_chunks(topic: str, messages: Sequence[Message],
                 limit: int = MAX_MESSAGE_BYTES) -> list[list[Message]]:
    """``messages`` (of one queue) as consecutive chunks for SEND_BATCH_MESSAGE:
    each within ``limit`` bytes as the broker stores them (a message larger than
    that alone), and each message with a delivery time still ahead alone."""
    chunks: list[list[Message]] = []
    current: list[Message] = []
    size = 0
    topic_bytes = len(topic.encode("utf-8"))
    for message in messages:
        if delay_level_of(message) is not None:
            if current:
                chunks.append(current)
            chunks.append([message])
            current, size = [], 0
            continue
        props = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) + 2
                    for k, v in properties_of(message).items())
        keys = sum(len(k.encode("utf-8")) + 1 for k in keys_of(message))
        one = stored_size(len(message.payload), props + keys + 96 + len(message.tag or ""),
                          topic_bytes) + BATCH_MESSAGE_SLACK
        if current and size + one > limit:
            chunks.append(current)
            current, size = [], 0
        current.append(message)
        size += one
    if current:
        chunks.append(current)
    return chunks


def half_sender(config: RocketMQConfig, topics: Sequence[str], answer: Answer) -> HalfSender:
    if config.namesrv is not None:
        return RemotingHalfSender(config, topics, answer)
    return GrpcHalfSender(config, topics, answer)
