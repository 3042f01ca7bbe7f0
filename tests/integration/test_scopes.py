"""The promise for every way of calling, in both models, on every database: the
decorator, nested calls, the caller's own session, and misuse refused."""

from __future__ import annotations

import contextlib
import decimal
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, select

from outbox import DuplicateMessageError, MisuseError, Outbox, create_engine
from outbox.schema import outbox_messages

from .models import Model, SyncOps

AMOUNT = decimal.Decimal("10.00")


def ledger_rows(engine: Engine, tables: SimpleNamespace) -> list[tuple[str, decimal.Decimal]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            select(tables.ledger.c.account, tables.ledger.c.amount).order_by(tables.ledger.c.id))]


def outbox_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(outbox_messages.c.message_id)
                                 .order_by(outbox_messages.c.seq)))


def debit_body(tables: SimpleNamespace, then: Any = None) -> Any:
    """A business function: one ledger row, then ``then(ops)`` (misuse, a nested call)."""

    async def debit(ops: SyncOps, no: str, account: str = "a") -> str:
        await ops.execute(tables.ledger.insert().values(account=account, amount=-AMOUNT))
        if then is not None:
            await then(ops, no)
        return no

    return debit


def define_debit(model: Model, ob: Any, tables: SimpleNamespace, then: Any = None) -> Any:
    return model.define(ob, debit_body(tables, then), topic="debits", message_id="no",
                        key="account", payload=lambda no, account="a": {"no": no})


# -- the decorator ----------------------------------------------------------------------


def test_commit_writes_change_and_message_together(model: Model, tables: SimpleNamespace) -> None:
    debit = define_debit(model, model.outbox(), tables)
    assert model.run(lambda: model.call(debit, "T1")) == "T1"
    assert ledger_rows(model.engine, tables) == [("a", -AMOUNT)]
    assert outbox_ids(model.engine) == ["T1"]


def test_raise_leaves_neither(model: Model, tables: SimpleNamespace) -> None:
    async def refuse(ops: SyncOps, no: str) -> None:
        raise ValueError(f"{no} refused")

    debit = define_debit(model, model.outbox(), tables, then=refuse)
    with pytest.raises(ValueError, match="T1 refused"):
        model.run(lambda: model.call(debit, "T1"))
    assert ledger_rows(model.engine, tables) == []
    assert outbox_ids(model.engine) == []


def test_reused_id_is_refused_and_rolls_back(model: Model, tables: SimpleNamespace) -> None:
    debit = define_debit(model, model.outbox(), tables)
    model.run(lambda: model.call(debit, "T1"))
    with pytest.raises(DuplicateMessageError, match="T1"):
        model.run(lambda: model.call(debit, "T1"))
    assert ledger_rows(model.engine, tables) == [("a", -AMOUNT)]


# -- misuse of the framework's session ---------------------------------------------------


@pytest.mark.parametrize("misuse", ["commit", "rollback", "close"])
def test_commit_rollback_or_close_inside_is_refused_and_nothing_commits(
    model: Model, tables: SimpleNamespace, misuse: str
) -> None:
    async def misbehave(ops: SyncOps, no: str) -> None:
        await getattr(ops, misuse)()

    debit = define_debit(model, model.outbox(), tables, then=misbehave)
    with pytest.raises(MisuseError, match=rf"must not call session\.{misuse}\(\)"):
        model.run(lambda: model.call(debit, "T1"))
    assert ledger_rows(model.engine, tables) == []
    assert outbox_ids(model.engine) == []


def test_misuse_swallowed_by_the_function_still_commits_nothing(
    model: Model, tables: SimpleNamespace
) -> None:
    async def swallow(ops: SyncOps, no: str) -> None:
        with contextlib.suppress(MisuseError):
            await ops.commit()

    debit = define_debit(model, model.outbox(), tables, then=swallow)
    with pytest.raises(MisuseError, match=r"called session\.commit\(\)"):
        model.run(lambda: model.call(debit, "T1"))
    assert ledger_rows(model.engine, tables) == []
    assert outbox_ids(model.engine) == []


def test_a_refused_commit_does_not_apply_the_change_twice(
    model: Model, tables: SimpleNamespace
) -> None:
    """Before the guard, commit() inside committed the change without its message, and
    calling again with the same id applied it twice."""
    calls = {"n": 0}

    async def commit_first_time(ops: SyncOps, no: str) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            await ops.commit()

    debit = define_debit(model, model.outbox(), tables, then=commit_first_time)
    with pytest.raises(MisuseError):
        model.run(lambda: model.call(debit, "T1"))
    model.run(lambda: model.call(debit, "T1"))
    assert ledger_rows(model.engine, tables) == [("a", -AMOUNT)]
    assert outbox_ids(model.engine) == ["T1"]


# -- nesting -----------------------------------------------------------------------------


def test_nested_call_joins_the_outer_transaction(model: Model, tables: SimpleNamespace) -> None:
    ob = model.outbox()
    inner = define_debit(model, ob, tables)

    async def call_inner(ops: SyncOps, no: str) -> None:
        await ops.call(inner, f"{no}-inner", account="b")

    outer = define_debit(model, ob, tables, then=call_inner)
    model.run(lambda: model.call(outer, "T1"))
    assert ledger_rows(model.engine, tables) == [("a", -AMOUNT), ("b", -AMOUNT)]
    assert outbox_ids(model.engine) == ["T1-inner", "T1"]


def test_outer_rollback_after_a_nested_call_leaves_nothing(
    model: Model, tables: SimpleNamespace
) -> None:
    """Before joining, the inner call committed on its own (PostgreSQL) and its message
    went out although the outer work rolled back; SQLite waited 30 s then failed."""
    ob = model.outbox()
    inner = define_debit(model, ob, tables)

    async def inner_then_fail(ops: SyncOps, no: str) -> None:
        await ops.call(inner, f"{no}-inner", account="b")
        raise ValueError("outer work fails after the nested call")

    outer = define_debit(model, ob, tables, then=inner_then_fail)
    with pytest.raises(ValueError, match="outer work fails"):
        model.run(lambda: model.call(outer, "T1"))
    assert ledger_rows(model.engine, tables) == []
    assert outbox_ids(model.engine) == []


def test_nested_commit_is_refused_too(model: Model, tables: SimpleNamespace) -> None:
    ob = model.outbox()

    async def commit(ops: SyncOps, no: str) -> None:
        await ops.commit()

    inner = define_debit(model, ob, tables, then=commit)

    async def call_inner(ops: SyncOps, no: str) -> None:
        await ops.call(inner, f"{no}-inner")

    outer = define_debit(model, ob, tables, then=call_inner)
    with pytest.raises(MisuseError):
        model.run(lambda: model.call(outer, "T1"))
    assert ledger_rows(model.engine, tables) == []
    assert outbox_ids(model.engine) == []


def test_nested_call_to_another_database_is_refused(
    model: Model, tables: SimpleNamespace, tmp_path: Any
) -> None:
    other_url = f"sqlite:///{tmp_path}/other.db"
    other: Any
    if model.is_async:
        from outbox import AsyncOutbox, create_async_engine

        other = AsyncOutbox(create_async_engine(other_url))
    else:
        other = Outbox(create_engine(other_url))
    elsewhere = define_debit(model, other, tables)

    async def call_elsewhere(ops: SyncOps, no: str) -> None:
        await ops.call(elsewhere, f"{no}-elsewhere")

    outer = define_debit(model, model.outbox(), tables, then=call_elsewhere)
    with pytest.raises(MisuseError, match="another database"):
        model.run(lambda: model.call(outer, "T1"))
    assert ledger_rows(model.engine, tables) == []
    assert outbox_ids(model.engine) == []


# -- the caller's own session ---------------------------------------------------------


def test_send_on_the_callers_session_follows_its_commit(
    model: Model, tables: SimpleNamespace
) -> None:
    ob = model.outbox()

    async def scenario() -> None:
        async with model.session() as session:
            ops = model.ops(session)
            await ops.execute(tables.ledger.insert().values(account="a", amount=-AMOUNT))
            message = await ops.send(ob, topic="debits", payload={"no": "C1"},
                                     message_id="C1", key="a")
            assert message.id == "C1" and message.key == "a"
            assert outbox_ids(model.engine) == [] or model.engine.dialect.name == "sqlite"
            await ops.commit()

    model.run(scenario)
    assert ledger_rows(model.engine, tables) == [("a", -AMOUNT)]
    assert outbox_ids(model.engine) == ["C1"]


@pytest.mark.parametrize("ending", ["rollback", "close"])
def test_send_on_the_callers_session_is_dropped_with_its_rollback(
    model: Model, tables: SimpleNamespace, ending: str
) -> None:
    ob = model.outbox()

    async def scenario() -> None:
        async with model.session() as session:
            ops = model.ops(session)
            await ops.execute(tables.ledger.insert().values(account="a", amount=-AMOUNT))
            await ops.send(ob, topic="debits", payload={}, message_id="C1")
            await getattr(ops, ending)()

    model.run(scenario)
    assert ledger_rows(model.engine, tables) == []
    assert outbox_ids(model.engine) == []


def test_send_in_a_rolled_back_savepoint_is_dropped(model: Model, tables: SimpleNamespace) -> None:
    ob = model.outbox()

    async def scenario() -> None:
        async with model.session() as session:
            ops = model.ops(session)
            await ops.send(ob, topic="debits", payload={}, message_id="kept")
            nested = session.begin_nested()
            if model.is_async:
                await nested.start()
            await ops.send(ob, topic="debits", payload={}, message_id="dropped")
            await model.call(nested.rollback)
            await ops.commit()

    model.run(scenario)
    assert outbox_ids(model.engine) == ["kept"]


def test_send_nudges_the_relay_after_the_commit_only(model: Model) -> None:
    ob = model.outbox()

    class Wakeup:
        def __init__(self) -> None:
            self.sets = 0

        def set(self) -> None:
            self.sets += 1

    wakeup = Wakeup()
    ob.subscribe_commits(wakeup)

    async def scenario() -> None:
        async with model.session() as session:
            ops = model.ops(session)
            await ops.send(ob, topic="t", payload={}, message_id="n1")
            assert wakeup.sets == 0
            await ops.commit()
            assert wakeup.sets == 1
            await ops.send(ob, topic="t", payload={}, message_id="n2")
            await ops.rollback()
            assert wakeup.sets == 1

    model.run(scenario)
    assert outbox_ids(model.engine) == ["n1"]


def test_send_refuses_a_session_of_another_database(model: Model, tmp_path: Any) -> None:
    ob = model.outbox()
    other = create_engine(f"sqlite:///{tmp_path}/other.db")

    async def scenario() -> None:
        if model.is_async:
            from sqlalchemy.ext.asyncio import AsyncSession

            from outbox import create_async_engine

            async with AsyncSession(create_async_engine(f"sqlite:///{tmp_path}/other.db")) as s:
                await ob.send(s, topic="t", payload={})
        else:
            from sqlalchemy.orm import Session

            with Session(other) as s:
                ob.send(s, topic="t", payload={})

    with pytest.raises(MisuseError, match="session of the outbox's own database"):
        model.run(scenario)


def test_send_refuses_the_other_models_session(model: Model) -> None:
    ob = model.outbox()

    async def scenario() -> None:
        if model.is_async:
            from sqlalchemy.orm import Session

            with Session(model.engine) as s:
                await ob.send(s, topic="t", payload={})
        else:
            from sqlalchemy.ext.asyncio import AsyncSession

            async with AsyncSession(model.async_engine) as s:
                ob.send(s, topic="t", payload={})

    with pytest.raises(MisuseError, match="Session"):
        model.run(scenario)
    assert outbox_ids(model.engine) == []


def test_send_inside_a_decorated_function_joins_its_transaction(
    model: Model, tables: SimpleNamespace
) -> None:
    ob = model.outbox()

    async def send_more(ops: SyncOps, no: str) -> None:
        await ops.send(ob, topic="audit", payload={"no": no}, message_id=f"{no}-audit")

    debit = define_debit(model, ob, tables, then=send_more)
    model.run(lambda: model.call(debit, "T1"))
    assert outbox_ids(model.engine) == ["T1-audit", "T1"]


def test_send_on_the_session_of_a_finished_call_is_refused(
    model: Model, tables: SimpleNamespace
) -> None:
    ob = model.outbox()
    kept: list[Any] = []

    async def keep(ops: SyncOps, no: str) -> None:
        kept.append(ops.session)

    debit = define_debit(model, ob, tables, then=keep)
    model.run(lambda: model.call(debit, "T1"))

    async def scenario() -> None:
        await model.ops(kept[0]).send(ob, topic="t", payload={}, message_id="late")

    with pytest.raises(MisuseError, match="after that call ended"):
        model.run(scenario)
    assert outbox_ids(model.engine) == ["T1"]
