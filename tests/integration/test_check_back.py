"""SqlAlchemyTransactionListener: execute with a log row, and answer check-backs from it."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from outbox import LocalWork, Message, SqlAlchemyTransactionListener, TransactionState
from outbox.schema import transaction_log, utcnow
from outbox.transaction import CREATED_AT_HEADER

TIMEOUT = dt.timedelta(seconds=60)


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def listener(engine: Engine, clock: Clock) -> SqlAlchemyTransactionListener:
    return SqlAlchemyTransactionListener(sessionmaker(engine), timeout=TIMEOUT, clock=clock)


def stamped(clock: Clock, message_id: str, age: dt.timedelta = dt.timedelta()) -> Message:
    created = (clock.now - age).isoformat()
    return Message(topic="transfers", id=message_id, payload=b"{}",
                   headers={CREATED_AT_HEADER: created})


def write_ledger(tables: SimpleNamespace, fail: bool = False) -> LocalWork:
    def fn(session: Session) -> str:
        session.execute(tables.ledger.insert().values(account="a", amount=1))
        if fail:
            raise RuntimeError("business rule broken")
        return "ok"

    return LocalWork(fn, (), {})


def rows(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


def test_commit_writes_the_log_row_and_check_answers_commit(
    engine: Engine, tables: SimpleNamespace, listener: SqlAlchemyTransactionListener,
    clock: Clock,
) -> None:
    message = stamped(clock, "tx-1")
    work = write_ledger(tables)
    assert listener.execute(message, work) is TransactionState.COMMIT
    assert work.outcome() == "ok"
    assert rows(engine, tables.ledger) == 1
    with engine.connect() as conn:
        [log_row] = conn.execute(select(transaction_log)).all()
    assert (log_row.transaction_id, log_row.message_id, log_row.topic) == (
        "tx-1", "tx-1", "transfers")

    assert listener.check(message) is TransactionState.COMMIT
    clock.now += TIMEOUT * 10  # a committed transaction stays committed
    assert listener.check(message) is TransactionState.COMMIT


def test_rolled_back_execute_leaves_nothing(
    engine: Engine, tables: SimpleNamespace, listener: SqlAlchemyTransactionListener,
    clock: Clock,
) -> None:
    message = stamped(clock, "tx-2")
    work = write_ledger(tables, fail=True)
    assert listener.execute(message, work) is TransactionState.ROLLBACK
    with pytest.raises(RuntimeError, match="business rule broken"):
        work.outcome()
    assert rows(engine, tables.ledger) == 0
    assert rows(engine, transaction_log) == 0


def test_fresh_message_without_row_is_unknown_then_rollback_after_the_timeout(
    listener: SqlAlchemyTransactionListener, clock: Clock,
) -> None:
    message = stamped(clock, "tx-3")
    assert listener.check(message) is TransactionState.UNKNOWN
    clock.now += TIMEOUT - dt.timedelta(seconds=1)
    assert listener.check(message) is TransactionState.UNKNOWN
    clock.now += dt.timedelta(seconds=2)
    assert listener.check(message) is TransactionState.ROLLBACK


def test_old_or_unstamped_message_without_row_is_rollback(
    listener: SqlAlchemyTransactionListener, clock: Clock,
) -> None:
    assert listener.check(stamped(clock, "tx-4", age=TIMEOUT * 2)) is TransactionState.ROLLBACK
    unstamped = Message(topic="transfers", id="tx-5", payload=b"{}")
    assert listener.check(unstamped) is TransactionState.ROLLBACK
    garbled = Message(topic="transfers", id="tx-6", payload=b"{}",
                      headers={CREATED_AT_HEADER: "yesterday"})
    assert listener.check(garbled) is TransactionState.ROLLBACK


def test_second_execute_of_one_message_rolls_back_its_own_work(
    engine: Engine, tables: SimpleNamespace, listener: SqlAlchemyTransactionListener,
    clock: Clock,
) -> None:
    message = stamped(clock, "tx-7")
    assert listener.execute(message, write_ledger(tables)) is TransactionState.COMMIT
    again = write_ledger(tables)
    assert listener.execute(message, again) is TransactionState.ROLLBACK
    assert again.exception is not None
    assert rows(engine, tables.ledger) == 1
    assert listener.check(message) is TransactionState.COMMIT


def test_failed_commit_is_unknown_and_settled_by_the_check_back(
    engine: Engine, tables: SimpleNamespace, listener: SqlAlchemyTransactionListener,
    clock: Clock,
) -> None:
    def lose_commit(conn: Any) -> None:
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    event.listen(engine, "commit", lose_commit)
    message = stamped(clock, "tx-8")
    try:
        state = listener.execute(message, write_ledger(tables))
    finally:
        event.remove(engine, "commit", lose_commit)
    assert state is TransactionState.UNKNOWN
    # The commit never reached the database: the check-back must not say COMMIT.
    assert rows(engine, transaction_log) == 0
    assert listener.check(message) is TransactionState.UNKNOWN
    clock.now += TIMEOUT * 2
    assert listener.check(message) is TransactionState.ROLLBACK


def test_a_transaction_past_half_the_timeout_rolls_back_instead_of_committing(
    engine: Engine, tables: SimpleNamespace, listener: SqlAlchemyTransactionListener,
    clock: Clock,
) -> None:
    """A check-back may already have answered ROLLBACK for it: committing now would
    leave the business change without its message."""
    from outbox import TransactionRolledBack

    message = stamped(clock, "slow-1", age=TIMEOUT / 2 + dt.timedelta(seconds=1))
    work = write_ledger(tables)
    assert listener.execute(message, work) is TransactionState.ROLLBACK
    assert isinstance(work.exception, TransactionRolledBack)
    assert rows(engine, tables.ledger) == 0
    assert rows(engine, transaction_log) == 0


def test_a_commit_landing_between_the_clock_and_the_read_is_not_rolled_back(
    engine: Engine, clock: Clock,
) -> None:
    # The transaction commits at the very moment the checker looks at the clock, when
    # the message has just reached the timeout. The log row must be looked for after
    # the clock was read: then it is found, and the answer is COMMIT. (Read the other
    # way round, the row is absent, the clock says too late, and a committed
    # transaction is answered ROLLBACK; the model checker found that order.)
    message = stamped(clock, "tx-race", age=TIMEOUT)

    def clock_that_lets_the_commit_land() -> dt.datetime:
        with engine.begin() as conn:
            conn.execute(transaction_log.insert().values(
                transaction_id=message.id, message_id=message.id, topic=message.topic,
                created_at=utcnow()))
        return clock.now

    listener = SqlAlchemyTransactionListener(sessionmaker(engine), timeout=TIMEOUT,
                                             clock=clock_that_lets_the_commit_land)
    assert listener.check(message) is TransactionState.COMMIT
