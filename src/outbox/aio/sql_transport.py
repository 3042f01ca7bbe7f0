"""The embedded SQL transport for asyncio: the same queue tables, the same SQL.

Every operation runs the function of :mod:`outbox.sql_queue` that the sync
transport calls, through ``AsyncConnection.run_sync``: SQLAlchemy runs it in a
greenlet inside the event loop, so each database round trip is awaited (no thread
per call) and the loop stays free for other tasks. Sync and async publishers and
subscribers can share one database's queue.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from .. import sql_queue as sql
from ..message import Message
from ..sql_queue import DeadLetter, PollWait, wrapped_errors
from ..transport import Delivery

P = ParamSpec("P")
R = TypeVar("R")

_OWNER = "AsyncSqlTransport"


async def _to_completion(operation: Coroutine[Any, Any, R]) -> R:
    """Await ``operation`` in a task of its own that a cancellation does not cut short.

    A cancellation that arrives meanwhile is re-raised once the operation has
    finished (its transaction committed or rolled back and its connection closed).
    Cut off inside a statement, an aiosqlite connection keeps its write transaction,
    and with it the lock on the whole database file, for as long as anything still
    references the aborted cursor; an operation here takes milliseconds, so waiting
    for it keeps cancellation prompt.
    """
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():
            raise  # the operation itself was cancelled, e.g. by the loop shutting down
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                continue  # already on the way out; the operation still finishes first
        if not task.cancelled():
            task.exception()  # its outcome is dropped with the cancellation, not reported
        raise


class AsyncSqlTransport:
    """The queue tables of one database, used from an event loop; hands out
    :class:`~outbox.typing.AsyncPublisher` and :class:`~outbox.typing.AsyncSubscriber`
    objects. Make the engine with :func:`outbox.aio.create_async_engine`.

    ``poll_interval`` is how often a waiting ``fetch`` looks for new messages; it
    sleeps with ``asyncio.sleep`` in between. ``late_commit_window`` is as for
    :class:`outbox.SqlTransport`.
    """

    def __init__(self, engine: AsyncEngine, *, poll_interval: float = 0.05,
                 late_commit_window: float = sql.DEFAULT_LATE_COMMIT_WINDOW) -> None:
        sql.check_dialect(engine.dialect)
        sql.check_late_commit_window(late_commit_window)
        self.engine = engine
        self.poll_interval = poll_interval
        self.late_commit_window = late_commit_window

    async def _run(self, fn: Callable[Concatenate[Connection, P], R], /,
                   *args: P.args, **kwargs: P.kwargs) -> R:
        return await _to_completion(self._run_now(fn, *args, **kwargs))

    async def _run_now(self, fn: Callable[Concatenate[Connection, P], R], /,
                       *args: P.args, **kwargs: P.kwargs) -> R:
        async with self.engine.connect() as conn:
            return await conn.run_sync(fn, *args, **kwargs)

    async def _call(self, fn: Callable[Concatenate[Connection, P], R], /,
                    *args: P.args, **kwargs: P.kwargs) -> R:
        """:meth:`_run` for publishers and subscribers: errors become the project's."""
        with wrapped_errors(self.engine.url, _OWNER):
            return await self._run(fn, *args, **kwargs)

    async def create_tables(self) -> None:
        """Create the queue tables if they are missing."""
        await self._run(sql.create_tables)

    async def drop_tables(self) -> None:
        """Drop the queue tables and everything on them."""
        await self._run(sql.drop_tables)

    async def counts(self, topic: str, group: str) -> dict[str, int]:
        """Messages of ``topic`` by state for ``group``: ``unseen`` (never fetched),
        ``ready`` (waiting or in flight), ``done`` (acknowledged), ``dead``."""
        return await self._run(sql.count_states, topic, group)

    async def pending_count(self, topic: str, group: str) -> int:
        """Messages of ``topic`` not yet done or dead for ``group``."""
        return sql.pending(await self.counts(topic, group))

    async def dead_letters(self, group: str, limit: int = 1000) -> list[DeadLetter]:
        """The dead-lettered deliveries of ``group`` with their reasons, oldest first."""
        return await self._run(sql.list_dead_letters, group, limit)

    async def purge(self, older_than: dt.timedelta, batch_size: int = 1000) -> int:
        """Delete messages older than ``older_than`` (and their deliveries), batch by batch."""
        return await self._run(sql.purge_older, older_than, batch_size)

    async def put_raw(
        self, topic: str, payload: bytes, *, message_id: str | None = None,
        key: str | None = None, tag: str | None = None, headers: Mapping[str, str] | None = None,
    ) -> None:
        """Put a row on the queue without validating it (for tests of bad input)."""
        await self._run(sql.insert_raw, topic, payload, message_id, key, tag, headers)

    def publisher(self) -> AsyncSqlPublisher:
        return AsyncSqlPublisher(self)

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> AsyncSqlSubscriber:
        """A subscriber of ``topic`` for ``group``; a delivery not acknowledged (or
        retried) within ``visibility_timeout`` seconds is delivered again."""
        return AsyncSqlSubscriber(self, topic, group, visibility_timeout=visibility_timeout)


class AsyncSqlPublisher:
    """AsyncPublisher (and AsyncBatchPublisher) onto the SQL transport."""

    def __init__(self, transport: AsyncSqlTransport) -> None:
        self.transport = transport

    async def publish(self, message: Message) -> None:
        await self.publish_batch([message])

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        """Publish all of ``messages`` in one transaction, or none of them."""
        await self.transport._call(sql.insert_messages, messages)

    async def close(self) -> None:
        pass


class AsyncSqlSubscriber:
    """AsyncSubscriber of one topic for one consumer group on the SQL transport."""

    #: Delivery.attempt is the broker's own count (outbox.typing.CountsDeliveries).
    counts_deliveries = True

    def __init__(self, transport: AsyncSqlTransport, topic: str, group: str, *,
                 visibility_timeout: float) -> None:
        sql.check_visibility_timeout(visibility_timeout)
        self.transport = transport
        self.topic = topic
        self.group = group
        self.visibility_timeout = visibility_timeout

    async def fetch(self, max_messages: int, wait_seconds: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting up to ``wait_seconds`` for the first.

        Cancelling the task stops a pause between polls at once, and a poll in
        progress as soon as its transaction has ended. Deliveries that poll claimed are
        then not handed out: they stay hidden until their visibility timeout and are
        delivered again after it, so nothing is lost, only delayed.
        """
        wait = PollWait(wait_seconds, self.transport.poll_interval)
        while True:
            found = await self.transport._call(sql.claim, self.topic, self.group,
                                               max_messages, self.visibility_timeout,
                                               self.transport.late_commit_window)
            pause = wait.pause(found)
            if pause is None:
                return found
            await asyncio.sleep(pause)

    async def ack(self, delivery: Delivery) -> None:
        await self.transport._call(sql.mark_done, self.group, delivery)

    async def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        await self.transport._call(sql.mark_retry, self.group, delivery, delay_seconds, error)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self.transport._call(sql.mark_dead, self.group, delivery, reason)

    async def close(self) -> None:
        pass
