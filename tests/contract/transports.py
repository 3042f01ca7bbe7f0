"""The transports under contract, each declaring what it guarantees in a Features value.

Every transport has a sync and an asyncio form. The contract tests are written once,
against the sync protocols; an async form is driven through :class:`SyncPublisher`
and :class:`SyncSubscriber`, which run its coroutines on a private event loop
(:class:`LoopThread`) that the test owns. Tests that call from several threads at
once thereby run several tasks at once on that one loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import subprocess
import sys
import textwrap
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import Engine

from outbox import Message, SqlTransport
from outbox.aio import create_async_engine
from outbox.aio.sql_transport import AsyncSqlTransport
from outbox.testing import InMemoryBroker
from outbox.transport import Delivery
from outbox.typing import (
    AsyncBatchPublisher,
    AsyncPublisher,
    AsyncSubscriber,
    Publisher,
    Subscriber,
)

T = TypeVar("T")

#: Longer than any single call of a contract test; a hung coroutine fails, not hangs.
CALL_TIMEOUT = 120.0


@dataclass(frozen=True)
class Features:
    """What a transport promises; a test of a promise not made is skipped."""

    #: Another process can publish to, and consume from, the same queue.
    shared_between_processes: bool
    #: A delivery neither acknowledged nor retried comes back after the visibility timeout.
    redelivers_after_visibility_timeout: bool
    #: ``publish_batch`` exists and stores all of the batch or none of it.
    batch_publish: bool
    #: One subscriber of one group gets a topic's messages in publish order.
    ordered: bool


class TransportUnderTest(Protocol):
    features: Features

    def publisher(self) -> Publisher: ...

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber: ...

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        """(message id, reason) of every dead-lettered delivery of ``group``."""
        ...

    def publish_from_another_process(self, topic: str, ids: Sequence[str]) -> None: ...

    def close(self) -> None: ...


class LoopThread:
    """A private event loop running on a thread of its own, for one test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="contract-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result, from any thread."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(CALL_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _require_coroutines(obj: object, *names: str) -> None:
    for name in names:
        if not inspect.iscoroutinefunction(getattr(obj, name, None)):
            raise TypeError(f"{type(obj).__name__}.{name} is not a coroutine function")


class SyncPublisher:
    """Publisher and BatchPublisher over an AsyncPublisher + AsyncBatchPublisher."""

    def __init__(self, inner: object, loop: LoopThread) -> None:
        if not (isinstance(inner, AsyncPublisher) and isinstance(inner, AsyncBatchPublisher)):
            raise TypeError(f"{type(inner).__name__} is not an async batch publisher")
        _require_coroutines(inner, "publish", "publish_batch", "close")
        self.inner = inner
        self.loop = loop

    def publish(self, message: Message) -> None:
        self.loop.run(self.inner.publish(message))

    def publish_batch(self, messages: Sequence[Message]) -> None:
        assert isinstance(self.inner, AsyncBatchPublisher)
        self.loop.run(self.inner.publish_batch(messages))

    def close(self) -> None:
        self.loop.run(self.inner.close())


class SyncSubscriber:
    """Subscriber over an AsyncSubscriber."""

    def __init__(self, inner: object, loop: LoopThread) -> None:
        if not isinstance(inner, AsyncSubscriber):
            raise TypeError(f"{type(inner).__name__} is not an async subscriber")
        _require_coroutines(inner, "fetch", "ack", "retry", "dead_letter", "close")
        self.inner = inner
        self.loop = loop

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        return self.loop.run(self.inner.fetch(max_messages, wait_seconds))

    def ack(self, delivery: Delivery) -> None:
        self.loop.run(self.inner.ack(delivery))

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        self.loop.run(self.inner.retry(delivery, delay_seconds, error))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.loop.run(self.inner.dead_letter(delivery, reason))

    def close(self) -> None:
        self.loop.run(self.inner.close())


class MemoryUnderTest:
    features = Features(
        shared_between_processes=False, redelivers_after_visibility_timeout=True,
        batch_publish=True, ordered=True,
    )

    def __init__(self) -> None:
        self.broker = InMemoryBroker()

    def publisher(self) -> Publisher:
        return self.broker

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        return self.broker.subscriber(topic, group, visibility_timeout=visibility_timeout)

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        return [(d.message_id, reason) for d, reason in self.broker.dead_letters(topic, group)]

    def publish_from_another_process(self, topic: str, ids: Sequence[str]) -> None:
        raise NotImplementedError("the in-memory broker lives in one process")

    def close(self) -> None:
        pass


class AsyncMemoryUnderTest(MemoryUnderTest):
    """The broker's async publisher and subscribers (``broker`` may be shared with a
    sync twin)."""

    features = MemoryUnderTest.features

    def __init__(self, broker: InMemoryBroker | None = None) -> None:
        self.broker = broker or InMemoryBroker()
        self.loop = LoopThread()

    def publisher(self) -> Publisher:
        return SyncPublisher(self.broker.async_publisher(), self.loop)

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        return SyncSubscriber(
            self.broker.async_subscriber(topic, group, visibility_timeout=visibility_timeout),
            self.loop,
        )

    def close(self) -> None:
        self.loop.close()


class SqlUnderTest:
    features = Features(
        shared_between_processes=True, redelivers_after_visibility_timeout=True,
        batch_publish=True, ordered=True,
    )

    def __init__(self, engine: Engine, url: str) -> None:
        self.transport = SqlTransport(engine, poll_interval=0.01)
        self.url = url

    def publisher(self) -> Publisher:
        return self.transport.publisher()

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        return self.transport.subscriber(topic, group, visibility_timeout=visibility_timeout)

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        return [(d.message_id, d.reason) for d in self.transport.dead_letters(group)
                if d.topic == topic]

    def publish_from_another_process(self, topic: str, ids: Sequence[str]) -> None:
        code = textwrap.dedent("""
            import sys
            import outbox
            url, topic, *ids = sys.argv[1:]
            engine = outbox.create_engine(url)
            publisher = outbox.SqlTransport(engine).publisher()
            for i in ids:
                publisher.publish(outbox.Message(topic=topic, id=i, payload=i.encode()))
            engine.dispose()
        """)
        subprocess.run([sys.executable, "-c", code, self.url, topic, *ids],
                       check=True, timeout=60, capture_output=True)

    def close(self) -> None:
        pass


class AsyncSqlUnderTest:
    """AsyncSqlTransport on a pooled async engine that lives on the test's own loop."""

    features = SqlUnderTest.features

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = LoopThread()
        self.engine = create_async_engine(url)
        self.transport = AsyncSqlTransport(self.engine, poll_interval=0.01)

    def publisher(self) -> Publisher:
        return SyncPublisher(self.transport.publisher(), self.loop)

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        return SyncSubscriber(
            self.transport.subscriber(topic, group, visibility_timeout=visibility_timeout),
            self.loop,
        )

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        return [(d.message_id, d.reason) for d in self.loop.run(self.transport.dead_letters(group))
                if d.topic == topic]

    def publish_from_another_process(self, topic: str, ids: Sequence[str]) -> None:
        code = textwrap.dedent("""
            import asyncio, sys
            import outbox
            from outbox.aio import create_async_engine
            from outbox.aio.sql_transport import AsyncSqlTransport
            url, topic, *ids = sys.argv[1:]

            async def main():
                engine = create_async_engine(url)
                publisher = AsyncSqlTransport(engine).publisher()
                for i in ids:
                    await publisher.publish(outbox.Message(topic=topic, id=i, payload=i.encode()))
                await engine.dispose()

            asyncio.run(main())
        """)
        subprocess.run([sys.executable, "-c", code, self.url, topic, *ids],
                       check=True, timeout=60, capture_output=True)

    def close(self) -> None:
        try:
            self.loop.run(self.engine.dispose())
        finally:
            self.loop.close()


def message(topic: str = "contract", **fields: object) -> Message:
    values: dict[str, object] = {"payload": b"{}"}
    values.update(fields)
    return Message(topic=topic, **values)  # type: ignore[arg-type]
