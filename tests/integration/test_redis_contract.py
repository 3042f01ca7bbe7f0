"""The shipped transport contract on Redis Streams, sync and asyncio."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator, Sequence

import pytest

from outbox.testing.contract import (
    Features,
    LoopThread,
    SyncPublisher,
    SyncSubscriber,
    TransportContract,
)
from outbox.typing import Publisher, Subscriber
from outbox_redis import RedisBroker

pytestmark = pytest.mark.redis

FEATURES = Features(
    shared_between_processes=True, redelivers_after_visibility_timeout=True,
    batch_publish=True, ordered=True, ordered_per_key=True,
    redelivery=False,  # no per-message delay in Redis Streams: the consumer holds
    dead_letter=True, counts_deliveries=True, late_groups_see_earlier_messages=True,
    exclusive_within_group=True,
)


class RedisUnderTest:
    """A broker whose streams are this test's alone (a unique key prefix)."""

    features = FEATURES

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"outbox-test-{uuid.uuid4().hex[:10]}:"
        self.broker = RedisBroker(url, prefix=self.prefix)

    def publisher(self) -> Publisher:
        return self.broker.publisher()

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        return self.broker.subscriber(topic, group, visibility_timeout=visibility_timeout)

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        return [((f.get(b"id") or b"").decode() or None, f[b"dead-reason"].decode())
                for f in self.broker.dead_letters(topic, group)]

    def publish_from_another_process(self, topic: str, ids: Sequence[str]) -> None:
        code = textwrap.dedent("""
            import sys
            import outbox
            from outbox.brokers import open_broker
            url, prefix, topic, *ids = sys.argv[1:]
            broker = open_broker(url, prefix=prefix)
            publisher = broker.publisher()
            for i in ids:
                publisher.publish(outbox.Message(topic=topic, id=i, payload=i.encode()))
            broker.close()
        """)
        subprocess.run([sys.executable, "-c", code, self.url, self.prefix, topic, *ids],
                       check=True, timeout=60, capture_output=True)

    def close(self) -> None:
        keys = list(self.broker.client.scan_iter(match=f"{self.prefix}*"))
        if keys:
            self.broker.client.delete(*keys)
        self.broker.close()


class AsyncRedisUnderTest(RedisUnderTest):
    """The asyncio publisher and subscribers, driven from a private loop."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.loop = LoopThread()

    def publisher(self) -> Publisher:
        return SyncPublisher(self.broker.async_publisher(), self.loop)

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        return SyncSubscriber(self.broker.async_subscriber(
            topic, group, visibility_timeout=visibility_timeout), self.loop)

    def close(self) -> None:
        try:
            self.loop.run(self.broker.aclose())
            self.broker = RedisBroker(self.url, prefix=self.prefix)
            super().close()
        finally:
            self.loop.close()


class TestRedisStreams(TransportContract):
    @pytest.fixture(params=["sync", "async"])
    def contract_transport(self, request: pytest.FixtureRequest, redis_url: str
                           ) -> Iterator[RedisUnderTest]:
        under = RedisUnderTest(redis_url) if request.param == "sync" else \
            AsyncRedisUnderTest(redis_url)
        yield under
        under.close()
