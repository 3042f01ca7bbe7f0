"""What the tests of the brokers reached by URL share: the contract's asyncio forms,
a publisher in another process, and the idempotent consumer's three transfers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from outbox import JsonCodec, Message
from outbox.testing.contract import LoopThread, SyncPublisher, SyncSubscriber
from outbox.typing import Publisher, Subscriber

_OTHER_PROCESS = textwrap.dedent("""
    import sys
    import outbox
    from outbox.brokers import open_broker
    url, prefix, topic, *ids = sys.argv[1:]
    broker = open_broker(url, prefix=prefix)
    publisher = broker.publisher()
    for i in ids:
        publisher.publish(outbox.Message(topic=topic, id=i, payload=i.encode()))
    publisher.close()
    broker.close()
""")


def publish_from_another_process(url: str, prefix: str, topic: str, ids: Sequence[str]
                                 ) -> None:
    """Publish ``ids`` (payload: the id) from a process of their own, by URL."""
    subprocess.run([sys.executable, "-c", _OTHER_PROCESS, url, prefix, topic, *ids],
                   check=True, timeout=60, capture_output=True)


class SyncForms:
    """The sync publisher and subscribers of a broker's under-test class (its
    ``broker``, ``url`` and ``prefix``)."""

    broker: Any
    url: str
    prefix: str

    def publisher(self) -> Publisher:
        return self.broker.publisher()  # type: ignore[no-any-return]

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        return self.broker.subscriber(  # type: ignore[no-any-return]
            topic, group, visibility_timeout=visibility_timeout)

    def publish_from_another_process(self, topic: str, ids: Sequence[str]) -> None:
        publish_from_another_process(self.url, self.prefix, topic, ids)


class AsyncForms:
    """Mixed in before a broker's under-test class: the asyncio publisher and
    subscribers of its ``broker``, driven from a private loop; ``close`` closes the
    asyncio clients (``aclose``, where the broker has it) before the class's own."""

    broker: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop = LoopThread()

    def publisher(self) -> Publisher:
        return SyncPublisher(self.broker.async_publisher(), self.loop)

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber:
        return SyncSubscriber(self.broker.async_subscriber(
            topic, group, visibility_timeout=visibility_timeout), self.loop)

    def close(self) -> None:
        try:
            aclose = getattr(self.broker, "aclose", None)
            if aclose is not None:
                self.loop.run(aclose())
            super().close()  # type: ignore[misc]
        finally:
            self.loop.close()


class Flaky:
    """A handler that fails each message's first ``failures[id]`` calls."""

    def __init__(self, failures: dict[str, float]) -> None:
        self.failures = failures
        self.calls: list[str] = []

    def note(self, message: Any) -> None:
        self.calls.append(message.id)
        if self.calls.count(message.id) <= self.failures.get(message.id, 0):
            raise RuntimeError(f"cannot apply {message.id}")


def publish_three(broker: Any) -> None:
    """"flaky", "poison" and "fine" of one key in one batch, then "fine" again."""
    broker.publisher().publish_batch([
        Message(id=i, topic="transfers", key="acct-1", payload=JsonCodec().encode({"id": i}))
        for i in ("flaky", "poison", "fine")])
    broker.publisher().publish(  # a duplicate: applied once
        Message(id="fine", topic="transfers", key="acct-1", payload=JsonCodec().encode({})))

