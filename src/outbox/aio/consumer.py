"""``AsyncIdempotentConsumer``: the idempotent consumer in the service's event loop.

Its decisions are :class:`outbox.consumer.ConsumerPolicy`'s, its transaction is the
one every owned scope runs (:func:`outbox.aio.app.arun_owned`); only the waiting,
the handler and the subscriber calls are awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .. import instrument
from ..consumer import (
    ConsumerBase,
    ConsumerConfig,
    ConsumerStats,
    Outcome,
    ReceivedMessage,
    _reason,
    consumer_tables_missing,
    inbox_missing,
)
from ..consumer_store import forget_attempts, record_failure, store_dead_letter
from ..errors import ConfigurationError, MissingTableError, MisuseError
from ..log import get_logger
from ..relay import delay_for
from ..transport import Delivery
from ..typing import AsyncSubscriber, Codec
from ._tasks import Background
from .app import aexplain_missing, arun_owned, guarded_async_factory

log = get_logger("outbox.consumer")

AsyncHandler = Callable[[AsyncSession, ReceivedMessage], Awaitable[None]]


class AsyncIdempotentConsumer(ConsumerBase):
    """Applies each message of an asyncio ``subscriber`` once to the consumer's database.

    The same promise as :class:`outbox.IdempotentConsumer`: the inbox row and
    ``await handler(session, message)`` commit in one transaction, then the delivery
    is acknowledged; duplicates are acknowledged without running the handler; failures
    are retried with backoff, then dead-lettered. Messages sent in the handler (``await
    outbox.send(session, ...)``, or a decorated function of an ``AsyncOutbox`` on the
    same database) commit with the inbox row.

    ``await consumer.run()`` consumes until :meth:`stop`; a stop lets the delivery in
    hand finish. A cancellation rolls back the delivery in hand, which is delivered
    again after the subscriber's visibility timeout: nothing is lost.
    """

    def __init__(
        self,
        bind: AsyncEngine | async_sessionmaker[AsyncSession],
        subscriber: AsyncSubscriber,
        group: str,
        handler: AsyncHandler,
        *,
        codec: Codec | None = None,
        config: ConsumerConfig | None = None,
    ) -> None:
        self.check_group(group)
        if not inspect.iscoroutinefunction(handler):
            raise MisuseError(
                "AsyncIdempotentConsumer needs an async def handler(session, message); for a "
                "sync handler use IdempotentConsumer")
        if not inspect.iscoroutinefunction(getattr(subscriber, "fetch", None)):
            raise ConfigurationError(
                f"{type(subscriber).__name__} is not an asyncio subscriber; use its asyncio "
                "form (e.g. AsyncSqlTransport(...).subscriber(...))")
        self.session_factory = guarded_async_factory(bind, "AsyncIdempotentConsumer")
        self.engine: AsyncEngine = self.session_factory.kw["bind"]
        self._setup(self.engine, subscriber, group, handler, codec, config)
        self._stopping = False
        self._background = Background("consumer")

    async def handle(self, delivery: Delivery) -> Outcome:
        """Process one delivery and tell the subscriber; returns what became of it.
        Without :class:`~outbox.typing.AsyncRedelivery` a failed delivery is held and
        tried again in place, as :meth:`outbox.IdempotentConsumer.handle` does."""
        if instrument.observers:
            with self.policy.observed(delivery):
                return await self._handle(delivery, time.perf_counter())
        return await self._handle(delivery, None)

    async def _handle(self, delivery: Delivery, started: float | None) -> Outcome:
        policy, abilities = self.policy, self.abilities
        counted = False  # this call wrote a failure count for the message
        while True:
            decision = policy.accept(delivery, counted=abilities.counts_deliveries)
            if isinstance(decision, ReceivedMessage):
                try:
                    decision = policy.succeeded(await self._apply(decision, forget=counted))
                except MissingTableError:
                    raise  # a setup mistake: nothing is retried or dead-lettered for it
                except Exception as exc:
                    failures = await self._count(delivery, exc)
                    counted = counted or failures is not None
                    decision = policy.failed(exc, self.attempt_of(delivery, failures),
                                             limit_transient=abilities.counts_deliveries)
            action, args = policy.verdict(decision, abilities)
            if action == "hold":
                policy.report(decision, delivery, started)
                if not await self._wait(args[0]):
                    return decision.outcome
                delivery = replace(delivery, attempt=delivery.attempt + 1)
                continue
            if action == "store_dead":
                if not await self._store_dead(delivery, *args):
                    return Outcome.RETRIED  # stopped with the database down: comes back
                action, args = "ack", ()
            await getattr(self.subscriber, action)(delivery, *args)
            if action == "dead_letter" and counted:
                await self._forget(delivery)
            policy.report(decision, delivery, started)
            return decision.outcome

    async def _count(self, delivery: Delivery, exc: BaseException) -> int | None:
        """:meth:`outbox.IdempotentConsumer._count`, awaited."""
        if (self.abilities.counts_deliveries or not delivery.message_id
                or not self.policy.counts_failure(exc)):
            return None
        try:
            async with self.engine.connect() as conn:
                return await conn.run_sync(record_failure, self.group, delivery.message_id,
                                           _reason(exc))
        except Exception as count_exc:
            explained = await aexplain_missing(self.engine, count_exc, consumer_tables_missing)
            if isinstance(explained, MissingTableError):
                raise explained from count_exc
            log.warning("consumer_attempt_not_counted", error=_reason(count_exc),
                        **self.policy.fields(delivery))
            return None

    async def _store_dead(self, delivery: Delivery, reason: str, attempt: int) -> bool:
        """:meth:`outbox.IdempotentConsumer._store_dead`, awaited."""
        tries = 0
        while True:
            try:
                async with self.engine.connect() as conn:
                    await conn.run_sync(store_dead_letter, self.group, delivery, reason, attempt)
                return True
            except Exception as exc:
                explained = await aexplain_missing(self.engine, exc, consumer_tables_missing)
                if isinstance(explained, MissingTableError):
                    raise explained from exc
                tries += 1
                log.warning("consumer_dead_letter_not_stored", error=_reason(exc),
                            **self.policy.fields(delivery))
                if not await self._wait(delay_for(self.config.backoff, tries)):
                    return False

    async def _forget(self, delivery: Delivery) -> None:
        """:meth:`outbox.IdempotentConsumer._forget`, awaited."""
        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(forget_attempts, self.group, delivery.message_id or "")
        except Exception as exc:
            log.warning("consumer_attempts_not_cleared", error=_reason(exc),
                        **self.policy.fields(delivery))

    async def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopping; False if stopping."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            await asyncio.sleep(min(remaining, 0.2))
        return False

    async def _apply(self, received: ReceivedMessage, *, forget: bool = False) -> bool:
        """The inbox row and the handler in one transaction; False for a duplicate."""

        async def work(session: AsyncSession) -> bool:
            conn = await session.connection()
            result = await conn.execute(*self.policy.inbox_insert(conn, received.id))
            if forget:
                await conn.run_sync(forget_attempts, self.group, received.id)
            if not self.policy.inserted(result.rowcount):
                return False
            await self.handler(session, received)
            return True

        return await arun_owned(
            self.session_factory, identity=self.identity,
            owner=f"the handler of consumer group {self.group!r}", ticket=None, lock=None,
            work=work, explain=self._explain,
        )

    async def _explain(self, exc: BaseException) -> BaseException:
        return await aexplain_missing(self.engine, exc, inbox_missing)

    async def run_once(self, wait_seconds: float | None = None) -> ConsumerStats:
        """Fetch one batch and handle it; returns what happened."""
        wait = self.config.wait_seconds if wait_seconds is None else wait_seconds
        stats = ConsumerStats()
        for delivery in await self.subscriber.fetch(self.config.batch_size, wait):
            stats.count(await self.handle(delivery))
        self.stats.add(stats)
        return stats

    async def run(self, *, metrics_port: int | None = None,
                  metrics_host: str = "127.0.0.1") -> None:
        """Consume until :meth:`stop`. Errors reaching the transport or the database
        are logged and retried; a missing inbox table ends it (MissingTableError).

        ``metrics_port`` serves Prometheus metrics at ``/metrics`` meanwhile: the
        consumer's counters and histograms (the table gauges need a sync engine: serve
        them with ``outbox.metrics.serve(port, engines=...)``)."""
        if metrics_port is not None:
            from .. import metrics

            with metrics.serving(metrics_port, host=metrics_host):
                await self.run()
            return
        self._stopping = False
        while not self._stopping:
            try:
                await self.run_once()
            except MissingTableError:
                raise
            except Exception as exc:
                log.error("consumer_batch_failed", error=_reason(exc), group=self.group)
                await asyncio.sleep(1.0)

    def start(self) -> AsyncIdempotentConsumer:
        """Run as a task of the running event loop (in a context of its own); returns
        self."""
        self._background.start(self.run)
        return self

    async def stop(self, timeout: float | None = 10.0) -> None:
        """Finish the delivery in hand and the current fetch wait, then end :meth:`run`;
        past ``timeout`` the task is cancelled (its delivery comes back later)."""
        self._stopping = True
        await self._background.stop(timeout)
