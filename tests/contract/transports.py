"""The transports under contract, each declaring what it guarantees in a Features value."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine

from outbox import Message, SqlTransport
from outbox.testing import InMemoryBroker
from outbox.typing import Publisher, Subscriber


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


def message(topic: str = "contract", **fields: object) -> Message:
    values: dict[str, object] = {"payload": b"{}"}
    values.update(fields)
    return Message(topic=topic, **values)  # type: ignore[arg-type]
