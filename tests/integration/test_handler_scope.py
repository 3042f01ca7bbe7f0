"""A consumer's handler runs in a scope: its sends and nested decorated calls commit
with the inbox row, its misuse of the session is refused, in both models."""

from __future__ import annotations

import decimal
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text

from outbox import ConfigurationError, ConsumerConfig, Message, Outcome
from outbox.schema import inbox, outbox_messages
from outbox.testing import InMemoryBroker

from .models import Model, SyncOps

TOPIC, GROUP = "orders", "stock"
NO_BACKOFF = ConsumerConfig(max_attempts=3, backoff=lambda _state: 0.0)


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


def replies(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(outbox_messages.c.message_id)
                                 .order_by(outbox_messages.c.seq)))


def order(broker: InMemoryBroker, order_no: str, qty: int = 1) -> None:
    broker.publish(Message(topic=TOPIC, id=order_no, payload=(
        f'{{"order_no":"{order_no}","qty":{qty}}}').encode()))


def consume_all(model: Model, consumer: Any, rounds: int = 10) -> list[Outcome]:
    async def scenario() -> list[Outcome]:
        outcomes: list[Outcome] = []
        for _ in range(rounds):
            deliveries = await model.call(consumer.subscriber.fetch, 10, 0.0)
            if not deliveries:
                break
            for d in deliveries:
                outcomes.append(await model.call(consumer.handle, d))
        return outcomes

    return list(model.run(scenario))


def reserve_body(tables: SimpleNamespace, ob: Any, *, fail_after_send: bool = False) -> Any:
    """A saga step: reserve stock, or reply "rejected" for a too-large order, in one
    transaction with the inbox row."""

    async def reserve(ops: SyncOps, message: Any) -> None:
        no, qty = message.body["order_no"], message.body["qty"]
        if qty > 5:
            await ops.send(ob, topic="order-replies", payload={"order_no": no,
                           "status": "rejected"}, message_id=f"{no}-rejected", key=no)
        else:
            await ops.execute(tables.applied.insert().values(message_id=no, body="reserved"))
        if fail_after_send:
            raise RuntimeError("the handler fails after sending")

    return reserve


def test_a_reply_sent_in_the_handler_commits_with_the_inbox_row(
    model: Model, tables: SimpleNamespace
) -> None:
    broker = InMemoryBroker()
    ob = model.outbox()
    consumer = model.consumer(model.subscriber(broker, TOPIC, GROUP), GROUP,
                              reserve_body(tables, ob), config=NO_BACKOFF)
    order(broker, "O-1", qty=2)
    order(broker, "O-2", qty=9)
    assert consume_all(model, consumer) == [Outcome.PROCESSED, Outcome.PROCESSED]
    assert replies(model.engine) == ["O-2-rejected"]
    assert count(model.engine, tables.applied) == 1
    assert count(model.engine, inbox) == 2


def test_a_redelivery_sends_nothing_again(model: Model, tables: SimpleNamespace) -> None:
    broker = InMemoryBroker()
    ob = model.outbox()
    consumer = model.consumer(model.subscriber(broker, TOPIC, GROUP), GROUP,
                              reserve_body(tables, ob), config=NO_BACKOFF)
    order(broker, "O-2", qty=9)
    broker.deliver_again("O-2")
    assert consume_all(model, consumer) == [Outcome.PROCESSED, Outcome.DUPLICATE]
    assert replies(model.engine) == ["O-2-rejected"]


def test_a_failing_handler_sends_nothing_and_is_retried(
    model: Model, tables: SimpleNamespace
) -> None:
    broker = InMemoryBroker()
    ob = model.outbox()
    consumer = model.consumer(model.subscriber(broker, TOPIC, GROUP), GROUP,
                              reserve_body(tables, ob, fail_after_send=True), config=NO_BACKOFF)
    order(broker, "O-2", qty=9)
    assert consume_all(model, consumer) == [Outcome.RETRIED, Outcome.RETRIED, Outcome.DEAD]
    assert replies(model.engine) == []
    assert count(model.engine, inbox) == 0
    [(_, reason)] = broker.dead_letters(TOPIC, GROUP)
    assert reason is not None and "the handler fails after sending" in reason


def test_a_decorated_function_called_from_the_handler_joins_its_transaction(
    model: Model, tables: SimpleNamespace
) -> None:
    broker = InMemoryBroker()
    ob = model.outbox()

    async def refund(ops: SyncOps, no: str, amount: decimal.Decimal) -> None:
        await ops.execute(tables.ledger.insert().values(account=no, amount=amount))

    refund_fn = model.define(ob, refund, topic="refunds", message_id=lambda no, amount: f"R-{no}",
                             payload=lambda no, amount: {"no": no, "amount": amount})

    async def handler(ops: SyncOps, message: Any) -> None:
        await ops.call(refund_fn, message.body["order_no"], decimal.Decimal("1.50"))
        if message.attempt == 1:
            raise RuntimeError("first attempt fails after the nested call")

    consumer = model.consumer(model.subscriber(broker, TOPIC, GROUP), GROUP, handler,
                              config=NO_BACKOFF)
    order(broker, "O-3")
    assert consume_all(model, consumer) == [Outcome.RETRIED, Outcome.PROCESSED]
    assert replies(model.engine) == ["R-O-3"]
    assert count(model.engine, tables.ledger) == 1


@pytest.mark.parametrize("misuse", ["commit", "rollback", "close"])
def test_a_handler_that_commits_then_raises_is_retried_not_taken_for_a_duplicate(
    model: Model, tables: SimpleNamespace, misuse: str
) -> None:
    """Before the guard, the inbox row was committed by the handler's own commit, the
    redelivery was taken for a duplicate and the error was lost."""
    broker = InMemoryBroker()

    async def handler(ops: SyncOps, message: Any) -> None:
        await ops.execute(tables.applied.insert().values(message_id=message.id, body="x"))
        await getattr(ops, misuse)()
        raise RuntimeError("after the commit")

    consumer = model.consumer(model.subscriber(broker, TOPIC, GROUP), GROUP, handler,
                              config=NO_BACKOFF)
    order(broker, "O-4")
    assert consume_all(model, consumer) == [Outcome.RETRIED, Outcome.RETRIED, Outcome.DEAD]
    assert count(model.engine, inbox) == 0
    assert count(model.engine, tables.applied) == 0
    [(_, reason)] = broker.dead_letters(TOPIC, GROUP)
    assert reason is not None and f"must not call session.{misuse}()" in reason


def test_a_database_without_the_inbox_table_is_a_configuration_error(model: Model) -> None:
    """Before, it was taken for an outage and messages were dead-lettered with "handler
    failed N times" although the handler never ran."""
    with model.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {inbox.name}"))
    broker = InMemoryBroker()
    ran: list[str] = []

    async def handler(ops: SyncOps, message: Any) -> None:
        ran.append(message.id)

    consumer = model.consumer(model.subscriber(broker, TOPIC, GROUP), GROUP, handler,
                              config=NO_BACKOFF)
    order(broker, "O-5")
    with pytest.raises(ConfigurationError, match=r"outbox_inbox is missing.*outbox migrate"):
        consume_all(model, consumer)
    assert ran == []
    assert broker.dead_letters(TOPIC, GROUP) == []
