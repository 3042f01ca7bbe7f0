"""The project's own transports under the shipped contract (outbox.testing.contract),
each declaring what it guarantees in a Features value.

Every transport has a sync and an asyncio form; an async form is driven through the
contract's SyncPublisher and SyncSubscriber on a private event loop that the test owns.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Sequence

from sqlalchemy import Engine

from outbox import SqlTransport
from outbox.aio import create_async_engine
from outbox.aio.sql_transport import AsyncSqlTransport
from outbox.testing import InMemoryBroker
from outbox.testing.contract import (
    Features,
    LoopThread,
    SyncPublisher,
    SyncSubscriber,
    TransportUnderTest,
    message,
)
from outbox.typing import Publisher, Subscriber

__all__ = ["AsyncMemoryUnderTest", "AsyncSqlUnderTest", "MemoryUnderTest", "SqlUnderTest",
           "TransportUnderTest", "message"]


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
