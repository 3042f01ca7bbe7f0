"""The shipped transport contract on Apache Kafka, sync and asyncio."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence

import pytest

from outbox.testing.contract import (
    Features,
    TransportContract,
)
from outbox.typing import Publisher, Subscriber
from outbox_kafka import KafkaBroker

from .broker_support import AsyncForms, publish_from_another_process

pytestmark = pytest.mark.kafka

FEATURES = Features(
    shared_between_processes=True,
    redelivers_after_visibility_timeout=False,  # only after a rebalance or a restart
    batch_publish=True,
    ordered=False,  # a topic's partitions are read side by side; a key's are in order
    ordered_per_key=True,
    redelivery=False,  # no per-message delay in Kafka: the consumer holds the record
    dead_letter=True,
    counts_deliveries=False,  # no delivery count: the consumer counts in its database
    late_groups_see_earlier_messages=True,
    exclusive_within_group=True,
    timescale=2.0,  # a new group's first join takes a few seconds
)


class KafkaUnderTest:
    """A broker whose topics are this test's alone (a unique topic prefix)."""

    features = FEATURES

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"outbox-test-{uuid.uuid4().hex[:10]}."
        self.broker = KafkaBroker(url, prefix=self.prefix)
        self.subscribers: list[Subscriber] = []

    def publisher(self) -> Publisher:
        return self.broker.publisher()

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        sub = self.broker.subscriber(topic, group, visibility_timeout=visibility_timeout)
        self.subscribers.append(sub)
        return sub

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        return [(d.message_id, d.headers.get("outbox-dead-reason"))
                for d in self.broker.dead_letters(topic, group)]

    def publish_from_another_process(self, topic: str, ids: Sequence[str]) -> None:
        publish_from_another_process(self.url, self.prefix, topic, ids)

    def close(self) -> None:
        for sub in self.subscribers:
            sub.close()
        admin = self.broker.options.admin()
        names = [n for n in admin.list_topics(timeout=10).topics if n.startswith(self.prefix)]
        if names:
            for future in admin.delete_topics(names, operation_timeout=10).values():
                future.result(timeout=30)
        self.broker.close()


class AsyncKafkaUnderTest(AsyncForms, KafkaUnderTest):
    """The asyncio publisher and subscribers, driven from a private loop."""

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        sub = super().subscriber(topic, group, visibility_timeout=visibility_timeout)
        self.subscribers.append(sub)
        return sub


class TestKafka(TransportContract):
    @pytest.fixture(params=["sync", "async"])
    def contract_transport(self, request: pytest.FixtureRequest, kafka_url: str
                           ) -> Iterator[KafkaUnderTest]:
        under = KafkaUnderTest(kafka_url) if request.param == "sync" else \
            AsyncKafkaUnderTest(kafka_url)
        yield under
        under.close()
