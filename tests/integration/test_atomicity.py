"""The decorated function's business write and its outbox row commit together or not at all."""

from __future__ import annotations

import decimal
import time
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session

import outbox
from outbox import DuplicateMessageError, JsonCodec, Outbox, Relay, RelayConfig
from outbox.schema import PENDING, outbox_messages, transaction_log

from .helpers import RecordingPublisher, wait_until


class InsufficientFunds(Exception):
    pass


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


@pytest.fixture
def commits(engine: Engine) -> list[str]:
    """Records every COMMIT and ROLLBACK issued on the engine."""
    seen: list[str] = []
    event.listen(engine, "commit", lambda conn: seen.append("commit"))
    event.listen(engine, "rollback", lambda conn: seen.append("rollback"))
    return seen


def make_debit(ob: Outbox, tables: SimpleNamespace) -> Any:
    @ob.transactional_message(
        topic="transfers", key="account", message_id=lambda transfer_no, *_: f"tx-{transfer_no}",
        payload=lambda transfer_no, account, amount: {"no": transfer_no, "amount": amount},
    )
    def debit(session: Session, transfer_no: int, account: str, amount: decimal.Decimal) -> int:
        session.execute(tables.ledger.insert().values(account=account, amount=-amount))
        if amount > 100:
            raise InsufficientFunds(f"{account} cannot pay {amount}")
        return transfer_no

    return debit


def test_failure_leaves_neither_business_row_nor_outbox_row(
    engine: Engine, tables: SimpleNamespace, commits: list[str]
) -> None:
    debit = make_debit(Outbox(engine), tables)
    with pytest.raises(InsufficientFunds, match="cannot pay 500") as info:
        debit(1, "zhang-san", decimal.Decimal("500.00"))
    assert isinstance(info.value, InsufficientFunds)
    assert count(engine, tables.ledger) == 0
    assert count(engine, outbox_messages) == 0
    assert "commit" not in commits


def test_success_writes_both_rows_in_one_transaction(
    engine: Engine, tables: SimpleNamespace, commits: list[str]
) -> None:
    debit = make_debit(Outbox(engine), tables)
    assert debit(42, "zhang-san", decimal.Decimal("10.50")) == 42
    assert commits == ["commit"]

    with engine.connect() as conn:
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
    assert count(engine, transaction_log) == 0


def test_a_failing_outbox_insert_undoes_the_business_write(
    engine: Engine, tables: SimpleNamespace
) -> None:
    debit = make_debit(Outbox(engine), tables)
    debit(7, "zhang-san", decimal.Decimal("1"))
    # Same transfer number, same message id: the outbox row's unique key refuses it,
    # and the error says so in the project's own terms.
    with pytest.raises(DuplicateMessageError, match="already used"):
        debit(7, "zhang-san", decimal.Decimal("2"))
    with engine.connect() as conn:
        amounts = conn.scalars(select(tables.ledger.c.amount)).all()
    assert amounts == [decimal.Decimal("-1")]
    assert count(engine, outbox_messages) == 1


def test_rows_of_several_calls_keep_their_arguments(
    engine: Engine, tables: SimpleNamespace
) -> None:
    debit = make_debit(Outbox(engine), tables)
    for no, account in [(1, "a"), (2, "b"), (3, "a")]:
        debit(no, account, decimal.Decimal(no))
    with pytest.raises(InsufficientFunds):
        debit(4, "b", decimal.Decimal(1000))
    with engine.connect() as conn:
        rows = conn.execute(select(outbox_messages.c.message_id, outbox_messages.c.key)
                            .order_by(outbox_messages.c.seq)).all()
    assert [tuple(r) for r in rows] == [("tx-1", "a"), ("tx-2", "b"), ("tx-3", "a")]


def test_commit_nudges_the_relay_at_once(engine: Engine, tables: SimpleNamespace) -> None:
    ob = Outbox(engine)
    debit = make_debit(ob, tables)
    publisher = RecordingPublisher()
    # The poll interval is far longer than the test may wait, and PostgreSQL's NOTIFY
    # is off: only the in-process nudge can do it.
    relay = ob.relay(publisher, RelayConfig(poll_interval=60, purge_interval=3600, listen=False))
    batches: list[object] = []
    run_once = relay.run_once
    relay.run_once = lambda: batches.append(run_once()) or batches[-1]  # type: ignore[method-assign]
    relay.start()
    try:
        # Let the relay finish its first (empty) batch and go to sleep on the wake-up event.
        assert wait_until(lambda: len(batches) == 1, timeout=5)
        time.sleep(0.2)
        debit(5, "zhang-san", decimal.Decimal("3"))
        assert wait_until(lambda: publisher.ids() == ["tx-5"], timeout=10)
        assert wait_until(lambda: len(batches) == 2, timeout=5)
    finally:
        relay.stop()
    assert outbox_row_status(engine, "tx-5") == "sent"


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_commit_elsewhere_wakes_the_relay_through_notify(
    engine: Engine, db_url: str, tables: SimpleNamespace
) -> None:
    """No nudge crosses engines or processes: on PostgreSQL the insert's NOTIFY wakes
    the relay."""
    relay_engine, writer_engine = engine, outbox.create_engine(db_url)
    try:
        publisher = RecordingPublisher()
        relay = Relay(relay_engine, publisher, RelayConfig(poll_interval=60, purge_interval=3600))
        relay.start()
        try:
            time.sleep(1.0)  # the first batch is done and the listener is listening
            started = time.monotonic()
            make_debit(Outbox(writer_engine), tables)(6, "zhang-san", decimal.Decimal("1"))
            assert wait_until(lambda: publisher.ids() == ["tx-6"], timeout=10)
            assert time.monotonic() - started < 5  # far below the 60 s poll
        finally:
            relay.stop()
    finally:
        writer_engine.dispose()


def outbox_row_status(engine: Engine, message_id: str) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(select(outbox_messages.c.status)
                               .where(outbox_messages.c.message_id == message_id)))
