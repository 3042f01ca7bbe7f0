"""The caller's own session and nested decorated calls with RocketMQ half messages, on
the real broker (scripts/rocketmq up), in both models (sync Session, AsyncSession).

``outbox.send(session, ...)`` sends the half message at once, writes the log row in
the caller's transaction, and the session's outcome ends the half message. The
broker checks half messages back every 2 s once they are 3 s old.
"""

from __future__ import annotations

import asyncio
import decimal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import outbox
from outbox_rocketmq import RocketMQConfig, RocketMQTransactionalProducer

from .helpers import capture_events
from .models import Model, SyncOps
from .rocketmq_support import (
    CHECK_BACK_TIMEOUT,
    LOCAL_TIMEOUT,
    TX_TOPIC_A,
    LosesEndTransaction,
    check_backs,
    collect,
    ended,
    log_rows,
    unique,
    wait_until,
)

pytestmark = [pytest.mark.rocketmq]
AMOUNT = decimal.Decimal("1.00")


@pytest.fixture
def backend() -> str:
    """SQLite only: the broker's behaviour does not depend on the database, and every
    test waits for the broker (test_rocketmq_async.py checks back from all three)."""
    return "sqlite"


@pytest.fixture
def config(rocketmq_endpoints: str) -> RocketMQConfig:
    return RocketMQConfig(rocketmq_endpoints)


@pytest.fixture
def producer(config: RocketMQConfig) -> Iterator[RocketMQTransactionalProducer]:
    adapter = RocketMQTransactionalProducer(config, [TX_TOPIC_A], guard_after=None)
    yield adapter
    adapter.close()


async def start(model: Model, producer: RocketMQTransactionalProducer) -> None:
    await model.call(producer.astart if model.is_async else producer.start)


async def settled(model: Model, producer: RocketMQTransactionalProducer) -> None:
    """Wait for the end-transaction calls the asyncio model schedules as tasks."""
    if model.is_async:
        assert await producer.flush(10)


def accounts(engine: Engine, tables: SimpleNamespace) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(tables.ledger.c.account).order_by(tables.ledger.c.id)))


def debit(tables: SimpleNamespace, ob: Any) -> Any:
    """A body that writes a ledger row for ``message_id`` and sends it on the session."""

    async def body(ops: SyncOps, message_id: str) -> None:
        await ops.execute(tables.ledger.insert().values(account=message_id, amount=-AMOUNT))
        await ops.send(ob, topic=TX_TOPIC_A, payload={"id": message_id}, message_id=message_id,
                       key=message_id)

    return body


def test_send_on_the_callers_session_is_delivered_once_after_its_commit(
    model: Model, producer: RocketMQTransactionalProducer, config: RocketMQConfig,
    tables: SimpleNamespace,
) -> None:
    ob = model.outbox(delivery=producer, local_transaction_timeout=LOCAL_TIMEOUT)
    send = debit(tables, ob)
    no = unique("session-commit")

    async def scenario() -> None:
        await start(model, producer)
        async with model.session() as session:
            ops = model.ops(session)
            await send(ops, no)
            assert ended(events, no) == []  # the half message waits for the commit
            await ops.commit()
        await settled(model, producer)

    with capture_events() as events:
        model.run(scenario)
    assert ended(events, no) == ["commit"]
    assert accounts(model.engine, tables) == [no] and log_rows(model.engine) == {no}
    assert collect(config, TX_TOPIC_A, {no}, timeout=20, settle=2) == {no: 1}


def test_rollback_close_and_a_rolled_back_savepoint_are_never_delivered(
    model: Model, config: RocketMQConfig, tables: SimpleNamespace,
) -> None:
    """Each session's outcome reaches its half message; the end-transaction calls are
    lost on purpose, so the real broker checks back: ROLLBACK for each message whose
    transaction did not commit, COMMIT for the one kept beside a rolled-back savepoint."""
    producer = LosesEndTransaction(config, [TX_TOPIC_A], guard_after=None)
    ob = model.outbox(delivery=producer, local_transaction_timeout=CHECK_BACK_TIMEOUT)
    send = debit(tables, ob)
    rolled, closed, dropped, kept = (unique(p) for p in ("rolled", "closed", "dropped", "kept"))
    never = (rolled, closed, dropped)

    async def scenario() -> Any:
        await start(model, producer)
        async with model.session() as session:
            await send(model.ops(session), rolled)
            await model.ops(session).rollback()
        async with model.session() as session:
            await send(model.ops(session), closed)
            await model.ops(session).close()
        async with model.session() as session:
            ops = model.ops(session)
            await send(ops, kept)
            nested = session.begin_nested()
            if model.is_async:
                await nested.start()
            await send(ops, dropped)
            await model.call(nested.rollback)
            await ops.commit()
        await settled(model, producer)
        # The loop keeps running meanwhile: it answers an AsyncOutbox's check-backs.
        await asyncio.to_thread(wait_until, lambda: all(
            "rollback" in check_backs(events, i) for i in never), 30)
        return await asyncio.to_thread(collect, config, TX_TOPIC_A, {kept}, timeout=20,
                                       settle=1, unwanted=never)

    try:
        with capture_events() as events:
            seen = model.run(scenario)
    finally:
        producer.close()
    assert producer.asked == {rolled: "rollback", closed: "rollback", dropped: "rollback",
                              kept: "commit"}
    assert accounts(model.engine, tables) == [kept] and log_rows(model.engine) == {kept}
    for message_id in never:
        answers = check_backs(events, message_id)
        assert "rollback" in answers and set(answers) <= {"unknown", "rollback"}, answers
    assert set(check_backs(events, kept)) == {"commit"}
    assert seen == {kept: 1}


def nested_calls(model: Model, ob: Any, tables: SimpleNamespace) -> tuple[Any, Any]:
    async def inner_body(ops: SyncOps, no: str) -> None:
        await ops.execute(tables.ledger.insert().values(account=no, amount=-AMOUNT))

    inner = model.define(ob, inner_body, topic=TX_TOPIC_A, message_id="no", key="no")

    async def outer_body(ops: SyncOps, no: str, fail: bool = False) -> None:
        await ops.execute(tables.ledger.insert().values(account=no, amount=-AMOUNT))
        await ops.call(inner, f"{no}-inner")
        if fail:
            raise ValueError(f"{no} refused after the nested call")

    outer = model.define(ob, outer_body, topic=TX_TOPIC_A, message_id="no", key="no")
    return outer, inner


def test_a_decorated_call_with_a_nested_one_commits_both_half_messages_once(
    model: Model, producer: RocketMQTransactionalProducer, config: RocketMQConfig,
    tables: SimpleNamespace,
) -> None:
    outer, _ = nested_calls(model, model.outbox(delivery=producer), tables)
    no = unique("outer")

    async def scenario() -> None:
        await start(model, producer)
        await model.call(outer, no)
        await settled(model, producer)

    with capture_events() as events:
        model.run(scenario)
    both = {no, f"{no}-inner"}
    assert {i: ended(events, i) for i in both} == {i: ["commit"] for i in both}
    assert log_rows(model.engine) == both
    assert collect(config, TX_TOPIC_A, both, timeout=20, settle=2) == {i: 1 for i in both}


def test_an_outer_rollback_after_the_nested_call_delivers_neither(
    model: Model, producer: RocketMQTransactionalProducer, config: RocketMQConfig,
    tables: SimpleNamespace,
) -> None:
    outer, inner = nested_calls(model, model.outbox(delivery=producer), tables)
    no, control = unique("outer"), unique("control")

    async def scenario() -> None:
        await start(model, producer)
        with pytest.raises(ValueError, match="refused after the nested call"):
            await model.call(outer, no, fail=True)
        await model.call(inner, control)  # committed afterwards: what the broker shows
        await settled(model, producer)

    with capture_events() as events:
        model.run(scenario)
    both = {no, f"{no}-inner"}
    assert {i: ended(events, i) for i in both} == {i: ["rollback"] for i in both}
    assert accounts(model.engine, tables) == [control]
    assert log_rows(model.engine) == {control}
    seen = collect(config, TX_TOPIC_A, {control}, timeout=20, settle=2, unwanted=both)
    assert seen == {control: 1}


class CommitThenFail(sqlite3.Connection):
    """A SQLite connection whose COMMIT reaches the disk, then reports an error (as a
    connection lost after the server committed would)."""

    fail = False

    def commit(self) -> None:
        super().commit()
        if self.fail:
            self.fail = False
            raise sqlite3.OperationalError("connection lost after COMMIT")


def test_a_callers_commit_that_fails_midway_is_left_to_the_check_back(
    tmp_path: Path, producer: RocketMQTransactionalProducer, config: RocketMQConfig,
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'midway.db'}",
                           connect_args={"factory": CommitThenFail})
    outbox.metadata.create_all(engine)
    ob = outbox.Outbox(engine, delivery=producer, local_transaction_timeout=LOCAL_TIMEOUT)
    producer.start()
    no = unique("midway")
    with capture_events() as events, Session(engine) as session:
        ob.send(session, topic=TX_TOPIC_A, payload={"id": no}, message_id=no)
        raw = session.connection().connection.dbapi_connection
        assert isinstance(raw, CommitThenFail)
        raw.fail = True
        with pytest.raises(OperationalError, match="lost after COMMIT"):
            session.commit()
    assert log_rows(engine) == {no}  # the database has the commit
    assert "rollback" not in ended(events, no)
    assert collect(config, TX_TOPIC_A, {no}, timeout=15, settle=1) == {no: 1}
