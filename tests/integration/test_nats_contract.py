"""The shipped transport contract on NATS JetStream, sync and asyncio."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import nats
import pytest

from outbox.testing.contract import (
    Features,
    TransportContract,
)
from outbox_nats import NatsBroker
from outbox_nats.mapping import sanitized

from .broker_support import AsyncForms, SyncForms

pytestmark = pytest.mark.nats

FEATURES = Features(
    shared_between_processes=True, redelivers_after_visibility_timeout=True,
    # The batch is checked before anything is sent; a server failing mid-batch may
    # keep a prefix, which the relay's retry completes (Nats-Msg-Id de-duplication).
    batch_publish=True,
    ordered=True, ordered_per_key=True,  # one stream, delivered in stream order
    redelivery=True,  # NAK with a delay
    dead_letter=True, counts_deliveries=True, late_groups_see_earlier_messages=True,
    exclusive_within_group=True,
)


def delete_streams(url: str, prefix: str) -> None:
    """Delete every stream of a test's ``prefix`` (topics and their dead letters)."""
    async def main() -> None:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            for info in await js.streams_info():
                if info.config.name and info.config.name.startswith(sanitized(prefix)):
                    await js.delete_stream(info.config.name)
        finally:
            await nc.close()

    asyncio.run(main())


def unique_prefix() -> str:
    return f"outbox-test-{uuid.uuid4().hex[:10]}."


class NatsUnderTest(SyncForms):
    """A broker whose streams are this test's alone (a unique subject prefix)."""

    features = FEATURES

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = unique_prefix()
        self.broker = NatsBroker(url, prefix=self.prefix)

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        return [(d.message_id, d.reason) for d in self.broker.dead_letters(topic, group)]

    def close(self) -> None:
        try:
            self.broker.close()
        finally:
            delete_streams(self.url, self.prefix)


class AsyncNatsUnderTest(AsyncForms, NatsUnderTest):
    """The asyncio publisher and subscribers, driven from a private loop."""


class TestNatsJetStream(TransportContract):
    @pytest.fixture(params=["sync", "async"])
    def contract_transport(self, request: pytest.FixtureRequest, nats_url: str
                           ) -> Iterator[NatsUnderTest]:
        under = NatsUnderTest(nats_url) if request.param == "sync" else \
            AsyncNatsUnderTest(nats_url)
        yield under
        under.close()
