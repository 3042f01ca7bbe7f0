"""The cost shape ``make bench`` tunes: statements per operation, counted, in both
concurrency models.

- the write path adds one INSERT to the business transaction and nothing else (no
  connection ping, no read of its own), and it is one statement text for every
  message, so the driver can prepare it once;
- the relay claims, publishes and marks a batch in a fixed number of statements,
  whatever the batch size, with the same statement texts;
- the consumer de-duplicates with one INSERT in the handler's transaction.

On SQLite the write path also takes the write lock with one no-op UPDATE first;
SQLite runs in the process, so that is a call, not a network round trip.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Engine, event

from outbox import Message, RelayConfig
from outbox.db import dialect_name
from outbox.testing import InMemoryBroker

from .helpers import RecordingPublisher, add_messages
from .models import Model


@contextmanager
def counting(model: Model) -> Iterator[list[str]]:
    """Every statement the model's engine sends, as its full text."""
    engine: Engine = model.async_engine.sync_engine if model.is_async else model.engine
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def verbs(statements: list[str]) -> list[str]:
    return [s.split()[0].upper() for s in statements]


def test_the_write_path_adds_one_insert_of_one_text(
    model: Model, tables: SimpleNamespace, backend: str
) -> None:
    app = model.outbox()

    async def debit(ops: Any, amount: int, key: str) -> None:
        await ops.execute(tables.ledger.insert().values(account="a", amount=amount))

    fn = model.define(app, debit, topic="t", key="key")

    async def scenario() -> list[list[str]]:
        await model.call(fn, 1, "k0")  # connection set-up statements stay out of the count
        seen = []
        for i in range(2, 4):
            with counting(model) as statements:
                await model.call(fn, i, f"k{i}")
            seen.append(statements)
        return seen

    first, second = model.run(scenario)
    lock = ["UPDATE"] if backend == "sqlite" else []
    assert verbs(first) == [*lock, "INSERT", "INSERT"]  # the business row, the outbox row
    assert first == second, "the outbox INSERT must be one statement text for every message"


def test_a_relay_batch_costs_the_same_statements_for_10_or_100_rows(model: Model) -> None:
    per_batch = []
    for size in (10, 100):
        add_messages(model.engine, [Message(topic="t", payload=b"{}", key=f"k{i % 3}")
                                    for i in range(size)])
        relay = model.relay(model.publisher(RecordingPublisher()),
                            config=RelayConfig(batch_size=size))

        async def scenario(relay: Any = relay, size: int = size) -> list[str]:
            with counting(model) as statements:
                assert (await model.call(relay.run_once)).published == size
            return statements

        per_batch.append(model.run(scenario))
    assert verbs(per_batch[0]) == verbs(per_batch[1])
    # PostgreSQL: the claim with its same-key check in one statement, the mark. MariaDB:
    # the claim, the same-key check, the mark. SQLite: the write lock first.
    expected = {"postgresql": 2, "mysql": 3, "sqlite": 4}[dialect_name(model.engine)]
    assert len(per_batch[0]) == expected, per_batch[0]
    # One text per statement whatever the batch size, except the lists of an
    # expanding IN on databases without arrays.
    if model.engine.dialect.name == "postgresql":
        assert per_batch[0] == per_batch[1]


def test_the_consumer_deduplicates_with_one_insert(
    model: Model, tables: SimpleNamespace
) -> None:
    broker = InMemoryBroker()

    async def handler(ops: Any, message: Any) -> None:
        await ops.execute(tables.applied.insert().values(message_id=message.id, body="{}"))

    consumer = model.consumer(model.subscriber(broker, "t", "g"), "g", handler)

    async def scenario() -> list[str]:
        broker.publish(Message(topic="t", payload=b"{}", id="warm-up"))
        await model.call(consumer.run_once, wait_seconds=1)
        broker.publish(Message(topic="t", payload=b"{}", id="m-1"))
        with counting(model) as statements:
            assert (await model.call(consumer.run_once, wait_seconds=1)).processed == 1
        return statements

    assert verbs(model.run(scenario)) == ["INSERT", "INSERT"]  # the inbox row, the handler's
