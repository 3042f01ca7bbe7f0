"""Transactional half messages: the seed's flow as an outbox delivery adapter."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable
from typing import Any

import structlog

from outbox.app import LocalOutbox, Outbox
from outbox.errors import BrokerUnavailableError, ConfigurationError, MessageError
from outbox.message import Message, TransactionState
from outbox.schema import outbox_messages, transaction_log, utcnow
from outbox.scope import Ticket
from outbox.storage import settle_guard
from outbox.transaction import TransactionLogTicket

from ._client import (
    client_configuration,
    from_rocketmq,
    rocketmq,
    shutdown_quietly,
    to_rocketmq,
    wrap_error,
)
from .config import RocketMQConfig

log = structlog.get_logger("outbox.rocketmq")


class RocketMQTransactionalProducer:
    """Delivery adapter: half message, local transaction, then commit or rollback.

    1. The message (built before the transaction) is sent as a half message.
    2. The local transaction runs the user's function and writes the transaction-log
       row keyed by the message id, and commits.
    3. The half message is committed (or rolled back if the function raised).

    If the process dies between 2 and 3, or the end-transaction call is lost, the
    broker asks any producer of the topic; the checker answers from the log of the
    database that registered the topic. ``topics`` lists every topic this producer
    sends to: the proxy learns a producer's topics only when it starts.

    With ``fallback_to_outbox``, a half send that fails because the broker cannot be
    reached writes the message as a local outbox row instead (the business call
    succeeds); a relay with :class:`RocketMQPublisher` delivers it later. That topic
    must then be of type MIXED, since the relay's send is a normal one.

    With ``guard_after``, the local transaction also writes the message as an outbox
    row due that much later, settled as soon as the broker takes the commit. If the
    producer dies before that, and the broker then gives up on the half message
    (it sends check-backs to dead clients too, and discards a message after
    ``transactionCheckMax`` unanswered checks), a relay publishes the guard row: at
    worst the consumer sees the message twice and its inbox drops the second copy.
    This costs one more INSERT in the transaction and one UPDATE after it, and
    needs a MIXED topic and a relay, as the fallback does.
    """

    def __init__(
        self,
        config: RocketMQConfig,
        topics: Iterable[str],
        *,
        fallback_to_outbox: bool = False,
        guard_after: dt.timedelta | None = None,
    ) -> None:
        self.config = config
        self.topics = tuple(dict.fromkeys(topics))
        if not self.topics:
            raise ConfigurationError("name at least one topic the producer sends to")
        if guard_after is not None and guard_after <= dt.timedelta(0):
            raise ConfigurationError("guard_after must be a positive time")
        self.fallback_to_outbox = fallback_to_outbox
        self.guard_after = guard_after
        self._outboxes: dict[str, Outbox] = {}
        #: The tables a send writes (named when one is missing).
        self.tables = (transaction_log,) if guard_after is None and not fallback_to_outbox \
            else (transaction_log, outbox_messages)
        self._producer: Any = None
        self._lock = threading.Lock()

    # -- topics and check-back ----------------------------------------------------

    def register(self, topic: str, outbox: Outbox) -> None:
        """Route check-backs for ``topic`` to ``outbox``'s transaction log. Called
        by ``@transactional_message`` when it decorates a function."""
        if topic not in self.topics:
            raise ConfigurationError(
                f"topic {topic!r} is not among this RocketMQ producer's topics "
                f"{list(self.topics)}; add it to RocketMQTransactionalProducer(topics=...)"
            )
        known = self._outboxes.setdefault(topic, outbox)
        if known is not outbox:
            raise ConfigurationError(
                f"topic {topic!r} is already produced from another database; one topic's "
                "check-backs must be answered from one transaction log"
            )

    def check(self, message: Message) -> TransactionState:
        """Answer a check-back for ``message`` from the right transaction log."""
        outbox = self._outboxes.get(message.topic)
        if outbox is None:
            log.error("check_back_unknown_topic", **message.log_fields())
            return TransactionState.UNKNOWN
        return outbox.listener.check(message)

    def _on_check(self, received: Any) -> Any:
        resolution = rocketmq().TransactionResolution
        try:
            message = from_rocketmq(received)
        except MessageError as exc:
            # Not one of ours (no outbox id): nothing local can ever commit it.
            log.error("check_back_foreign_message", topic=received.topic, error=str(exc))
            return resolution.ROLLBACK
        try:
            state = self.check(message)
        except Exception as exc:  # the database may be down: ask again later
            log.error("check_back_failed", error=f"{type(exc).__name__}: {exc}",
                      **message.log_fields())
            return resolution.TRANSACTION_RESOLUTION_UNSPECIFIED
        return {
            TransactionState.COMMIT: resolution.COMMIT,
            TransactionState.ROLLBACK: resolution.ROLLBACK,
        }.get(state, resolution.TRANSACTION_RESOLUTION_UNSPECIFIED)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> RocketMQTransactionalProducer:
        """Connect now, so that check-backs reach this process before its first send."""
        self._started()
        return self

    def _started(self) -> Any:
        with self._lock:
            if self._producer is not None:
                return self._producer
            rmq = rocketmq()
            adapter = self

            class Checker(rmq.TransactionChecker):  # type: ignore[name-defined,misc]
                def check(self, message: Any) -> Any:
                    return adapter._on_check(message)

            producer = rmq.Producer(client_configuration(self.config), self.topics, Checker())
            try:
                producer.startup()
            except Exception as exc:
                raise wrap_error(exc, self.config, "starting the RocketMQ producer") from None
            self._producer = producer
            log.info("rocketmq_producer_started", endpoints=self.config.endpoints,
                     topics=list(self.topics))
            return producer

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        shutdown_quietly(producer)

    # -- the send path ---------------------------------------------------------------

    def prepare(self, outbox: Outbox, message: Message) -> Ticket:
        """Send ``message`` as a half message; the ticket writes its transaction-log row
        in the local transaction and commits or rolls back the half message after it."""
        self.register(message.topic, outbox)
        fields = message.log_fields()
        try:
            producer = self._started()
            transaction = producer.begin_transaction()
            producer.send(to_rocketmq(message), transaction)
        except Exception as exc:
            error: BaseException = exc if isinstance(exc, ConfigurationError) else wrap_error(
                exc, self.config, f"sending half message {message.id}")
            if isinstance(error, BrokerUnavailableError) and self.fallback_to_outbox:
                log.warning("rocketmq_unreachable_using_outbox", error=str(error), **fields)
                return LocalOutbox().prepare(outbox, message)
            raise error from None
        log.debug("rocketmq_half_message_sent", **fields)
        guard_until = utcnow() + self.guard_after if self.guard_after is not None else None
        return HalfMessageTicket(self, outbox, message, transaction, guard_until)

    def _end(self, transaction: Any, state: TransactionState, message: Message) -> bool:
        """Commit or roll back the half message; True when the broker took a commit."""
        fields = message.log_fields()
        try:
            if state is TransactionState.COMMIT:
                transaction.commit()
            else:
                transaction.rollback()
        except Exception as exc:
            # The local outcome is durable; the broker's check-back will match it.
            log.warning("rocketmq_end_transaction_failed", state=state.value,
                        error=f"{type(exc).__name__}: {exc}", **fields)
            return False
        log.info("rocketmq_transaction_ended", state=state.value, **fields)
        return state is TransactionState.COMMIT

    def _settle_guard(self, outbox: Outbox, message: Message) -> None:
        # The broker has the commit: the guard row need not go. If this fails, the
        # relay sends it later and the consumer's inbox drops the second copy.
        try:
            with outbox.engine.begin() as conn:
                settle_guard(conn, message.id, utcnow())
        except Exception as exc:
            log.warning("rocketmq_guard_not_settled", error=f"{type(exc).__name__}: {exc}",
                        **message.log_fields())


class HalfMessageTicket(TransactionLogTicket):
    """A sent half message in a local transaction: its log row is written inside,
    and the half message is committed or rolled back to match the outcome."""

    __slots__ = ("adapter", "guarded", "outbox", "transaction")

    def __init__(self, adapter: RocketMQTransactionalProducer, outbox: Outbox, message: Message,
                 transaction: Any, guard_until: dt.datetime | None) -> None:
        super().__init__(outbox.listener, message, guard_until)
        self.adapter = adapter
        self.outbox = outbox
        self.transaction = transaction
        self.guarded = guard_until is not None

    def committed(self) -> None:
        if self.adapter._end(self.transaction, TransactionState.COMMIT, self.message) \
                and self.guarded:
            self.adapter._settle_guard(self.outbox, self.message)

    def rolled_back(self) -> None:
        self.adapter._end(self.transaction, TransactionState.ROLLBACK, self.message)

    def unknown(self) -> BaseException | None:
        log.warning("rocketmq_transaction_left_to_check_back", **self.message.log_fields())
        return super().unknown()
