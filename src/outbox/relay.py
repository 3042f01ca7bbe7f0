"""The relay: publishes committed outbox rows, with backoff, parking and purge."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
import tenacity
from sqlalchemy import Engine

from . import storage
from .errors import ConfigurationError
from .schema import NOTIFY_CHANNEL, utcnow
from .typing import BatchPublisher, Publisher

log = structlog.get_logger("outbox.relay")

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


def _refuse_same_sqlite_file(engine: Engine, publisher: Publisher) -> None:
    target = getattr(publisher, "engine", None)
    if not isinstance(target, Engine) or engine.dialect.name != "sqlite":
        return
    if target.dialect.name == "sqlite" and target.url.database == engine.url.database:
        # The relay holds SQLite's only write lock while it publishes, so a publisher
        # writing to the same file would wait for it until the busy timeout.
        raise ConfigurationError(
            f"the SQL transport must not live in the outbox's own SQLite file "
            f"({engine.url.database}); give it a file of its own, e.g. sqlite:///broker.db"
        )


class Relay:
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
        _refuse_same_sqlite_file(engine, publisher)
        self.engine = engine
        self.publisher = publisher
        self.config = config or RelayConfig()
        self.wakeup = wakeup or threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_purge = 0.0

    # -- one batch -------------------------------------------------------------

    def run_once(self) -> BatchResult:
        """Claim, publish and mark one batch in one database transaction."""
        cfg = self.config
        with self.engine.begin() as conn:
            now = utcnow()
            rows = storage.claim(conn, cfg.batch_size, now)
            if not rows:
                return BatchResult()
            sent, failures = self._publish(rows, now)
            storage.mark_sent(conn, sent, utcnow(), delete_sent=cfg.delete_sent)
            storage.mark_failed(conn, failures)
        dead = sum(1 for f in failures if f.dead)
        if sent:
            log.info("relay_published", count=len(sent))
        return BatchResult(len(rows), len(sent), len(failures), dead)

    def _publish(
        self, rows: list[storage.ClaimedRow], now: dt.datetime
    ) -> tuple[list[int], list[storage.Failure]]:
        if isinstance(self.publisher, BatchPublisher) and len(rows) > 1:
            try:
                self.publisher.publish_batch([r.message for r in rows])
            except Exception as exc:  # find the bad row one by one below
                log.warning("relay_batch_publish_failed", error=_error_text(exc), count=len(rows))
            else:
                return [r.seq for r in rows], []
        sent: list[int] = []
        failures: list[storage.Failure] = []
        blocked_keys: set[str] = set()
        for row in rows:
            msg = row.message
            if msg.key is not None and msg.key in blocked_keys:
                continue  # an earlier message with this key failed: keep the order
            try:
                self.publisher.publish(msg)
            except Exception as exc:
                failures.append(self._failure(row, exc, now))
                if msg.key is not None:
                    blocked_keys.add(msg.key)
            else:
                sent.append(row.seq)
        return sent, failures

    def _failure(
        self, row: storage.ClaimedRow, exc: BaseException, now: dt.datetime
    ) -> storage.Failure:
        attempts = row.attempts + 1
        dead = attempts >= self.config.max_attempts
        delay = delay_for(self.config.backoff, attempts)
        error = _error_text(exc)
        fields: dict[str, Any] = {**row.message.log_fields(), "attempts": attempts, "error": error}
        if dead:
            log.error("relay_message_dead", **fields)
        else:
            log.warning("relay_publish_failed", retry_in=round(delay, 3), **fields)
        return storage.Failure(
            seq=row.seq, attempts=attempts, next_attempt_at=now + dt.timedelta(seconds=delay),
            error=error, dead=dead,
        )

    # -- maintenance -----------------------------------------------------------

    def purge(self) -> int:
        """Delete sent rows older than the retention, in bounded batches."""
        total = 0
        cutoff = utcnow() - self.config.retention
        while True:
            with self.engine.begin() as conn:
                n = storage.purge(conn, sent_before=cutoff, batch_size=self.config.purge_batch_size)
            total += n
            if n < self.config.purge_batch_size:
                break
        if total:
            log.info("relay_purged", count=total)
        return total

    def dead(self, limit: int = 100) -> list[storage.DeadRow]:
        with self.engine.connect() as conn:
            return storage.list_dead(conn, limit)

    def replay(self, message_ids: Iterable[str] | None = None) -> int:
        """Make dead rows (all, or those named) pending again; returns how many."""
        with self.engine.begin() as conn:
            n = storage.replay_dead(conn, message_ids)
        log.info("relay_replayed", count=n)
        self.wakeup.set()
        return n

    # -- running ---------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Publish until ``stop`` (or :meth:`stop`) is set. Database errors are
        logged and retried after the poll interval, so a restart of the database
        server does not end the relay."""
        stop = stop or self._stop
        cfg = self.config
        if cfg.listen and self.engine.dialect.name == "postgresql":
            threading.Thread(target=self._listen, args=(stop,), name="outbox-relay-listen",
                             daemon=True).start()
        while not stop.is_set() and not self._stop.is_set():
            try:
                result = self.run_once()
                if time.monotonic() - self._last_purge >= cfg.purge_interval:
                    self._last_purge = time.monotonic()
                    self.purge()
            except Exception as exc:
                log.error("relay_batch_failed", error=_error_text(exc))
                result = BatchResult()
                stop.wait(cfg.poll_interval)
            if result.claimed >= cfg.batch_size:
                continue  # more may be waiting
            self.wakeup.wait(cfg.poll_interval)
            self.wakeup.clear()

    def _listen(self, stop: threading.Event) -> None:
        """Set the wake-up event on every NOTIFY of a committed outbox insert."""
        while not stop.is_set() and not self._stop.is_set():
            try:
                raw = self.engine.raw_connection()
            except Exception as exc:
                log.warning("relay_listen_failed", error=_error_text(exc))
                stop.wait(1.0)
                continue
            try:
                conn: Any = raw.driver_connection
                if not hasattr(conn, "notifies"):
                    return  # not psycopg 3: polling alone it is
                conn.autocommit = True
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                while not stop.is_set() and not self._stop.is_set():
                    for _ in conn.notifies(timeout=1.0, stop_after=1):
                        self.wakeup.set()
            except Exception as exc:  # a server restart: listen again
                log.warning("relay_listen_failed", error=_error_text(exc))
                stop.wait(1.0)
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
        while time.monotonic() < deadline:
            result = self.run_once()
            total += result.published
            if result.claimed == 0:
                break
        return total


__all__ = ["BatchResult", "Relay", "RelayConfig", "delay_for", "exponential_backoff"]
