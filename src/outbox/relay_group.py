"""One relay process for many databases: a :class:`RelayGroup` serves the outboxes of
several databases (tenants) fairly, from one thread.

Each database gets its own :class:`~outbox.relay.Relay` (its own engine, the one
publisher shared). The group's thread takes turns round-robin, **at most one batch
per database per turn**, so a database with a million rows waiting cannot hold up
one with ten: it gets one batch per round like every other database that has work.

A database whose last batch was full stays *busy* and gets another turn in the
next round. One whose batch came back short is *idle*: it is skipped until it is
nudged (its relay's ``wakeup`` event: an :class:`~outbox.Outbox` commit through
``subscribe_commits``, a ``replay``, or on PostgreSQL the NOTIFY of a committed
outbox insert) or until its poll interval has passed. When every database is
idle the thread sleeps until the first nudge or the next poll is due.

A database error (server down, tables dropped, file gone) is logged with the
database's URL, password hidden, and that database is tried again after the poll
interval; the other databases go on meanwhile.

Threads and connections: one thread runs every batch of every database. On
PostgreSQL with ``RelayConfig.listen`` (the default), each PostgreSQL database
also has one LISTEN thread holding one connection of its own, so a group of
``n`` PostgreSQL databases runs ``n + 1`` threads and keeps about ``2 n``
connections open (one listening, one pooled for the batches). Give
``RelayConfig(listen=False)`` to poll only: one thread, one pooled connection per
database. As everything runs in one thread, a database that hangs (rather than
fails) holds up the others for as long as it hangs: set a connect timeout and a
statement timeout on the engines of a large group.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from sqlalchemy import Engine, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import instrument, storage
from .db import safe_url
from .errors import ConfigurationError
from .log import get_logger
from .relay import BatchResult, Relay, RelayConfig, announce
from .typing import Publisher

log = get_logger("outbox.relay_group")

_MAX_ERROR_LENGTH = 2000
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
_LOOPBACK = frozenset({"", "localhost", "127.0.0.1", "::1"})


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_LENGTH]


def database_key(url: str | URL) -> tuple[str, ...]:
    """What names one database, whatever the URL's spelling: the kind of server,
    its host and port and the database (user, password, driver and options left
    out); for SQLite the absolute path of the file."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigurationError(
            f"not a database URL: {safe_url(url)!r}; expected e.g. sqlite:///bank1.db or "
            "postgresql+psycopg://user:password@127.0.0.1:5432/bank1") from None
    backend = parsed.get_backend_name()
    backend = "mysql" if backend == "mariadb" else backend
    if backend == "sqlite":
        database = parsed.database or ""
        if str(parsed.query.get("uri", "")).lower() in ("true", "1"):
            database = database.removeprefix("file:")
            name, _, options = database.partition("?")
            if "mode=memory" in options or parsed.query.get("mode") == "memory":
                return ("sqlite-memory", name)
            database = name
        if database in ("", ":memory:"):
            return ("sqlite-memory", "")
        return ("sqlite", str(Path(database).expanduser().resolve()))
    host = (parsed.host or "").lower()
    host = "localhost" if host in _LOOPBACK else host
    port = parsed.port or _DEFAULT_PORTS.get(backend, 0)
    return (backend, host, str(port), parsed.database or "")


def refuse_duplicates(urls: Iterable[str | URL]) -> None:
    """Refuse a list of databases that names one database twice."""
    seen: dict[tuple[str, ...], str] = {}
    for url in urls:
        key = database_key(url)
        shown = safe_url(url)
        if key in seen:
            same = "twice" if seen[key] == shown else f"twice (as {seen[key]} and {shown})"
            raise ConfigurationError(
                f"database {shown} is given {same}; give each database once (a relay "
                "group serves every database it is given, one relay each)")
        seen[key] = shown


class _Nudge(threading.Event):
    """A relay's wake-up event that also wakes the group's thread."""

    def __init__(self, group: threading.Event) -> None:
        super().__init__()
        self._group = group

    def set(self) -> None:
        super().set()
        self._group.set()


class _Tenant:
    """One database of the group and where it stands in the rotation."""

    __slots__ = ("busy", "failing", "name", "next_at", "published", "purge_cutoff",
                 "purged", "purging", "relay")

    def __init__(self, name: str, relay: Relay) -> None:
        self.name = name
        self.relay = relay
        self.busy = False        # the last batch was full: more is waiting
        self.failing = False     # the last turn failed: wait out the poll interval
        self.next_at = 0.0       # monotonic time of its next turn without a nudge
        self.purging = False     # a purge in progress: one purge batch per turn
        self.purge_cutoff: dt.datetime | None = None
        self.purged = 0
        self.published = 0

    def due(self, now: float) -> bool:
        if self.busy or self.purging or now >= self.next_at:
            return True
        return not self.failing and self.relay.wakeup.is_set()


class RelayGroup:
    """Publishes the committed outbox rows of many databases from one thread, fairly.

    ``RelayGroup([engine_a, engine_b, ...], publisher, config)``: one
    :class:`~outbox.relay.Relay` per engine (in :attr:`relays`, in the order given),
    every one with the same ``config`` and the one ``publisher``. See the module's
    documentation for the rotation, the errors and the threads.

    Refuses an empty list, a database given twice (as the same URL or another
    spelling of it) and asyncio engines.
    """

    def __init__(
        self,
        engines: Iterable[Engine],
        publisher: Publisher,
        config: RelayConfig | None = None,
    ) -> None:
        if isinstance(engines, (Engine, AsyncEngine)):
            raise ConfigurationError(
                "RelayGroup takes a list of engines, one per database; for a single "
                "database use Relay")
        engines = list(engines)
        if not engines:
            raise ConfigurationError("RelayGroup needs at least one engine (one per database)")
        for engine in engines:
            if isinstance(engine, AsyncEngine):
                raise ConfigurationError(
                    f"RelayGroup needs sync Engines, got an AsyncEngine for "
                    f"{safe_url(engine.url)}; create the engines with outbox.create_engine, "
                    "or run one AsyncRelay per database")
            if not isinstance(engine, Engine):
                raise ConfigurationError(
                    f"RelayGroup needs sync Engines, got {type(engine).__name__}")
        refuse_duplicates(e.url for e in engines)
        self.config = config or RelayConfig()
        self.publisher = publisher
        self._nudged = threading.Event()
        self._tenants = [
            _Tenant(safe_url(e.url), Relay(e, publisher, self.config,
                                           wakeup=_Nudge(self._nudged)))
            for e in engines
        ]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def relays(self) -> tuple[Relay, ...]:
        """The relays, one per database, in the order the engines were given. Set a
        relay's ``wakeup`` to nudge its database (``outbox.subscribe_commits``)."""
        return tuple(t.relay for t in self._tenants)

    @property
    def names(self) -> tuple[str, ...]:
        """The databases' URLs with passwords hidden, as the log and :meth:`counts` name them."""
        return tuple(t.name for t in self._tenants)

    def __len__(self) -> int:
        return len(self._tenants)

    def __iter__(self) -> Iterator[Relay]:
        return iter(self.relays)

    # -- one turn --------------------------------------------------------------

    def _batch(self, tenant: _Tenant) -> BatchResult | None:
        """One batch of one database; None if the database failed (logged)."""
        relay = tenant.relay
        # Cleared before the claim: a nudge while the batch runs gives another turn.
        relay.wakeup.clear()
        try:
            result = relay.run_once()
        except Exception as exc:
            self._failed(tenant, exc)
            return None
        tenant.failing = False
        tenant.busy = relay.more_waiting(result)
        tenant.next_at = time.monotonic() + self.config.poll_interval
        tenant.published += result.published
        return result

    def _failed(self, tenant: _Tenant, exc: BaseException) -> None:
        log.error("relay_group_batch_failed", db=tenant.name, error=_error_text(exc),
                  retry_in=self.config.poll_interval)
        tenant.busy = tenant.purging = False
        tenant.failing = True
        tenant.next_at = time.monotonic() + self.config.poll_interval

    def _purge_step(self, tenant: _Tenant) -> None:
        """At most one purge batch per turn, so a long purge of one database does
        not stall the others: a purge that has more to do keeps the database busy."""
        relay = tenant.relay
        if not tenant.purging or tenant.purge_cutoff is None:
            if not relay.purge_due():
                return
            tenant.purge_cutoff, tenant.purged = relay.purge_cutoff(), 0
        cutoff, size = tenant.purge_cutoff, self.config.purge_batch_size
        try:
            with relay.engine.begin() as conn:
                n = storage.purge(conn, sent_before=cutoff, batch_size=size)
        except Exception as exc:
            self._failed(tenant, exc)
            return
        tenant.purged += n
        announce(instrument.PURGED, n)
        tenant.purging = n >= size
        if not tenant.purging and tenant.purged:
            log.info("relay_purged", db=tenant.name, count=tenant.purged)

    def _turn(self, tenant: _Tenant) -> BatchResult | None:
        result = self._batch(tenant)
        if result is not None:
            self._purge_step(tenant)
        return result

    def run_once(self) -> dict[str, BatchResult]:
        """One round: one batch of every database, in order, whether nudged or not.
        A database that fails is logged and shows an empty result."""
        out: dict[str, BatchResult] = {}
        for tenant in self._tenants:
            out[tenant.name] = self._batch(tenant) or BatchResult()
        return out

    # -- running ---------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Publish until ``stop`` (or :meth:`stop`) is set, round-robin over the
        databases. Database errors are logged; that database is retried after the
        poll interval while the others go on."""
        stop = stop or self._stop
        halt = threading.Event()  # ends the LISTEN threads when this loop ends
        listeners = [
            threading.Thread(target=t.relay._listen, args=(halt,), daemon=True,
                             name=f"outbox-relay-listen-{i}")
            for i, t in enumerate(self._tenants)
            if t.relay.listens(t.relay.engine.dialect.name)
        ]
        for thread in listeners:
            thread.start()
        log.info("relay_group_started", databases=len(self._tenants),
                 listening=len(listeners))

        def stopped() -> bool:
            return stop.is_set() or self._stop.is_set()

        try:
            while not stopped():
                # Cleared before the round: a nudge during it makes the next round
                # start at once instead of after a sleep.
                self._nudged.clear()
                for tenant in self._tenants:
                    if stopped():
                        break
                    if tenant.due(time.monotonic()):
                        self._turn(tenant)
                if any(t.busy or t.purging for t in self._tenants):
                    continue
                wait = min(t.next_at for t in self._tenants) - time.monotonic()
                if wait > 0:
                    self._nudged.wait(min(wait, self.config.poll_interval))
        finally:
            halt.set()
            deadline = time.monotonic() + 5.0
            for thread in listeners:
                thread.join(max(0.0, deadline - time.monotonic()))

    def start(self) -> RelayGroup:
        """Run in a daemon thread; returns self."""
        if self._thread is not None:
            raise ConfigurationError("relay group already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="outbox-relay-group",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop after the batch in progress (and wait up to ``timeout`` for it)."""
        self._stop.set()
        self._nudged.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain(self, timeout: float = 30.0) -> int:
        """Publish, round-robin, until no database has a due row left (or
        ``timeout``); returns the rows published. A database that fails is logged
        and left out of the rest of this drain."""
        deadline = time.monotonic() + timeout
        active = list(self._tenants)
        total = 0
        while active and time.monotonic() < deadline:
            for tenant in list(active):
                result = self._batch(tenant)
                if result is None or result.claimed == 0:
                    active.remove(tenant)
                else:
                    total += result.published
        return total

    # -- inspection ------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Outbox rows per status for every database, by its URL (password hidden):
        ``{"postgresql+psycopg://app:***@db/tenant1": {"pending": 3, "sent": 10, ...}}``."""
        return {t.name: t.relay.counts() for t in self._tenants}

    def published(self) -> dict[str, int]:
        """Rows this group published per database since it was made."""
        return {t.name: t.published for t in self._tenants}


__all__ = ["RelayGroup", "database_key", "refuse_duplicates"]
