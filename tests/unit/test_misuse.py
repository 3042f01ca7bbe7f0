"""Misuse refused when building, before anything runs: a function the decorator could not
run to its end, a part of one concurrency model given a part of the other."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox import (
    AsyncIdempotentConsumer,
    AsyncOutbox,
    AsyncRelay,
    ConfigurationError,
    IdempotentConsumer,
    MisuseError,
    Outbox,
    Relay,
)
from outbox.testing import InMemoryBroker

SYNC = sa_create_engine("sqlite://")
ASYNC = create_async_engine("sqlite+aiosqlite://")


async def coroutine_fn(session: Any, no: str) -> None: ...


def generator_fn(session: Any, no: str) -> Iterator[None]:
    yield None


async def async_generator_fn(session: Any, no: str) -> AsyncIterator[None]:
    yield None


def plain_fn(session: Any, no: str) -> None: ...


@pytest.mark.parametrize(("fn", "match"), [
    (coroutine_fn, "async def; decorate it with AsyncOutbox"),
    (generator_fn, "cannot decorate the generator"),
    (async_generator_fn, "cannot decorate the generator"),
])
def test_the_sync_decorator_refuses_what_it_could_not_run(fn: Any, match: str) -> None:
    with pytest.raises(MisuseError, match=match):
        Outbox(SYNC).transactional_message(topic="t")(fn)


@pytest.mark.parametrize(("fn", "match"), [
    (plain_fn, "not an async def; decorate it with Outbox"),
    (generator_fn, "cannot decorate the generator"),
    (async_generator_fn, "cannot decorate the generator"),
])
def test_the_asyncio_decorator_refuses_what_it_could_not_await(fn: Any, match: str) -> None:
    with pytest.raises(MisuseError, match=match):
        AsyncOutbox(ASYNC).transactional_message(topic="t")(fn)


def test_a_refused_decoration_registers_nothing() -> None:
    """Nothing was decorated, so no topic reaches a delivery adapter's registry."""
    registered: list[str] = []

    class Registry:
        def prepare(self, outbox: Any, message: Any) -> Any:
            raise AssertionError("never called")

        def register(self, topic: str, outbox: Any) -> None:
            registered.append(topic)

    with pytest.raises(MisuseError):
        Outbox(SYNC, delivery=Registry()).transactional_message(topic="t")(coroutine_fn)
    assert registered == []


def test_each_outbox_takes_its_own_kind_of_engine() -> None:
    with pytest.raises(ConfigurationError, match="AsyncEngine use AsyncOutbox"):
        Outbox(ASYNC)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="needs a SQLAlchemy AsyncEngine"):
        AsyncOutbox(SYNC)  # type: ignore[arg-type]


def test_an_adapter_without_an_asyncio_form_is_refused_by_the_async_outbox() -> None:
    class SyncOnly:
        def prepare(self, outbox: Any, message: Any) -> Any: ...

    with pytest.raises(ConfigurationError, match="no asyncio form"):
        AsyncOutbox(ASYNC, delivery=SyncOnly())


def test_relays_take_their_own_kind_of_engine_and_publisher() -> None:
    broker = InMemoryBroker()
    with pytest.raises(ConfigurationError, match="use AsyncRelay"):
        Relay(ASYNC, broker)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="is an asyncio publisher"):
        Relay(SYNC, broker.async_publisher())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="use Relay"):
        AsyncRelay(SYNC, broker.async_publisher())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not an asyncio publisher"):
        AsyncRelay(ASYNC, broker)  # type: ignore[arg-type]


def test_consumers_take_their_own_kind_of_handler_and_subscriber() -> None:
    broker = InMemoryBroker()

    async def async_handler(session: AsyncSession, message: Any) -> None: ...

    def sync_handler(session: Any, message: Any) -> None: ...

    with pytest.raises(MisuseError, match="handler is an async def"):
        IdempotentConsumer(SYNC, broker.subscriber("t", "g"), "g", async_handler)
    with pytest.raises(MisuseError, match="needs an async def handler"):
        AsyncIdempotentConsumer(ASYNC, broker.async_subscriber("t", "g"), "g",
                                sync_handler)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not an asyncio subscriber"):
        AsyncIdempotentConsumer(ASYNC, broker.subscriber("t", "g"), "g",  # type: ignore[arg-type]
                                async_handler)
    with pytest.raises(ConfigurationError, match="AsyncEngine use AsyncIdempotentConsumer"):
        IdempotentConsumer(ASYNC, broker.subscriber("t", "g"), "g",  # type: ignore[arg-type]
                           sync_handler)


def test_send_refuses_a_session_of_the_other_kind() -> None:
    from sqlalchemy.orm import Session

    with pytest.raises(MisuseError, match="for an AsyncSession use"):
        Outbox(SYNC).send(AsyncSession(ASYNC), topic="t", payload={})  # type: ignore[arg-type]
    import asyncio

    with pytest.raises(MisuseError, match="for a sync Session use"):
        asyncio.run(AsyncOutbox(ASYNC).send(Session(SYNC), topic="t",  # type: ignore[arg-type]
                                            payload={}))
