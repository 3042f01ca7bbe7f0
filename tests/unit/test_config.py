from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy.orm import sessionmaker

from outbox import ConfigurationError, ConsumerConfig, IdempotentConsumer, OutboxError, RelayConfig
from outbox.testing import InMemoryBroker


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, "batch_size must be at least 1"),
        ("batch_size", -3, "batch_size must be at least 1"),
        ("max_attempts", 0, "max_attempts must be at least 1"),
        ("poll_interval", 0, "poll_interval must be positive"),
        ("poll_interval", -0.5, "poll_interval must be positive"),
        ("purge_batch_size", 0, "purge_batch_size must be at least 1"),
    ],
)
def test_relay_config_refuses_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RelayConfig(**{field: value})  # type: ignore[arg-type]


def test_relay_config_defaults_are_valid_and_frozen() -> None:
    cfg = RelayConfig()
    assert (cfg.batch_size, cfg.max_attempts, cfg.delete_sent) == (100, 10, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_attempts", 0, "max_attempts must be at least 1"),
        ("batch_size", 0, "batch_size must be at least 1"),
    ],
)
def test_consumer_config_refuses_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ConsumerConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("group", ["", "g" * 201])
def test_consumer_group_must_be_1_to_200_characters(group: str) -> None:
    broker = InMemoryBroker()
    with pytest.raises(ConfigurationError, match="consumer group"):
        IdempotentConsumer(sessionmaker(), broker.subscriber("t", "g"), group, lambda s, m: None)


def test_configuration_error_is_an_outbox_error() -> None:
    assert issubclass(ConfigurationError, OutboxError)
