"""The shipped transport contract on Redis Streams, sync and asyncio."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from outbox.testing.contract import (
    Features,
    TransportContract,
)
from outbox_redis import RedisBroker

from .broker_support import AsyncForms, SyncForms

pytestmark = pytest.mark.redis

FEATURES = Features(
    shared_between_processes=True, redelivers_after_visibility_timeout=True,
    batch_publish=True, ordered=True, ordered_per_key=True,
    redelivery=False,  # no per-message delay in Redis Streams: the consumer holds
    dead_letter=True, counts_deliveries=True, late_groups_see_earlier_messages=True,
    exclusive_within_group=True,
)


class RedisUnderTest(SyncForms):
    """A broker whose streams are this test's alone (a unique key prefix)."""

    features = FEATURES

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"outbox-test-{uuid.uuid4().hex[:10]}:"
        self.broker = RedisBroker(url, prefix=self.prefix)

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        return [((f.get(b"id") or b"").decode() or None, f[b"dead-reason"].decode())
                for f in self.broker.dead_letters(topic, group)]

    def close(self) -> None:
        self.broker.close()
        cleaner = RedisBroker(self.url, prefix=self.prefix)  # also after the asyncio aclose
        keys = list(cleaner.client.scan_iter(match=f"{self.prefix}*"))
        if keys:
            cleaner.client.delete(*keys)
        cleaner.close()


class AsyncRedisUnderTest(AsyncForms, RedisUnderTest):
    """The asyncio publisher and subscribers, driven from a private loop."""


class TestRedisStreams(TransportContract):
    @pytest.fixture(params=["sync", "async"])
    def contract_transport(self, request: pytest.FixtureRequest, redis_url: str
                           ) -> Iterator[RedisUnderTest]:
        under = RedisUnderTest(redis_url) if request.param == "sync" else \
            AsyncRedisUnderTest(redis_url)
        yield under
        under.close()
