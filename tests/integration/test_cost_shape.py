"""The cost shape the benchmarks will tune: statements per operation, counted.

- the write path adds one INSERT to the business transaction and nothing else;
- the relay claims, publishes and marks a batch in a fixed number of statements,
  whatever the batch size;
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
from sqlalchemy.orm import Session

from outbox import IdempotentConsumer, Message, Outbox, Relay, RelayConfig
from outbox.testing import InMemoryBroker

from .helpers import RecordingPublisher, add_messages


@contextmanager
def counting(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.split()[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_the_write_path_adds_one_insert(
    engine: Engine, tables: SimpleNamespace, backend: str
) -> None:
    app = Outbox(engine)

    @app.transactional_message(topic="t")
    def debit(session: Session, amount: int) -> None:
        session.execute(tables.ledger.insert().values(account="a", amount=amount))

    debit(1)  # connection set-up statements stay out of the count
    with counting(engine) as statements:
        debit(2)
    lock = ["UPDATE"] if backend == "sqlite" else []
    assert statements == [*lock, "INSERT", "INSERT"]  # the business row, the outbox row


def test_a_relay_batch_costs_the_same_statements_for_10_or_100_rows(engine: Engine) -> None:
    per_batch = []
    for size in (10, 100):
        add_messages(engine, [Message(topic="t", payload=b"{}", key=f"k{i % 3}")
                              for i in range(size)])
        relay = Relay(engine, RecordingPublisher(), RelayConfig(batch_size=size))
        with counting(engine) as statements:
            assert relay.run_once().published == size
        per_batch.append(statements)
    assert per_batch[0] == per_batch[1]
    assert len(per_batch[0]) <= 4  # (lock,) claim, same-key check, mark


def test_the_consumer_deduplicates_with_one_insert(
    engine: Engine, tables: SimpleNamespace
) -> None:
    broker = InMemoryBroker()

    def handler(session: Session, message: Any) -> None:
        session.execute(tables.applied.insert().values(message_id=message.id, body="{}"))

    consumer = IdempotentConsumer(engine, broker.subscriber("t", "g"), "g", handler)
    broker.publish(Message(topic="t", payload=b"{}", id="warm-up"))
    consumer.run_once(wait_seconds=1)
    broker.publish(Message(topic="t", payload=b"{}", id="m-1"))
    with counting(engine) as statements:
        assert consumer.run_once(wait_seconds=1).processed == 1
    assert statements == ["INSERT", "INSERT"]  # the inbox row, the handler's row
