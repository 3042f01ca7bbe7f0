"""The two ways the transactional producer reaches RocketMQ, behind one small face:
the 5.x gRPC proxy through the official client, or a 4.x (or 5.x) broker directly over
the remoting protocol. Which one is configuration (``RocketMQConfig.namesrv``).

Both send a half message, end it (commit or rollback), and hand the broker's
check-backs to ``answer``, which reads the transaction log and returns the local
outcome (UNKNOWN for "ask again").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from outbox.errors import OutboxError
from outbox.message import Message, TransactionState

from ._client import client_configuration, received, rocketmq, shutdown_quietly, to_rocketmq
from ._client import wrap_error as grpc_error
from .config import RocketMQConfig
from .mapping import Received, keys_of, properties_of, received_stored
from .remoting.client import RemotingClient, SendResult
from .remoting.protocol import (
    TRANSACTION_COMMIT_TYPE,
    TRANSACTION_NOT_TYPE,
    TRANSACTION_ROLLBACK_TYPE,
    StoredMessage,
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
    ``transactional``)."""
    return client.send(message.topic, message.payload, properties_of(message),
                       tag=message.tag, keys=keys_of(message),
                       transactional=transactional)


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
    few threads; one connection carries many requests at once)."""

    def __init__(self, config: RocketMQConfig, topics: Sequence[str], workers: int = 8) -> None:
        assert config.namesrv is not None
        self.client = RemotingClient(config.namesrv, request_timeout=config.request_timeout)
        self.client.start(topics)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="outbox-rmq-send")

    def send(self, message: Message) -> SendResult:
        return send_message(self.client, message)

    def send_async(self, message: Message) -> Future[SendResult]:
        return self._pool.submit(self.send, message)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def half_sender(config: RocketMQConfig, topics: Sequence[str], answer: Answer) -> HalfSender:
    if config.namesrv is not None:
        return RemotingHalfSender(config, topics, answer)
    return GrpcHalfSender(config, topics, answer)
