"""A decorated call from another thread or task while a transaction is open is
refused (it can neither join nor commit apart); once the outer call has returned,
the same call runs a transaction of its own."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from outbox import AsyncOutbox, MisuseError, Outbox
from outbox.schema import outbox_messages


def ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(outbox_messages.c.message_id)
                                 .order_by(outbox_messages.c.seq)))


def test_a_thread_started_inside_a_sync_transaction_is_refused(
    engine: Engine, tables: SimpleNamespace
) -> None:
    ob = Outbox(engine)

    @ob.transactional_message(topic="t", message_id="no")
    def inner(session: Session, no: str) -> None:
        session.execute(tables.ledger.insert().values(account=no, amount=1))

    errors: list[BaseException] = []

    @ob.transactional_message(topic="t", message_id="no")
    def outer(session: Session, no: str) -> None:
        session.execute(tables.ledger.insert().values(account=no, amount=1))

        def in_thread() -> None:
            try:
                inner(f"{no}-thread")
            except BaseException as exc:
                errors.append(exc)

        # A thread that copies the context (as executors do) still names the scope.
        import contextvars

        thread = threading.Thread(target=contextvars.copy_context().run, args=(in_thread,))
        thread.start()
        thread.join()

    outer("T1")
    [error] = errors
    assert isinstance(error, MisuseError) and "another thread or task" in str(error)
    assert ids(engine) == ["T1"]


def test_a_task_inside_an_async_transaction_is_refused_and_nothing_commits(
    engine: Engine, async_engine: Any, tables: SimpleNamespace
) -> None:
    ob = AsyncOutbox(async_engine)

    @ob.transactional_message(topic="t", message_id="no")
    async def inner(session: AsyncSession, no: str) -> None:
        await session.execute(tables.ledger.insert().values(account=no, amount=1))

    @ob.transactional_message(topic="t", message_id="no")
    async def outer(session: AsyncSession, no: str) -> None:
        await session.execute(tables.ledger.insert().values(account=no, amount=1))
        await asyncio.create_task(inner(f"{no}-task"))

    with pytest.raises(MisuseError, match="another thread or task"):
        asyncio.run(outer("T1"))
    assert ids(engine) == []


def test_a_task_that_runs_after_the_transaction_has_its_own(
    engine: Engine, async_engine: Any, tables: SimpleNamespace
) -> None:
    ob = AsyncOutbox(async_engine)

    @ob.transactional_message(topic="t", message_id="no")
    async def inner(session: AsyncSession, no: str) -> None:
        await session.execute(tables.ledger.insert().values(account=no, amount=1))

    async def main() -> None:
        committed = asyncio.Event()

        async def after() -> None:
            await committed.wait()  # the outer call has returned by then
            await inner("T1-after")

        @ob.transactional_message(topic="t", message_id="no")
        async def outer(session: AsyncSession, no: str) -> asyncio.Task[None]:
            await session.execute(tables.ledger.insert().values(account=no, amount=1))
            return asyncio.create_task(after())  # copies the context, scope and all

        task = await outer("T1")
        committed.set()
        await task

    asyncio.run(main())
    assert ids(engine) == ["T1", "T1-after"]
