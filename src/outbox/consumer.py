"""The idempotent consumer: inbox row and business change in one transaction."""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import tenacity
from sqlalchemy import Engine, Executable
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from . import instrument
from .app import explain_missing
from .codec import JsonCodec
from .consumer_store import forget_attempts, record_failure, store_dead_letter
from .db import dialect_name, insert_ignore_for, safe_url
from .errors import ConfigurationError, DecodeError, MissingTableError, MisuseError
from .log import get_logger
from .relay import delay_for, exponential_backoff
from .schema import consumer_attempts, consumer_dead_letters, inbox, utcnow
from .scope import database_identity, run_owned
from .sessions import guarded_class
from .transport import Delivery
from .typing import Abilities, Codec, Subscriber

log = get_logger("outbox.consumer")

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

    def count(self, outcome: str) -> None:
        if outcome == "processed":
            self.processed += 1
        elif outcome == "duplicate":
            self.duplicates += 1
        elif outcome == "retried":
            self.retried += 1
        else:
            self.dead_lettered += 1

    def add(self, other: ConsumerStats) -> None:
        self.processed += other.processed
        self.duplicates += other.duplicates
        self.retried += other.retried
        self.dead_lettered += other.dead_lettered


class Outcome(enum.StrEnum):
    """What became of one delivery."""

    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    RETRIED = "retried"
    DEAD = "dead"


#: The instrumentation event of each outcome.
_EVENTS = {Outcome.PROCESSED: instrument.PROCESSED, Outcome.DUPLICATE: instrument.DUPLICATE,
           Outcome.RETRIED: instrument.RETRIED, Outcome.DEAD: instrument.DEAD_LETTERED}


@dataclass(frozen=True, slots=True)
class Decision:
    """What to tell the subscriber about a delivery, and why."""

    outcome: Outcome
    reason: str | None = None
    delay: float = 0.0
    event: str = ""
    #: The attempt this decision is about (what a dead letter records).
    attempt: int = 1


def _transient(exc: BaseException) -> bool:
    """A failure of the database rather than of the message: retry, do not count."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_REASON_LENGTH]


@functools.cache
def _inbox_insert(dialect: str) -> Executable:
    # Without preserve_rowcount SQLAlchemy may report -1 for an INSERT (it does on
    # psycopg), and every message would pass for a duplicate.
    return insert_ignore_for(dialect, inbox).execution_options(preserve_rowcount=True)


class ConsumerPolicy:
    """The consumer's decisions, with no I/O: the sync and asyncio consumers act on them."""

    def __init__(self, group: str, codec: Codec, config: ConsumerConfig) -> None:
        self.group = group
        self.codec = codec
        self.config = config

    def fields(self, delivery: Delivery) -> dict[str, Any]:
        return {"message_id": delivery.message_id, "topic": delivery.topic,
                "key": delivery.key, "group": self.group, "attempt": delivery.attempt}

    def accept(self, delivery: Delivery, *, counted: bool = True
               ) -> ReceivedMessage | Decision:
        """The message to hand to the handler, or why it must be dead-lettered now.

        ``counted``: ``delivery.attempt`` is the broker's count of deliveries, so a
        message past :attr:`ConsumerConfig.delivery_limit` of them (one that keeps
        crashing its consumer) is given up on."""
        try:
            message = delivery.to_message()
            body = self.codec.decode(message.payload)
        except DecodeError as exc:
            return self.dead(f"undecodable message: {exc}")
        if counted and delivery.attempt > self.config.delivery_limit:
            return self.dead(
                f"gave up after {delivery.attempt - 1} deliveries without acknowledgement",
                delivery.attempt)
        return ReceivedMessage(
            id=message.id, topic=message.topic, body=body, payload=message.payload,
            key=message.key, tag=message.tag, headers=message.headers, attempt=delivery.attempt,
        )

    def dead(self, reason: str, attempt: int = 1) -> Decision:
        return Decision(Outcome.DEAD, reason[:MAX_REASON_LENGTH], event="consumer_dead_lettered",
                        attempt=attempt)

    def inbox_insert(self, dialect_bind: Any, message_id: str
                     ) -> tuple[Executable, dict[str, Any]]:
        """The inbox row's INSERT (built once per database kind) and its parameters."""
        return _inbox_insert(dialect_name(dialect_bind)), {
            "consumer_group": self.group, "message_id": message_id, "processed_at": utcnow()}

    @staticmethod
    def inserted(rowcount: int) -> bool:
        if rowcount not in (0, 1):
            # Never guess: a wrong guess would drop the message as a duplicate.
            raise RuntimeError(f"inbox INSERT reported {rowcount} rows; expected 0 or 1")
        return rowcount == 1

    def succeeded(self, handled: bool) -> Decision:
        if handled:
            return Decision(Outcome.PROCESSED, event="consumer_processed")
        return Decision(Outcome.DUPLICATE, event="consumer_duplicate_ignored")

    def failed(self, exc: BaseException, attempt: int, *, limit_transient: bool = True
               ) -> Decision:
        """A handler (or database) failure: retry with backoff, or dead-letter.

        ``limit_transient`` False: a database failure is retried however long it
        lasts (a consumer holding its delivery in place, which nothing else is waiting
        behind but the database)."""
        if isinstance(exc, Reject):
            return self.dead(f"rejected by handler: {exc}", attempt)
        reason = _reason(exc)
        transient = _transient(exc)
        cfg = self.config
        limit = cfg.delivery_limit if transient else cfg.max_attempts
        if (limit_transient or not transient) and attempt >= limit:
            return self.dead(f"handler failed {attempt} times: {reason}", attempt)
        event = "consumer_database_unavailable" if transient else "consumer_handler_failed"
        return Decision(Outcome.RETRIED, reason, delay_for(cfg.backoff, attempt), event, attempt)

    @staticmethod
    def counts_failure(exc: BaseException) -> bool:
        """Whether ``exc`` is held against the message (a database outage is not)."""
        return not isinstance(exc, Reject) and not _transient(exc)

    @staticmethod
    def verdict(decision: Decision, abilities: Abilities) -> tuple[str, tuple[Any, ...]]:
        """What carries out ``decision``: a subscriber method and its arguments, or
        ``hold`` (wait the delay and try again in place) or ``store_dead`` (keep the
        dead letter in the consumer's database, then acknowledge) where the subscriber
        lacks the ability."""
        if decision.outcome is Outcome.DEAD:
            if abilities.dead_letter:
                return "dead_letter", (decision.reason or "",)
            return "store_dead", (decision.reason or "", decision.attempt)
        if decision.outcome is Outcome.RETRIED:
            if abilities.redelivery:
                return "retry", (decision.delay, decision.reason or "")
            return "hold", (decision.delay,)
        return "ack", ()

    def report(self, decision: Decision, delivery: Delivery, started: float | None = None
               ) -> None:
        """Log what became of ``delivery`` (and announce it, with observers: ``started``
        is when its handling began, on :func:`time.perf_counter`)."""
        fields = self.fields(delivery)
        if decision.outcome is Outcome.DEAD:
            log.error(decision.event, reason=decision.reason, **fields)
        elif decision.outcome is Outcome.RETRIED:
            log.warning(decision.event, error=decision.reason,
                        retry_in=round(decision.delay, 3), **fields)
        else:
            log.info(decision.event, **fields)
        if instrument.observers:
            self._announce(decision, delivery, started)

    def _announce(self, decision: Decision, delivery: Delivery, started: float | None) -> None:
        name = _EVENTS[decision.outcome]
        seconds = None if started is None else time.perf_counter() - started
        instrument.emit(name, topic=delivery.topic, message_id=delivery.message_id,
                        key=delivery.key, group=self.group, attempt=delivery.attempt,
                        error=decision.reason, seconds=seconds,
                        delay=decision.delay if decision.outcome is Outcome.RETRIED else None,
                        headers=delivery.headers)

    @contextlib.contextmanager
    def observed(self, delivery: Delivery) -> Iterator[None]:
        """With observers: the delivery announced, and its handling (inbox transaction,
        handler, acknowledgement) in the observers' span, continuing its trace."""
        instrument.emit(instrument.DELIVERED, topic=delivery.topic,
                        message_id=delivery.message_id, key=delivery.key, group=self.group,
                        attempt=delivery.attempt, headers=delivery.headers)
        with instrument.span("outbox.consume", topic=delivery.topic,
                             message_id=delivery.message_id, group=self.group,
                             parent=delivery.headers):
            yield


class ConsumerBase:
    """What the sync and the asyncio idempotent consumer share: group, handler, codec,
    configuration, decisions and counts (the subclass sets ``session_factory``)."""

    def _setup(self, engine: Any, subscriber: Any, group: str, handler: Any,
               codec: Codec | None, config: ConsumerConfig | None) -> None:
        self.identity = database_identity(engine.url)
        self.subscriber = subscriber
        self.group = group
        self.handler = handler
        self.codec: Codec = codec or JsonCodec()
        self.config = config or ConsumerConfig()
        self.policy = ConsumerPolicy(group, self.codec, self.config)
        self.stats = ConsumerStats()
        #: What the subscriber does itself; the consumer provides the rest.
        self.abilities = Abilities.of(subscriber)

    def attempt_of(self, delivery: Delivery, failures: int | None) -> int:
        """The attempt a failure ends: the broker's count, else the consumer's own
        (``failures``, counted in its database; None when it was not counted)."""
        if self.abilities.counts_deliveries or failures is None:
            return delivery.attempt
        return failures

    @staticmethod
    def check_group(group: str) -> None:
        if not group or len(group) > 200:
            raise ConfigurationError("consumer group must be 1 to 200 characters")


def inbox_missing(url: Any, existing: set[str]) -> MissingTableError | None:
    """The error for a consumer database without the inbox table (a setup mistake,
    not an outage: nothing is retried or dead-lettered for it)."""
    return _missing(url, existing, inbox.name, "record what it processed")


def consumer_tables_missing(url: Any, existing: set[str]) -> MissingTableError | None:
    """The error for a consumer database without the tables in which it counts
    attempts and keeps dead letters for a broker that does neither."""
    for table in (consumer_attempts, consumer_dead_letters):
        error = _missing(url, existing, table.name,
                         "count attempts or keep dead letters for this broker")
        if error is not None:
            return error
    return None


def _missing(url: Any, existing: set[str], name: str, purpose: str) -> MissingTableError | None:
    if name in existing:
        return None
    return MissingTableError(
        f"table {name} is missing in {safe_url(url)}, so the consumer cannot {purpose}; "
        "create the tables with  outbox migrate --db URL  (or alembic upgrade outbox@head, "
        "or outbox.metadata.create_all(engine)); nothing was acknowledged or dead-lettered"
    )


class IdempotentConsumer(ConsumerBase):
    """Applies each message of ``subscriber`` once to the consumer's own database.

    For every delivery it opens a transaction, inserts the inbox row ``(group,
    message id)``, runs ``handler(session, message)`` and commits, then acknowledges.
    A duplicate delivery finds the inbox row and is acknowledged without running
    the handler. A handler error rolls back and the delivery is retried with
    backoff; after ``max_attempts`` it is dead-lettered with the error. A payload
    that cannot be decoded is dead-lettered at once with the reason.

    The handler may send messages in the same transaction (``outbox.send(session,
    ...)`` or a decorated function of an :class:`~outbox.Outbox` on the same
    database, which joins it): they commit with the inbox row, and a redelivery
    whose handler already committed sends nothing again. The handler must not
    commit, roll back or close the session.
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
        self.check_group(group)
        if isinstance(bind, Engine):
            self.session_factory = sessionmaker(bind, class_=guarded_class(Session),
                                                expire_on_commit=False)
        elif isinstance(bind, sessionmaker):
            self.session_factory = sessionmaker(class_=guarded_class(bind.class_), **bind.kw)
        else:
            raise ConfigurationError(
                f"IdempotentConsumer needs a SQLAlchemy Engine or sessionmaker, got "
                f"{type(bind).__name__} (for an AsyncEngine use AsyncIdempotentConsumer)")
        if inspect.iscoroutinefunction(handler):
            raise MisuseError(
                "the handler is an async def; IdempotentConsumer runs sync handlers. Use "
                "AsyncIdempotentConsumer with an AsyncEngine and an async subscriber")
        self.engine: Engine = self.session_factory.kw["bind"]
        self._setup(self.engine, subscriber, group, handler, codec, config)
        self._stop = threading.Event()
        self._running_stop: threading.Event | None = None

    def handle(self, delivery: Delivery) -> Outcome:
        """Process one delivery and tell the subscriber; returns what became of it.

        A subscriber without :class:`~outbox.typing.Redelivery` has its failed
        delivery held: the consumer waits the backoff and tries again in place (so a
        Kafka partition keeps its order), until it succeeds or is dead-lettered; a stop
        during the wait leaves the delivery unacknowledged, to come back later.
        """
        if instrument.observers:
            with self.policy.observed(delivery):
                return self._handle(delivery, time.perf_counter())
        return self._handle(delivery, None)

    def _handle(self, delivery: Delivery, started: float | None) -> Outcome:
        policy, abilities = self.policy, self.abilities
        counted = False  # this call wrote a failure count for the message
        while True:
            decision = policy.accept(delivery, counted=abilities.counts_deliveries)
            if isinstance(decision, ReceivedMessage):
                try:
                    decision = policy.succeeded(self._apply(decision, forget=counted))
                except MissingTableError:
                    raise  # a setup mistake: nothing is retried or dead-lettered for it
                except Exception as exc:
                    failures = self._count(delivery, exc)
                    counted = counted or failures is not None
                    decision = policy.failed(exc, self.attempt_of(delivery, failures),
                                             limit_transient=abilities.counts_deliveries)
            action, args = policy.verdict(decision, abilities)
            if action == "hold":
                policy.report(decision, delivery, started)
                if not self._wait(args[0]):
                    return decision.outcome
                delivery = replace(delivery, attempt=delivery.attempt + 1)
                continue
            if action == "store_dead":
                if not self._store_dead(delivery, *args):
                    return Outcome.RETRIED  # stopped with the database down: comes back
                action, args = "ack", ()
            getattr(self.subscriber, action)(delivery, *args)
            if action == "dead_letter" and counted:
                self._forget(delivery)
            policy.report(decision, delivery, started)
            return decision.outcome

    def _count(self, delivery: Delivery, exc: BaseException) -> int | None:
        """Count a failure in the database when the broker does not; None if not
        counted (the broker counts, it is not the message's fault, or the database
        cannot be written either)."""
        if (self.abilities.counts_deliveries or not delivery.message_id
                or not self.policy.counts_failure(exc)):
            return None
        try:
            with self.engine.connect() as conn:
                return record_failure(conn, self.group, delivery.message_id, _reason(exc))
        except Exception as count_exc:
            explained = explain_missing(self.engine, count_exc, consumer_tables_missing)
            if isinstance(explained, MissingTableError):
                raise explained from count_exc
            log.warning("consumer_attempt_not_counted", error=_reason(count_exc),
                        **self.policy.fields(delivery))
            return None

    def _store_dead(self, delivery: Delivery, reason: str, attempt: int) -> bool:
        """Keep the dead letter in the consumer's database, retrying while the database
        is down; False if stopped first."""
        tries = 0
        while True:
            try:
                with self.engine.connect() as conn:
                    store_dead_letter(conn, self.group, delivery, reason, attempt)
                return True
            except Exception as exc:
                explained = explain_missing(self.engine, exc, consumer_tables_missing)
                if isinstance(explained, MissingTableError):
                    raise explained from exc
                tries += 1
                log.warning("consumer_dead_letter_not_stored", error=_reason(exc),
                            **self.policy.fields(delivery))
                if not self._wait(delay_for(self.config.backoff, tries)):
                    return False

    def _forget(self, delivery: Delivery) -> None:
        """Drop the failure count of a message the broker dead-lettered (a leftover
        row is harmless: ``outbox purge`` removes it in time)."""
        try:
            with self.engine.begin() as conn:
                forget_attempts(conn, self.group, delivery.message_id or "")
        except Exception as exc:
            log.warning("consumer_attempts_not_cleared", error=_reason(exc),
                        **self.policy.fields(delivery))

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopped; False if stopped."""
        deadline = time.monotonic() + seconds
        while not self._stopped():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            self._stop.wait(min(remaining, 0.2))
        return False

    def _stopped(self) -> bool:
        running = self._running_stop
        return self._stop.is_set() or (running is not None and running.is_set())

    def _apply(self, received: ReceivedMessage, *, forget: bool = False) -> bool:
        """The inbox row and the handler in one transaction; False for a duplicate.
        ``forget``: also drop the failure count the consumer kept for it."""

        def work(session: Session) -> bool:
            conn = session.connection()
            rowcount = conn.execute(*self.policy.inbox_insert(conn, received.id)).rowcount
            if forget:
                forget_attempts(conn, self.group, received.id)
            if not self.policy.inserted(rowcount):
                return False
            self.handler(session, received)
            return True

        return run_owned(
            self.session_factory, identity=self.identity,
            owner=f"the handler of consumer group {self.group!r}", ticket=None, lock=None,
            work=work, explain=self._explain,
        )

    def _explain(self, exc: BaseException) -> BaseException:
        return explain_missing(self.engine, exc, inbox_missing)

    def run_once(self, wait_seconds: float | None = None) -> ConsumerStats:
        """Fetch one batch and handle it; returns what happened."""
        wait = self.config.wait_seconds if wait_seconds is None else wait_seconds
        stats = ConsumerStats()
        for delivery in self.subscriber.fetch(self.config.batch_size, wait):
            stats.count(self.handle(delivery))
        self.stats.add(stats)
        return stats

    def run(self, stop: threading.Event | None = None, *, metrics_port: int | None = None,
            metrics_host: str = "127.0.0.1") -> None:
        """Consume until ``stop`` (or :meth:`stop`) is set. Errors reaching the
        transport or the database are logged and retried, so the consumer outlives
        a restart of either; a missing inbox table ends it (MissingTableError).

        ``metrics_port`` serves Prometheus metrics at ``/metrics`` meanwhile (the
        consumer's counters and histograms, and the table gauges of its database; pip
        install 'outbox[prometheus]')."""
        if metrics_port is not None:
            from . import metrics

            with metrics.serving(metrics_port, host=metrics_host,
                                 engines={safe_url(self.engine.url): self.engine}):
                self.run(stop)
            return
        stop = stop or self._stop
        self._running_stop = stop
        try:
            while not stop.is_set() and not self._stop.is_set():
                try:
                    self.run_once()
                except MissingTableError:
                    raise
                except Exception as exc:
                    log.error("consumer_batch_failed", error=_reason(exc), group=self.group)
                    stop.wait(1.0)
        finally:
            self._running_stop = None

    def stop(self) -> None:
        self._stop.set()
