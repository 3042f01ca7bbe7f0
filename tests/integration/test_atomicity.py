"""The decorated function's business write and its outbox row commit together or not
at all, in both models."""

from __future__ import annotations

import asyncio
import decimal
import time
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select

import outbox
from outbox import DuplicateMessageError, JsonCodec, RelayConfig
from outbox.schema import PENDING, outbox_messages, transaction_log

from .helpers import RecordingPublisher
from .models import Model, SyncOps


class InsufficientFunds(Exception):
    pass


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


@pytest.fixture
def commits(engine: Engine) -> list[str]:
    """Records every COMMIT and ROLLBACK issued on the engine (and its async twin's
    connections: both reach the same server, so the test engine's events see only the
    sync model; the async model is checked through the rows)."""
    seen: list[str] = []
    event.listen(engine, "commit", lambda conn: seen.append("commit"))
    event.listen(engine, "rollback", lambda conn: seen.append("rollback"))
    return seen


def make_debit(model: Model, ob: Any, tables: SimpleNamespace) -> Any:
    async def debit(ops: SyncOps, transfer_no: int, account: str,
                    amount: decimal.Decimal) -> int:
        await ops.execute(tables.ledger.insert().values(account=account, amount=-amount))
        if amount > 100:
            raise InsufficientFunds(f"{account} cannot pay {amount}")
        return transfer_no

    return model.define(
        ob, debit, topic="transfers", key="account",
        message_id=lambda transfer_no, *_: f"tx-{transfer_no}",
        payload=lambda transfer_no, account, amount: {"no": transfer_no, "amount": amount},
    )


def call(model: Model, fn: Any, *args: Any) -> Any:
    return model.run(lambda: model.call(fn, *args))


def test_failure_leaves_neither_business_row_nor_outbox_row(
    model: Model, tables: SimpleNamespace, commits: list[str]
) -> None:
    debit = make_debit(model, model.outbox(), tables)
    with pytest.raises(InsufficientFunds, match="cannot pay 500") as info:
        call(model, debit, 1, "zhang-san", decimal.Decimal("500.00"))
    assert isinstance(info.value, InsufficientFunds)
    assert count(model.engine, tables.ledger) == 0
    assert count(model.engine, outbox_messages) == 0
    assert "commit" not in commits


def test_success_writes_both_rows_in_one_transaction(
    model: Model, tables: SimpleNamespace, commits: list[str]
) -> None:
    debit = make_debit(model, model.outbox(), tables)
    assert call(model, debit, 42, "zhang-san", decimal.Decimal("10.50")) == 42
    if not model.is_async:
        assert commits == ["commit"]

    with model.engine.connect() as conn:
        [(account, amount)] = conn.execute(
            select(tables.ledger.c.account, tables.ledger.c.amount)).all()
        [row] = conn.execute(select(outbox_messages)).all()
    assert (account, amount) == ("zhang-san", decimal.Decimal("-10.50"))
    assert (row.message_id, row.topic, row.key, row.status, row.attempts, row.sent_at) == (
        "tx-42", "transfers", "zhang-san", PENDING, 0, None
    )
    assert JsonCodec().decode(bytes(row.payload)) == {"no": 42, "amount": "10.50"}
    assert row.created_at is not None and row.next_attempt_at == row.created_at
    # The local outbox needs no transaction-log row: the outbox row is the proof.
    assert count(model.engine, transaction_log) == 0


def test_a_failing_outbox_insert_undoes_the_business_write(
    model: Model, tables: SimpleNamespace
) -> None:
    debit = make_debit(model, model.outbox(), tables)
    call(model, debit, 7, "zhang-san", decimal.Decimal("1"))
    # Same transfer number, same message id: the outbox row's unique key refuses it,
    # and the error says so in the project's own terms.
    with pytest.raises(DuplicateMessageError, match="already used"):
        call(model, debit, 7, "zhang-san", decimal.Decimal("2"))
    with model.engine.connect() as conn:
        amounts = conn.scalars(select(tables.ledger.c.amount)).all()
    assert amounts == [decimal.Decimal("-1")]
    assert count(model.engine, outbox_messages) == 1


def test_rows_of_several_calls_keep_their_arguments(
    model: Model, tables: SimpleNamespace
) -> None:
    debit = make_debit(model, model.outbox(), tables)
    for no, account in [(1, "a"), (2, "b"), (3, "a")]:
        call(model, debit, no, account, decimal.Decimal(no))
    with pytest.raises(InsufficientFunds):
        call(model, debit, 4, "b", decimal.Decimal(1000))
    with model.engine.connect() as conn:
        rows = conn.execute(select(outbox_messages.c.message_id, outbox_messages.c.key)
                            .order_by(outbox_messages.c.seq)).all()
    assert [tuple(r) for r in rows] == [("tx-1", "a"), ("tx-2", "b"), ("tx-3", "a")]


def test_commit_nudges_the_relay_at_once(model: Model, tables: SimpleNamespace) -> None:
    ob = model.outbox()
    debit = make_debit(model, ob, tables)
    publisher = RecordingPublisher()
    # The poll interval is far longer than the test may wait, and PostgreSQL's NOTIFY
    # is off: only the in-process nudge can do it.
    relay = ob.relay(model.publisher(publisher),
                     RelayConfig(poll_interval=60, purge_interval=3600, listen=False))
    batches: list[object] = []
    run_once = relay.run_once

    if model.is_async:
        async def arun_once() -> Any:
            batches.append(await run_once())
            return batches[-1]
        relay.run_once = arun_once
    else:
        relay.run_once = lambda: batches.append(run_once()) or batches[-1]

    async def scenario() -> None:
        relay.start()
        try:
            # Let the relay finish its first (empty) batch and sleep on the wake-up event.
            assert await model.wait_until(lambda: len(batches) == 1, timeout=5)
            await asyncio.sleep(0.2)
            await model.call(debit, 5, "zhang-san", decimal.Decimal("3"))
            assert await model.wait_until(lambda: publisher.ids() == ["tx-5"], timeout=10)
            assert await model.wait_until(lambda: len(batches) == 2, timeout=5)
        finally:
            await model.call(relay.stop)

    model.run(scenario)
    assert outbox_row_status(model.engine, "tx-5") == "sent"


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_commit_elsewhere_wakes_the_relay_through_notify(
    model: Model, db_url: str, tables: SimpleNamespace
) -> None:
    """No nudge crosses engines or processes: on PostgreSQL the insert's NOTIFY wakes
    the relay (the async relay listens through the async driver)."""
    writer_engine = outbox.create_engine(db_url)
    publisher = RecordingPublisher()
    relay = model.relay(model.publisher(publisher),
                        config=RelayConfig(poll_interval=60, purge_interval=3600))

    async def scenario() -> float:
        relay.start()
        try:
            await asyncio.sleep(1.0)  # the first batch is done and the listener listens
            started = time.monotonic()
            sync_debit = make_debit(Model("sync", writer_engine, model.async_engine),
                                    outbox.Outbox(writer_engine), tables)
            await asyncio.to_thread(sync_debit, 6, "zhang-san", decimal.Decimal("1"))
            assert await model.wait_until(lambda: publisher.ids() == ["tx-6"], timeout=10)
            return time.monotonic() - started
        finally:
            await model.call(relay.stop)

    try:
        assert model.run(scenario) < 5  # far below the 60 s poll
    finally:
        writer_engine.dispose()


def outbox_row_status(engine: Engine, message_id: str) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(select(outbox_messages.c.status)
                               .where(outbox_messages.c.message_id == message_id)))
