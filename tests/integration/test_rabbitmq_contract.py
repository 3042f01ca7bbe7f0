"""The shipped transport contract on RabbitMQ, sync and asyncio."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from outbox.testing.contract import (
    Features,
    TransportContract,
)
from outbox_rabbitmq import RabbitMQBroker

from .broker_support import AsyncForms, SyncForms

pytestmark = pytest.mark.rabbitmq

FEATURES = Features(
    shared_between_processes=True,
    # No visibility timeout in RabbitMQ: an unacknowledged delivery comes back when the
    # channel that received it closes (close, crash, lost connection), not after a time.
    redelivers_after_visibility_timeout=False,
    # Encoded whole before anything is sent; a batch RabbitMQ fails part-way raises,
    # and the relay's resend makes duplicates the consumer drops.
    batch_publish=True, ordered=True, ordered_per_key=True,
    redelivery=True, dead_letter=True, counts_deliveries=True,
    # A group's queue holds only what was published after it was declared.
    late_groups_see_earlier_messages=False,
    exclusive_within_group=True,
)


class RabbitMQUnderTest(SyncForms):
    """A broker whose exchanges and queues are this test's alone (a unique prefix),
    all deleted at the end."""

    features = FEATURES

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"outbox-test-{uuid.uuid4().hex[:10]}"
        self.broker = RabbitMQBroker(url, prefix=self.prefix)

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        return [(d.message_id, d.reason) for d in self.broker.dead_letters(topic, group)]

    def close(self) -> None:
        self.broker.close()
        self.broker.delete_declared()
        self.broker.close()


class AsyncRabbitMQUnderTest(AsyncForms, RabbitMQUnderTest):
    """The asyncio publisher and subscribers, driven from a private loop."""


class TestRabbitMQ(TransportContract):
    @pytest.fixture(params=["sync", "async"])
    def contract_transport(self, request: pytest.FixtureRequest, rabbitmq_url: str
                           ) -> Iterator[RabbitMQUnderTest]:
        under = RabbitMQUnderTest(rabbitmq_url) if request.param == "sync" else \
            AsyncRabbitMQUnderTest(rabbitmq_url)
        yield under
        under.close()
