"""The relay: publishes committed outbox rows, with backoff, parking and purge."""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import tenacity
from sqlalchemy import Connection, Engine

from . import instrument, storage
from .db import claiming_options, safe_url
from .envelope import CREATED_AT_HEADER, parse_utc
from .errors import ConfigurationError
from .log import get_logger
from .message import Message
from .schema import NOTIFY_CHANNEL, utcnow
from .typing import BatchPublisher, Publisher

_NO_SPAN = contextlib.nullcontext()


def announce(name: str, count: int) -> None:
    """An operator's (or the purge's) work on ``count`` rows, to the observers."""
    if count and instrument.observers:
        instrument.emit(name, count=count)

log = get_logger("outbox.relay")

MAX_ERROR_LENGTH = 2000


def exponential_backoff() -> Callable[[tenacity.RetryCallState], float]:
    """1 s, 2 s, 4 s, ... up to 5 minutes, with a little jitter."""
    return tenacity.wait_exponential(multiplier=1, min=1, max=300) + tenacity.wait_random(0, 0.5)


def delay_for(wait: Callable[[tenacity.RetryCallState], float], attempt: int) -> float:
    """Seconds to wait after the ``attempt``-th failure, from a tenacity wait strategy."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return max(0.0, float(wait(state)))


@dataclass(frozen=True)
class RelayConfig:
    """How a relay claims, publishes, retries and purges.

    ``backoff`` is any tenacity wait strategy (``tenacity.wait_exponential(...)``).
    A row is parked as dead after ``max_attempts`` failed publishes.
    """

    batch_size: int = 100
    poll_interval: float = 0.5
    max_attempts: int = 10
    backoff: Callable[[tenacity.RetryCallState], float] = field(default_factory=exponential_backoff)
    delete_sent: bool = False
    retention: dt.timedelta = dt.timedelta(days=7)
    purge_batch_size: int = 1000
    purge_interval: float = 60.0
    #: On PostgreSQL, wake up on the NOTIFY a committed outbox insert sends.
    listen: bool = True
    #: While a full batch publishes, claim the next one on a second connection, so
    #: the database and the broker work at once on a backlog (PostgreSQL and
    #: MariaDB/MySQL; SQLite has one writer). Order is kept: the next claim holds
    #: back every key the batch in flight still has pending.
    claim_ahead: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigurationError("RelayConfig.batch_size must be at least 1")
        if self.max_attempts < 1:
            raise ConfigurationError("RelayConfig.max_attempts must be at least 1")
        if self.poll_interval <= 0:
            raise ConfigurationError("RelayConfig.poll_interval must be positive")
        if self.purge_batch_size < 1:
            # purge() loops until a batch comes back short; a batch of 0 never does.
            raise ConfigurationError("RelayConfig.purge_batch_size must be at least 1")


@dataclass(frozen=True)
class BatchResult:
    claimed: int = 0
    published: int = 0
    failed: int = 0
    dead: int = 0


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:MAX_ERROR_LENGTH]


def refuse_same_file(engine: Engine, publisher: object) -> None:
    """Refuse a SQL transport inside the outbox's own SQLite file."""
    target = getattr(publisher, "engine", None)
    target = getattr(target, "sync_engine", target)  # an AsyncEngine's own
    if not isinstance(target, Engine) or engine.dialect.name != "sqlite":
        return
    if target.dialect.name == "sqlite" and target.url.database == engine.url.database:
        # The relay holds SQLite's only write lock while it publishes, so a publisher
        # writing to the same file would wait for it until the busy timeout.
        raise ConfigurationError(
            f"the SQL transport must not live in the outbox's own SQLite file "
            f"({engine.url.database}); give it a file of its own, e.g. sqlite:///broker.db"
        )


class BatchPlan:
    """One claimed batch's publishing, as decisions: which row may go next (a failed
    row holds back the later rows of its key), and what a failure means (backoff, or
    dead after ``max_attempts``). The sync and asyncio relays only publish."""

    __slots__ = ("_blocked", "_timings", "config", "failures", "now", "observed", "rows",
                 "sent")

    def __init__(self, rows: list[storage.ClaimedRow], config: RelayConfig,
                 now: dt.datetime) -> None:
        self.rows = rows
        self.config = config
        self.now = now
        self.sent: list[int] = []
        self.failures: list[storage.Failure] = []
        self._blocked: set[str] = set()
        # With observers: each publish is timed and spanned, and the events follow
        # the batch's commit (result). Without: nothing of it is done.
        self.observed = bool(instrument.observers)
        self._timings: dict[int, float] = {}
        if self.observed:
            instrument.emit(instrument.CLAIMED, count=len(rows))

    def span(self, messages: list[Message]) -> contextlib.AbstractContextManager[Any]:
        """The observers' publish span around one message or a batch (links to each
        message's trace context); a no-op without observers."""
        if not self.observed:
            return _NO_SPAN
        first = messages[0]
        return instrument.span("outbox.publish", topic=first.topic,
                               message_id=first.id if len(messages) == 1 else None,
                               links=[m.headers for m in messages])

    def timed(self, started: float, rows: Iterable[storage.ClaimedRow]) -> None:
        """Record the publish time of ``rows`` (one call that began at ``started``)."""
        seconds = time.perf_counter() - started
        for row in rows:
            self._timings[row.seq] = seconds

    def batch(self, publisher: object, batch_type: type) -> list[Message] | None:
        """The whole batch for one ``publish_batch``, if the publisher can."""
        if isinstance(publisher, batch_type) and len(self.rows) > 1:
            return [r.message for r in self.rows]
        return None

    def batch_published(self) -> None:
        self.sent = [r.seq for r in self.rows]

    def batch_failed(self, exc: BaseException) -> None:
        # Find the bad row one by one.
        log.warning("relay_batch_publish_failed", error=_error_text(exc), count=len(self.rows))

    def each(self) -> Iterator[storage.ClaimedRow]:
        """The rows to publish one by one, in order, skipping keys that failed."""
        for row in self.rows:
            key = row.message.key
            if key is None or key not in self._blocked:
                yield row

    def published(self, row: storage.ClaimedRow) -> None:
        self.sent.append(row.seq)

    def failed(self, row: storage.ClaimedRow, exc: BaseException) -> None:
        attempts = row.attempts + 1
        dead = attempts >= self.config.max_attempts
        delay = delay_for(self.config.backoff, attempts)
        error = _error_text(exc)
        fields: dict[str, Any] = {**row.message.log_fields(), "attempts": attempts, "error": error}
        if dead:
            log.error("relay_message_dead", **fields)
        else:
            log.warning("relay_publish_failed", retry_in=round(delay, 3), **fields)
        self.failures.append(storage.Failure(
            seq=row.seq, attempts=attempts, next_attempt_at=self.now + dt.timedelta(seconds=delay),
            error=error, dead=dead,
        ))
        if row.message.key is not None:
            self._blocked.add(row.message.key)  # keep the key's order

    def result(self) -> BatchResult:
        """The batch's outcome, once committed (and its events, with observers)."""
        if self.sent:
            log.info("relay_published", count=len(self.sent))
        if self.observed:
            self._announce()
        dead = sum(1 for f in self.failures if f.dead)
        return BatchResult(len(self.rows), len(self.sent), len(self.failures), dead)

    def _announce(self) -> None:
        by_seq = {r.seq: r.message for r in self.rows}
        wall = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        for seq in self.sent:
            m = by_seq[seq]
            created = parse_utc(m.headers.get(CREATED_AT_HEADER))
            instrument.emit(
                instrument.PUBLISHED, topic=m.topic, message_id=m.id, key=m.key,
                headers=m.headers, seconds=self._timings.get(seq),
                delay=(wall - created).total_seconds() if created is not None else None)
        for f in self.failures:
            m = by_seq[f.seq]
            fields = {"topic": m.topic, "message_id": m.id, "key": m.key,
                      "attempt": f.attempts, "error": f.error}
            if f.dead:
                instrument.emit(instrument.DEAD, **fields)
                if m.key is not None:
                    instrument.emit(instrument.PARKED, topic=m.topic, key=m.key,
                                    message_id=m.id)
            else:
                instrument.emit(instrument.PUBLISH_FAILED, **fields)


class RelayCore:
    """What the sync :class:`Relay` and the asyncio ``AsyncRelay`` share: the
    configuration, the batch decisions and when to purge or wait."""

    def __init__(self, config: RelayConfig | None) -> None:
        self.config = config or RelayConfig()
        self._last_purge = 0.0

    def plan(self, rows: list[storage.ClaimedRow], now: dt.datetime) -> BatchPlan:
        return BatchPlan(rows, self.config, now)

    def purge_due(self) -> bool:
        if time.monotonic() - self._last_purge < self.config.purge_interval:
            return False
        self._last_purge = time.monotonic()
        return True

    def more_waiting(self, result: BatchResult) -> bool:
        """A full batch: claim again at once instead of waiting for a nudge."""
        return result.claimed >= self.config.batch_size

    def purge_cutoff(self) -> dt.datetime:
        return utcnow() - self.config.retention

    def listens(self, dialect: str) -> bool:
        return self.config.listen and dialect == "postgresql"


class Relay(RelayCore):
    """Moves committed outbox rows of one database to a publisher.

    Several relays may run on one database at once: each claims rows with row
    locks that skip rows another holds, so no row is published by two at a time.
    A publish failure counts against that row only; other rows go on.
    """

    def __init__(
        self,
        engine: Engine,
        publisher: Publisher,
        config: RelayConfig | None = None,
        *,
        wakeup: threading.Event | None = None,
    ) -> None:
        if not isinstance(engine, Engine):
            raise ConfigurationError(
                f"Relay needs a sync Engine, got {type(engine).__name__}; use AsyncRelay for "
                "an AsyncEngine")
        refuse_same_file(engine, publisher)
        if inspect.iscoroutinefunction(getattr(publisher, "publish", None)):
            raise ConfigurationError(
                f"{type(publisher).__name__} is an asyncio publisher; use AsyncRelay with an "
                "AsyncEngine, or a sync publisher here")
        super().__init__(config)
        self.engine = engine
        self.publisher = publisher
        self.wakeup = wakeup or threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: Future[_Claimed | None] | None = None

    # -- one batch -------------------------------------------------------------

    def run_once(self) -> BatchResult:
        """Claim, publish and mark one batch in one database transaction. Within
        :meth:`run` and :meth:`drain`, a full batch has the next one claimed while it
        publishes (``RelayConfig.claim_ahead``), and the next call takes that one."""
        claimed = self._take_ahead() or self._claim()
        if claimed is None:
            return BatchResult()
        if self._pool is not None and len(claimed.rows) >= self.config.batch_size:
            self._ahead = self._pool.submit(self._claim)
        try:
            return self._send(claimed)
        except BaseException:
            self._drop_ahead()
            raise

    def _claim(self) -> _Claimed | None:
        """Open a transaction and lock a batch in it; None (and no transaction) if no
        row may go now."""
        conn = self.engine.connect()
        try:
            conn.execution_options(**claiming_options(conn))
            conn.begin()
            now = utcnow()
            rows = storage.claim(conn, self.config.batch_size, now)
            if not rows:
                conn.commit()
                conn.close()
                return None
            return _Claimed(conn, rows, now)
        except BaseException:
            conn.close()  # rolls back
            raise

    def _send(self, claimed: _Claimed) -> BatchResult:
        """Publish a claimed batch, mark it and commit."""
        conn = claimed.conn
        try:
            plan = self.plan(claimed.rows, claimed.now)
            self._publish(plan)
            storage.mark_sent(conn, plan.sent, utcnow(), delete_sent=self.config.delete_sent)
            storage.mark_failed(conn, plan.failures)
            conn.commit()
        finally:
            conn.close()  # after a failure: rolls back, the rows stay pending
        return plan.result()

    def _take_ahead(self) -> _Claimed | None:
        """The batch claimed while the last one published (its claim's error is
        this batch's). It may have come back empty only because the last batch held
        its keys: then the caller claims afresh, now that the last one committed."""
        ahead, self._ahead = self._ahead, None
        return ahead.result() if ahead is not None else None

    def _drop_ahead(self) -> None:
        """Roll back a batch claimed ahead: its rows stay pending, never published."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        try:
            claimed = ahead.result()
        except Exception:
            return  # nothing claimed
        if claimed is not None:
            claimed.conn.close()

    @contextlib.contextmanager
    def _claiming_ahead(self) -> Iterator[None]:
        """Within: a second connection claims the next batch while one publishes."""
        if not self.config.claim_ahead or self.engine.dialect.name == "sqlite":
            yield
            return
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay-claim")
        try:
            yield
        finally:
            self._drop_ahead()
            self._pool.shutdown(wait=True)
            self._pool = None

    def _publish(self, plan: BatchPlan) -> None:
        batch = plan.batch(self.publisher, BatchPublisher)
        observed = plan.observed
        if batch is not None:
            started = time.perf_counter() if observed else 0.0
            try:
                with plan.span(batch):
                    self.publisher.publish_batch(batch)  # type: ignore[attr-defined]
            except Exception as exc:
                plan.batch_failed(exc)
            else:
                if observed:
                    plan.timed(started, plan.rows)
                return plan.batch_published()
        for row in plan.each():
            started = time.perf_counter() if observed else 0.0
            try:
                with plan.span([row.message]):
                    self.publisher.publish(row.message)
            except Exception as exc:
                plan.failed(row, exc)
            else:
                if observed:
                    plan.timed(started, (row,))
                plan.published(row)

    # -- maintenance -----------------------------------------------------------

    def purge(self) -> int:
        """Delete sent rows older than the retention, in bounded batches."""
        total = 0
        cutoff = self.purge_cutoff()
        while True:
            with self.engine.begin() as conn:
                n = storage.purge(conn, sent_before=cutoff, batch_size=self.config.purge_batch_size)
            total += n
            if n < self.config.purge_batch_size:
                break
        if total:
            log.info("relay_purged", count=total)
            announce(instrument.PURGED, total)
        return total

    def counts(self) -> dict[str, int]:
        """Outbox rows per status (what ``outbox status`` prints), e.g.
        ``{"pending": 3, "sent": 10, "dead": 0}``."""
        with self.engine.connect() as conn:
            return storage.counts(conn)

    def dead(self, limit: int = 100) -> list[storage.DeadRow]:
        """The oldest ``limit`` dead rows, with their last error."""
        with self.engine.connect() as conn:
            return storage.list_dead(conn, limit)

    def replay(self, message_ids: Iterable[str] | None = None) -> int:
        """Make dead rows (all, or those named) pending again; returns how many. A
        replayed row keeps its place: it goes before the rows its key held back."""
        with self.engine.begin() as conn:
            n = storage.replay_dead(conn, message_ids)
        log.info("relay_replayed", count=n)
        announce(instrument.REPLAYED, n)
        self.wakeup.set()
        return n

    def parked_keys(self, limit: int = 100) -> list[storage.ParkedKey]:
        """Keys held back by a dead row, with how many rows wait behind each."""
        with self.engine.connect() as conn:
            return storage.list_parked_keys(conn, limit)

    def discard(self, message_ids: Iterable[str]) -> int:
        """Give up on the named dead rows (kept as discarded, never published): the
        rows their keys held back flow again. Returns how many."""
        with self.engine.begin() as conn:
            n = storage.discard_dead(conn, list(message_ids))
        log.info("relay_discarded", count=n)
        announce(instrument.DISCARDED, n)
        self.wakeup.set()
        return n

    # -- running ---------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Publish until ``stop`` (or :meth:`stop`) is set. Database errors are
        logged and retried after the poll interval, so a restart of the database
        server does not end the relay."""
        stop = stop or self._stop
        listener, ended = None, threading.Event()
        if self.listens(self.engine.dialect.name):
            listener = threading.Thread(target=self._listen, args=(ended,),
                                        name="outbox-relay-listen", daemon=True)
            listener.start()
        try:
            self._run_batches(stop)
        finally:
            # The listener sees this within a quarter second and closes its
            # connection: nothing of the relay outlives run().
            ended.set()
            if listener is not None:
                listener.join(2.0)

    def _run_batches(self, stop: threading.Event) -> None:
        cfg = self.config
        with self._claiming_ahead():
            while not stop.is_set() and not self._stop.is_set():
                # Cleared before the claim, not after the wait: a commit that nudges
                # while a batch runs is claimed next, never left for the poll interval.
                self.wakeup.clear()
                try:
                    result = self.run_once()
                    if self.purge_due():
                        self.purge()
                except Exception as exc:
                    log.error("relay_batch_failed", error=_error_text(exc))
                    result = BatchResult()
                    stop.wait(cfg.poll_interval)
                if self.more_waiting(result):
                    continue
                self.wakeup.wait(cfg.poll_interval)

    def _listen(self, ended: threading.Event) -> None:
        """Set the wake-up event on every NOTIFY of a committed outbox insert."""
        while not ended.is_set() and not self._stop.is_set():
            try:
                raw = self.engine.raw_connection()
            except Exception as exc:
                log.warning("relay_listen_failed", db=safe_url(self.engine.url),
                            error=_error_text(exc))
                ended.wait(1.0)
                continue
            try:
                conn: Any = raw.driver_connection
                if not hasattr(conn, "notifies"):
                    return  # not psycopg 3: polling alone it is
                conn.autocommit = True
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                while not ended.is_set() and not self._stop.is_set():
                    for _ in conn.notifies(timeout=0.25, stop_after=1):
                        self.wakeup.set()
            except Exception as exc:  # a server restart: listen again
                if ended.is_set() or self._stop.is_set():
                    return
                log.warning("relay_listen_failed", db=safe_url(self.engine.url),
                            error=_error_text(exc))
                ended.wait(1.0)
            finally:
                raw.invalidate()  # autocommit and LISTEN must not go back to the pool

    def start(self) -> Relay:
        """Run in a daemon thread; returns self."""
        if self._thread is not None:
            raise ConfigurationError("relay already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="outbox-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain(self, timeout: float = 30.0) -> int:
        """Publish until no due row is left (or ``timeout``); returns rows published."""
        deadline = time.monotonic() + timeout
        total = 0
        with self._claiming_ahead():
            while time.monotonic() < deadline:
                result = self.run_once()
                total += result.published
                if result.claimed == 0:
                    break
        return total


@dataclass(frozen=True, slots=True)
class _Claimed:
    """A batch locked in its own open transaction on ``conn``."""

    conn: Connection
    rows: list[storage.ClaimedRow]
    now: dt.datetime


__all__ = [
    "BatchPlan", "BatchResult", "Relay", "RelayConfig", "RelayCore", "delay_for",
    "exponential_backoff",
]
