"""Brokers by URL: the scheme picks the adapter, and a password never shows."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from outbox.brokers import Broker, masked, open_broker, scheme_of
from outbox.errors import ConfigurationError
from outbox.testing import InMemoryBroker


@pytest.mark.parametrize(("url", "shown"), [
    ("amqp://outbox:s3cret@127.0.0.1:5672/%2F", "amqp://outbox:***@127.0.0.1:5672/%2F"),
    ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
    ("kafka://127.0.0.1:9092", "kafka://127.0.0.1:9092"),
    ("nats://user:pa%40ss@host", "nats://user:***@host"),
])
def test_masked_hides_only_the_password(url: str, shown: str) -> None:
    assert masked(url) == shown


def test_scheme_is_required_and_read_case_blind() -> None:
    assert scheme_of("KAFKA://h:1") == "kafka"
    with pytest.raises(ConfigurationError, match="has no scheme"):
        scheme_of("h:1")


class FakeBroker:
    """Just enough of a Broker to pass the protocol check."""

    def __init__(self, url: str, **options: Any) -> None:
        self.url, self.options = url, options
        self.memory = InMemoryBroker()

    def publisher(self) -> Any:
        return self.memory

    def subscriber(self, topic: str, group: str) -> Any:
        return self.memory.subscriber(topic, group)

    def async_publisher(self) -> Any:
        return self.memory.async_publisher()

    def async_subscriber(self, topic: str, group: str) -> Any:
        return self.memory.async_subscriber(topic, group)

    def close(self) -> None:
        pass


def test_a_builtin_scheme_loads_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("outbox_redis")
    module.connect = FakeBroker  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "outbox_redis", module)
    broker = open_broker("redis://127.0.0.1:6379/0", client_id="x")
    assert isinstance(broker, FakeBroker) and isinstance(broker, Broker)
    assert broker.options == {"client_id": "x"}


def test_an_adapter_returning_something_else_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("outbox_redis")
    module.connect = lambda url: object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "outbox_redis", module)
    with pytest.raises(ConfigurationError, match="returned object, which lacks"):
        open_broker("rediss://127.0.0.1:6379")


def test_a_missing_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "outbox_redis", None)  # import fails
    with pytest.raises(ConfigurationError, match=r"pip install 'outbox\[redis\]'") as info:
        open_broker("redis://:s3cret@127.0.0.1/0")
    assert "s3cret" not in str(info.value)
