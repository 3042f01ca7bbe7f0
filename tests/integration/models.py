"""Both concurrency models behind one test API, so each test is written once.

Business code in a test is an ``async def body(ops, ...)`` that does its database
work through ``ops`` (``await ops.execute(stmt)``, ``await ops.send(outbox, ...)``,
``await ops.call(decorated, ...)``). The async model decorates an ``async def`` that
awaits the real AsyncSession; the sync model decorates a plain ``def`` that drives
the same body to its end without an event loop (nothing in the sync ops suspends),
so the sync decorator, the sync Session and sync nesting are what run.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outbox import (
    AsyncIdempotentConsumer,
    AsyncOutbox,
    AsyncRelay,
    IdempotentConsumer,
    Outbox,
    Relay,
)

Body = Callable[..., Coroutine[Any, Any, Any]]


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends, as plain sync code."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("a sync-model body suspended: it awaited something real")


class SyncOps:
    """What a body may do, done synchronously on a sync Session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    async def execute(self, statement: Any) -> Any:
        return self.session.execute(statement)

    async def send(self, outbox: Any, **message: Any) -> Any:
        return outbox.send(self.session, **message)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    async def commit(self) -> None:
        self.session.commit()

    async def rollback(self) -> None:
        self.session.rollback()

    async def close(self) -> None:
        self.session.close()


class AsyncOps(SyncOps):
    """The same, awaited on an AsyncSession."""

    session: AsyncSession  # type: ignore[assignment]

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def execute(self, statement: Any) -> Any:
        return await self.session.execute(statement)

    async def send(self, outbox: Any, **message: Any) -> Any:
        return await outbox.send(self.session, **message)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await fn(*args, **kwargs)

    async def commit(self) -> None:
        await self.session.commit()

    async def rollback(self) -> None:
        await self.session.rollback()

    async def close(self) -> None:
        await self.session.close()


class AsyncOf:
    """A sync test publisher (it never blocks) seen as an asyncio one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def publish(self, message: Any) -> None:
        self.inner.publish(message)

    async def close(self) -> None:
        self.inner.close()


class AsyncBatchOf(AsyncOf):
    async def publish_batch(self, messages: Any) -> None:
        self.inner.publish_batch(messages)


def _session_signature(body: Body) -> inspect.Signature:
    params = list(inspect.signature(body).parameters.values())
    return inspect.Signature([params[0].replace(name="session"), *params[1:]])


class Model:
    """One concurrency model on one database: ``sync`` or ``async``."""

    def __init__(self, name: str, engine: Engine, async_engine: AsyncEngine) -> None:
        self.name = name
        self.is_async = name == "async"
        self.engine = engine
        self.async_engine = async_engine

    def __repr__(self) -> str:
        return f"Model({self.name})"

    def outbox(self, **options: Any) -> Any:
        if self.is_async:
            return AsyncOutbox(self.async_engine, **options)
        return Outbox(self.engine, **options)

    def define(self, outbox: Any, body: Body, **options: Any) -> Callable[..., Any]:
        """``body`` decorated with ``outbox.transactional_message(**options)``."""
        if self.is_async:
            async def afn(session: AsyncSession, *args: Any, **kwargs: Any) -> Any:
                return await body(AsyncOps(session), *args, **kwargs)
            fn: Callable[..., Any] = afn
        else:
            def sfn(session: Session, *args: Any, **kwargs: Any) -> Any:
                return drive(body(SyncOps(session), *args, **kwargs))
            fn = sfn
        fn.__signature__ = _session_signature(body)  # type: ignore[attr-defined]
        fn.__qualname__ = body.__qualname__
        return outbox.transactional_message(**options)(fn)  # type: ignore[no-any-return]

    def handler(self, body: Body) -> Callable[..., Any]:
        """A consumer handler ``(session, message)`` running ``body(ops, message)``."""
        if self.is_async:
            async def ahandler(session: AsyncSession, message: Any) -> None:
                await body(AsyncOps(session), message)
            return ahandler

        def shandler(session: Session, message: Any) -> None:
            drive(body(SyncOps(session), message))
        return shandler

    def consumer(self, subscriber: Any, group: str, body: Body, **options: Any) -> Any:
        cls: Any = AsyncIdempotentConsumer if self.is_async else IdempotentConsumer
        bind: Any = self.async_engine if self.is_async else self.engine
        return cls(bind, subscriber, group, self.handler(body), **options)

    def subscriber(self, broker: Any, topic: str, group: str, **options: Any) -> Any:
        """A subscriber of the model's kind on an ``InMemoryBroker``."""
        if self.is_async:
            return broker.async_subscriber(topic, group, **options)
        return broker.subscriber(topic, group, **options)

    def publisher(self, publisher: Any) -> Any:
        """``publisher`` (sync, or an ``InMemoryBroker``) as the model's kind."""
        if not self.is_async:
            return publisher
        if hasattr(publisher, "async_publisher"):
            return publisher.async_publisher()
        if hasattr(publisher, "publish_batch"):
            return AsyncBatchOf(publisher)
        return AsyncOf(publisher)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Poll without blocking the loop (an async relay or consumer runs in it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if predicate():
                return True
            await asyncio.sleep(0.02)
        return bool(predicate())

    def relay(self, publisher: Any, **options: Any) -> Any:
        if self.is_async:
            return AsyncRelay(self.async_engine, publisher, **options)
        return Relay(self.engine, publisher, **options)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        """A session the caller owns (and commits), of the model's kind."""
        if self.is_async:
            async with AsyncSession(self.async_engine) as asession:
                yield asession
        else:
            with Session(self.engine) as session:
                yield session

    def ops(self, session: Any) -> SyncOps:
        return AsyncOps(session) if self.is_async else SyncOps(session)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a decorated function, a relay or consumer method of the model."""
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    def run(self, scenario: Callable[[], Awaitable[Any]]) -> Any:
        """Run a test's scenario (in an event loop in both models: the sync model's
        calls simply do not suspend)."""
        return asyncio.run(scenario())  # type: ignore[arg-type]
