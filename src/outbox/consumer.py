"""The idempotent consumer: inbox row and business change in one transaction."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
import tenacity
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from .codec import JsonCodec
from .db import insert_ignore
from .errors import ConfigurationError, DecodeError
from .relay import delay_for, exponential_backoff
from .schema import inbox, utcnow
from .transport import Delivery
from .typing import Codec, Subscriber

log = structlog.get_logger("outbox.consumer")

MAX_REASON_LENGTH = 2000


class Reject(Exception):
    """Raise from a handler for a message that can never succeed (unknown account,
    say): it is dead-lettered at once with this reason instead of retried."""


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """What a handler gets: the validated message and its decoded body."""

    id: str
    topic: str
    body: Any
    payload: bytes
    key: str | None
    tag: str | None
    headers: Mapping[str, str]
    attempt: int


Handler = Callable[[Session, ReceivedMessage], None]


@dataclass(frozen=True)
class ConsumerConfig:
    """``max_attempts`` deliveries, with ``backoff`` between them, then dead-letter.

    A database that cannot be reached (or a deadlock, a lock timeout) is not the
    message's fault: such failures are retried without being held against it, up to
    ``max_deliveries`` deliveries in all (default: ten times ``max_attempts``), which
    also stops a message that keeps crashing its consumer before any answer.
    """

    max_attempts: int = 5
    max_deliveries: int | None = None
    backoff: Callable[[tenacity.RetryCallState], float] = field(default_factory=exponential_backoff)
    batch_size: int = 32
    wait_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("ConsumerConfig.max_attempts must be at least 1")
        if self.batch_size < 1:
            raise ConfigurationError("ConsumerConfig.batch_size must be at least 1")
        if self.max_deliveries is not None and self.max_deliveries < self.max_attempts:
            raise ConfigurationError("ConsumerConfig.max_deliveries must be >= max_attempts")

    @property
    def delivery_limit(self) -> int:
        return self.max_deliveries if self.max_deliveries is not None else 10 * self.max_attempts


@dataclass
class ConsumerStats:
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0

    def add(self, other: ConsumerStats) -> None:
        self.processed += other.processed
        self.duplicates += other.duplicates
        self.retried += other.retried
        self.dead_lettered += other.dead_lettered


def _transient(exc: BaseException) -> bool:
    """A failure of the database rather than of the message: retry, do not count."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_REASON_LENGTH]


class IdempotentConsumer:
    """Applies each message of ``subscriber`` once to the consumer's own database.

    For every delivery it opens a transaction, inserts the inbox row ``(group,
    message id)``, runs ``handler(session, message)`` and commits, then acknowledges.
    A duplicate delivery finds the inbox row and is acknowledged without running
    the handler. A handler error rolls back and the delivery is retried with
    backoff; after ``max_attempts`` it is dead-lettered with the error. A payload
    that cannot be decoded is dead-lettered at once with the reason.
    """

    def __init__(
        self,
        bind: Engine | sessionmaker[Session],
        subscriber: Subscriber,
        group: str,
        handler: Handler,
        *,
        codec: Codec | None = None,
        config: ConsumerConfig | None = None,
    ) -> None:
        if not group or len(group) > 200:
            raise ConfigurationError("consumer group must be 1 to 200 characters")
        self.session_factory = (
            sessionmaker(bind, expire_on_commit=False) if isinstance(bind, Engine) else bind
        )
        self.subscriber = subscriber
        self.group = group
        self.handler = handler
        self.codec: Codec = codec or JsonCodec()
        self.config = config or ConsumerConfig()
        self.stats = ConsumerStats()
        self._stop = threading.Event()

    def handle(self, delivery: Delivery) -> str:
        """Process one delivery; returns "processed", "duplicate", "retried" or "dead"."""
        fields = {"message_id": delivery.message_id, "topic": delivery.topic,
                  "key": delivery.key, "group": self.group, "attempt": delivery.attempt}
        try:
            message = delivery.to_message()
            body = self.codec.decode(message.payload)
        except DecodeError as exc:
            return self._dead(delivery, f"undecodable message: {exc}", fields)
        if delivery.attempt > self.config.delivery_limit:
            return self._dead(
                delivery,
                f"gave up after {delivery.attempt - 1} deliveries without acknowledgement",
                fields,
            )
        received = ReceivedMessage(
            id=message.id, topic=message.topic, body=body, payload=message.payload,
            key=message.key, tag=message.tag, headers=message.headers, attempt=delivery.attempt,
        )
        try:
            with self.session_factory() as session, session.begin():
                conn = session.connection()
                # Without preserve_rowcount SQLAlchemy may report -1 for an INSERT
                # (it does on psycopg), and every message would pass for a duplicate.
                inserted = conn.execute(
                    insert_ignore(conn, inbox).values(
                        consumer_group=self.group, message_id=message.id, processed_at=utcnow()
                    ).execution_options(preserve_rowcount=True)
                ).rowcount
                if inserted not in (0, 1):
                    # Never guess: a wrong guess would drop the message as a duplicate.
                    raise RuntimeError(f"inbox INSERT reported {inserted} rows; expected 0 or 1")
                if inserted == 1:
                    self.handler(session, received)
        except Reject as exc:
            return self._dead(delivery, f"rejected by handler: {exc}", fields)
        except Exception as exc:
            reason = _reason(exc)
            transient = _transient(exc)
            if delivery.attempt >= (self.config.delivery_limit if transient
                                    else self.config.max_attempts):
                return self._dead(delivery, f"handler failed {delivery.attempt} times: {reason}",
                                  fields)
            delay = delay_for(self.config.backoff, delivery.attempt)
            self.subscriber.retry(delivery, delay, reason)
            event = "consumer_database_unavailable" if transient else "consumer_handler_failed"
            log.warning(event, error=reason, retry_in=round(delay, 3), **fields)
            return "retried"
        self.subscriber.ack(delivery)
        if inserted == 1:
            log.info("consumer_processed", **fields)
            return "processed"
        log.info("consumer_duplicate_ignored", **fields)
        return "duplicate"

    def _dead(self, delivery: Delivery, reason: str, fields: dict[str, Any]) -> str:
        self.subscriber.dead_letter(delivery, reason[:MAX_REASON_LENGTH])
        log.error("consumer_dead_lettered", reason=reason[:MAX_REASON_LENGTH], **fields)
        return "dead"

    def run_once(self, wait_seconds: float | None = None) -> ConsumerStats:
        """Fetch one batch and handle it; returns what happened."""
        wait = self.config.wait_seconds if wait_seconds is None else wait_seconds
        stats = ConsumerStats()
        for delivery in self.subscriber.fetch(self.config.batch_size, wait):
            outcome = self.handle(delivery)
            if outcome == "processed":
                stats.processed += 1
            elif outcome == "duplicate":
                stats.duplicates += 1
            elif outcome == "retried":
                stats.retried += 1
            else:
                stats.dead_lettered += 1
        self.stats.add(stats)
        return stats

    def run(self, stop: threading.Event | None = None) -> None:
        """Consume until ``stop`` (or :meth:`stop`) is set. Errors reaching the
        transport or the database are logged and retried, so the consumer outlives
        a restart of either."""
        stop = stop or self._stop
        while not stop.is_set() and not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:
                log.error("consumer_batch_failed", error=_reason(exc), group=self.group)
                stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
