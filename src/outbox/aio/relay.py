"""``AsyncRelay``: the relay in the service's event loop.

It runs the same statements (``outbox.storage``, through SQLAlchemy's greenlet
bridge ``run_sync``) and the same decisions (:class:`outbox.relay.BatchPlan`) as the
sync :class:`outbox.Relay`; only the waiting and the publishing are awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import instrument, storage
from ..db import claiming_options
from ..errors import ConfigurationError
from ..log import get_logger
from ..relay import (
    BatchPlan,
    BatchResult,
    RelayConfig,
    RelayCore,
    _error_text,
    announce,
    refuse_same_file,
)
from ..schema import NOTIFY_CHANNEL, utcnow
from ..typing import AsyncBatchPublisher, AsyncPublisher
from ._tasks import Background

log = get_logger("outbox.relay")


class AsyncRelay(RelayCore):
    """Moves committed outbox rows of one database to an asyncio publisher.

    ``await relay.run()`` publishes until :meth:`stop` (or the task is cancelled);
    ``relay.start()`` runs it as a task of the running loop. Stopping lets the
    current batch finish; a cancellation mid-batch rolls the batch's marks back, so
    its rows are published again later (the consumers' inbox drops the copies):
    nothing is lost either way.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        publisher: AsyncPublisher,
        config: RelayConfig | None = None,
        *,
        wakeup: asyncio.Event | None = None,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                f"AsyncRelay needs an AsyncEngine, got {type(engine).__name__}; use Relay for "
                "a sync Engine")
        if not inspect.iscoroutinefunction(getattr(publisher, "publish", None)):
            raise ConfigurationError(
                f"{type(publisher).__name__} is not an asyncio publisher (its publish is not "
                "a coroutine); use Relay with it, or its asyncio form here")
        refuse_same_file(engine.sync_engine, publisher)
        super().__init__(config)
        self.engine = engine
        self.publisher = publisher
        self.wakeup = wakeup or asyncio.Event()
        self._stopping = False
        self._background = Background("relay")
        self._ahead_on = False
        self._ahead: asyncio.Task[_Claimed | None] | None = None

    # -- one batch -------------------------------------------------------------

    async def run_once(self) -> BatchResult:
        """Claim, publish and mark one batch in one database transaction. Within
        :meth:`run` and :meth:`drain`, a full batch has the next one claimed while it
        publishes (``RelayConfig.claim_ahead``), and the next call takes that one."""
        claimed = await self._take_ahead() or await self._claim()
        if claimed is None:
            return BatchResult()
        if self._ahead_on and len(claimed.rows) >= self.config.batch_size:
            self._ahead = asyncio.get_running_loop().create_task(self._claim())
        try:
            return await self._send(claimed)
        except BaseException:
            await self._drop_ahead()
            raise

    async def _claim(self) -> _Claimed | None:
        """Open a transaction and lock a batch in it; None (and no transaction) if no
        row may go now."""
        conn = await self.engine.connect()
        try:
            await conn.execution_options(**claiming_options(self.engine.sync_engine))
            await conn.begin()
            now = utcnow()
            rows = await conn.run_sync(storage.claim, self.config.batch_size, now)
            if not rows:
                await conn.commit()
                await conn.close()
                return None
            return _Claimed(conn, rows, now)
        except BaseException:
            await conn.close()  # rolls back
            raise

    async def _send(self, claimed: _Claimed) -> BatchResult:
        """Publish a claimed batch, mark it and commit; a cancellation rolls it back."""
        conn = claimed.conn
        try:
            plan = self.plan(claimed.rows, claimed.now)
            await self._publish(plan)
            await conn.run_sync(storage.mark_sent, plan.sent, utcnow(),
                                delete_sent=self.config.delete_sent)
            await conn.run_sync(storage.mark_failed, plan.failures)
            await conn.commit()
        finally:
            await conn.close()
        return plan.result()

    async def _take_ahead(self) -> _Claimed | None:
        """The batch claimed while the last one published (see the sync relay)."""
        ahead, self._ahead = self._ahead, None
        return await ahead if ahead is not None else None

    async def _drop_ahead(self) -> None:
        """Roll back a batch claimed ahead: its rows stay pending, never published."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        try:
            claimed = await asyncio.shield(ahead)
        except asyncio.CancelledError:
            claimed = await ahead  # the relay itself is being cancelled: still clean up
        except Exception:
            return  # nothing claimed
        if claimed is not None:
            await claimed.conn.close()

    @contextlib.asynccontextmanager
    async def _claiming_ahead(self) -> AsyncIterator[None]:
        """Within: the next batch is claimed on a second connection while one publishes."""
        self._ahead_on = self.config.claim_ahead and self.engine.dialect.name != "sqlite"
        try:
            yield
        finally:
            self._ahead_on = False
            await self._drop_ahead()

    async def _publish(self, plan: BatchPlan) -> None:
        batch = plan.batch(self.publisher, AsyncBatchPublisher)
        observed = plan.observed
        if batch is not None:
            started = time.perf_counter() if observed else 0.0
            try:
                with plan.span(batch):
                    await self.publisher.publish_batch(batch)  # type: ignore[attr-defined]
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
                    await self.publisher.publish(row.message)
            except Exception as exc:
                plan.failed(row, exc)
            else:
                if observed:
                    plan.timed(started, (row,))
                plan.published(row)

    # -- maintenance -----------------------------------------------------------

    async def purge(self) -> int:
        """Delete sent rows older than the retention, in bounded batches."""
        total = 0
        cutoff = self.purge_cutoff()
        while True:
            async with self.engine.begin() as conn:
                n = await conn.run_sync(storage.purge, sent_before=cutoff,
                                        batch_size=self.config.purge_batch_size)
            total += n
            if n < self.config.purge_batch_size:
                break
        if total:
            log.info("relay_purged", count=total)
            announce(instrument.PURGED, total)
        return total

    async def counts(self) -> dict[str, int]:
        """Outbox rows per status (what ``outbox status`` prints)."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(storage.counts)

    async def dead(self, limit: int = 100) -> list[storage.DeadRow]:
        """The oldest ``limit`` dead rows, with their last error."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(storage.list_dead, limit)

    async def replay(self, message_ids: Iterable[str] | None = None) -> int:
        """Make dead rows (all, or those named) pending again; returns how many."""
        ids = list(message_ids) if message_ids is not None else None
        async with self.engine.begin() as conn:
            n = await conn.run_sync(storage.replay_dead, ids)
        log.info("relay_replayed", count=n)
        announce(instrument.REPLAYED, n)
        self.wakeup.set()
        return n

    async def parked_keys(self, limit: int = 100) -> list[storage.ParkedKey]:
        """Keys held back by a dead row, with how many rows wait behind each."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(storage.list_parked_keys, limit)

    async def discard(self, message_ids: Iterable[str]) -> int:
        """Give up on the named dead rows (see :meth:`outbox.Relay.discard`)."""
        ids = list(message_ids)
        async with self.engine.begin() as conn:
            n = await conn.run_sync(storage.discard_dead, ids)
        log.info("relay_discarded", count=n)
        announce(instrument.DISCARDED, n)
        self.wakeup.set()
        return n

    # -- running ---------------------------------------------------------------

    async def run(self) -> None:
        """Publish until :meth:`stop`. Database errors are logged and retried after the
        poll interval, so a restart of the database server does not end the relay."""
        self._stopping = False
        listener = (asyncio.get_running_loop().create_task(self._listen())
                    if self.listens(self.engine.dialect.name) else None)
        try:
            async with self._claiming_ahead():
                await self._run_batches()
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _run_batches(self) -> None:
        cfg = self.config
        while not self._stopping:
            try:
                result = await self.run_once()
                if self.purge_due():
                    await self.purge()
            except Exception as exc:
                log.error("relay_batch_failed", error=_error_text(exc))
                result = BatchResult()
                await self._wait(cfg.poll_interval)
            if self._stopping or self.more_waiting(result):
                continue
            await self._wait(cfg.poll_interval)

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wakeup.wait(), seconds)
        self.wakeup.clear()

    async def _listen(self) -> None:
        """Set the wake-up event on every NOTIFY of a committed outbox insert, through
        the asyncio driver's own connection (psycopg 3 or asyncpg)."""
        while not self._stopping:
            try:
                async with self.engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    driver: Any = raw.driver_connection
                    try:
                        await self._listen_on(driver)
                    finally:
                        # Autocommit and LISTEN must not go back to the pool: close it.
                        await conn.invalidate()
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a server restart: listen again
                log.warning("relay_listen_failed", error=_error_text(exc))
                await asyncio.sleep(1.0)

    async def _listen_on(self, driver: Any) -> None:
        if hasattr(driver, "add_listener"):  # asyncpg
            await driver.add_listener(NOTIFY_CHANNEL, lambda *_: self.wakeup.set())
            while not self._stopping:
                await asyncio.sleep(1.0)
            return
        await driver.set_autocommit(True)  # psycopg 3
        await driver.execute(f"LISTEN {NOTIFY_CHANNEL}")
        while not self._stopping:
            async for _ in driver.notifies(timeout=1.0, stop_after=1):
                self.wakeup.set()

    def start(self) -> AsyncRelay:
        """Run as a task of the running event loop (in a context of its own); returns
        self."""
        self._background.start(self.run)
        return self

    async def stop(self, timeout: float | None = 10.0) -> None:
        """Let the current batch finish, then end :meth:`run`; past ``timeout`` the
        task is cancelled (its batch is published again later)."""
        self._stopping = True
        self.wakeup.set()
        await self._background.stop(timeout)

    async def drain(self, timeout: float = 30.0) -> int:
        """Publish until no due row is left (or ``timeout``); returns rows published."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        total = 0
        async with self._claiming_ahead():
            while loop.time() < deadline:
                result = await self.run_once()
                total += result.published
                if result.claimed == 0:
                    break
        return total


@dataclass(frozen=True, slots=True)
class _Claimed:
    """A batch locked in its own open transaction on ``conn``."""

    conn: AsyncConnection
    rows: list[storage.ClaimedRow]
    now: dt.datetime
