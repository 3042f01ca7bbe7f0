"""``AsyncOutbox``: the decorator and ``send`` for ``async def`` code on an AsyncSession.

The same scope, tickets and messages as the sync :class:`outbox.Outbox`; this module
only awaits the steps that :func:`outbox.scope.run_owned` runs in sync code.
"""

from __future__ import annotations

import datetime as dt
import functools
from asyncio import CancelledError
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Executable
from sqlalchemy import inspect as inspect_db
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from ..app import BaseOutbox, Explain, missing_tables_error
from ..decorator import MessageSpec, check_function_kind, check_options
from ..errors import ConfigurationError, MisuseError, TransactionOutcomeUnknown
from ..message import Message
from ..relay import RelayConfig
from ..schema import outbox_messages
from ..scope import Record, Scope, Ticket, current_scope
from ..sessions import guarded_class
from ..transaction import DEFAULT_LOCAL_TRANSACTION_TIMEOUT, SqlAlchemyTransactionListener
from ..typing import AsyncPublisher
from .relay import AsyncRelay

R = TypeVar("R")


async def arun_owned(
    session_factory: Callable[[], AsyncSession], *, identity: URL, owner: str,
    ticket: Ticket | None, lock: Executable | None,
    work: Callable[[AsyncSession], Awaitable[R]],
    explain: Callable[[BaseException], Awaitable[BaseException]],
) -> R:
    """:func:`outbox.scope.run_owned`, awaited: open, lock, run, write, commit, follow up.

    A cancellation before the commit rolls everything back; one during the commit is
    an unknown outcome, settled as any failed commit is.
    """
    async with session_factory() as session:
        scope = Scope(session.sync_session, session, url=identity, owner=owner, owned=True)
        records = scope.attach(ticket) if ticket is not None else ()
        try:
            async with session.begin():
                if lock is not None:
                    await session.execute(lock)
                with scope.user_code():
                    result = await work(session)
                if ticket is not None:
                    await awrite_records(session, records, ticket)
                scope.before_commit()
        except BaseException as exc:
            error = await explain(scope.failed(exc))
            if error is exc or isinstance(exc, CancelledError):
                raise  # a cancelled task stays cancelled (the outcome was settled above)
            raise error from (exc if isinstance(error, TransactionOutcomeUnknown) else None)
    scope.committed()
    return result


async def awrite_records(session: AsyncSession, records: Sequence[Record],
                         ticket: Ticket) -> None:
    """:func:`outbox.scope.write_records`, awaited."""
    try:
        for statement, params in records:
            await session.execute(statement, params)
    except IntegrityError:
        raise ticket.duplicate() from None


def guarded_async_factory(bind: AsyncEngine | async_sessionmaker[AsyncSession], what: str
                          ) -> async_sessionmaker[AsyncSession]:
    """An async session factory whose sessions refuse the user code's commit and close."""
    if isinstance(bind, AsyncEngine):
        return async_sessionmaker(bind, sync_session_class=guarded_class(Session),
                                  expire_on_commit=False)
    if isinstance(bind, async_sessionmaker):
        options = dict(bind.kw)
        sync_class = options.pop("sync_session_class", None) or Session
        return async_sessionmaker(class_=bind.class_, sync_session_class=guarded_class(sync_class),
                                  **options)
    raise ConfigurationError(
        f"{what} needs a SQLAlchemy AsyncEngine or async_sessionmaker, got "
        f"{type(bind).__name__}; create one with outbox.aio.create_async_engine(url) (for a "
        "sync Engine use the sync class)"
    )


async def aexplain_missing(engine: AsyncEngine, exc: BaseException, explain: Explain
                           ) -> BaseException:
    """:func:`outbox.app.explain_missing`, awaited."""
    if not isinstance(exc, DBAPIError):
        return exc
    try:
        async with engine.connect() as conn:
            existing = set(await conn.run_sync(lambda c: inspect_db(c).get_table_names()))
    except DBAPIError:
        return exc
    return explain(engine.url, existing) or exc


class AsyncOutbox(BaseOutbox):
    """One service's database, delivery adapter and codec, for asyncio code.

    ``bind`` is an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` (see
    :func:`outbox.aio.create_async_engine`) or an ``async_sessionmaker``. Decorated
    functions are ``async def fn(session: AsyncSession, ...)``; ``await
    outbox.send(session, ...)`` adds a message to the caller's own AsyncSession.
    ``delivery`` must have an asyncio form (``aprepare``): the local outbox has.
    """

    def __init__(
        self,
        bind: AsyncEngine | async_sessionmaker[AsyncSession],
        *,
        delivery: Any = None,
        codec: Any = None,
        local_transaction_timeout: dt.timedelta = DEFAULT_LOCAL_TRANSACTION_TIMEOUT,
    ) -> None:
        self.session_factory = guarded_async_factory(bind, "AsyncOutbox")
        engine = self.session_factory.kw.get("bind")
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError("AsyncOutbox's async_sessionmaker must be bound to an "
                                     "AsyncEngine")
        if delivery is not None and not hasattr(delivery, "aprepare"):
            raise ConfigurationError(
                f"{type(delivery).__name__} has no asyncio form (aprepare); use it with the "
                "sync Outbox, or pick its asyncio adapter"
            )
        self.engine: AsyncEngine = engine
        super().__init__(delivery=delivery, codec=codec, url=engine.url,
                         dialect=engine.dialect.name)
        #: Answers a broker's check-backs from this database (``await listener.acheck``).
        self.listener = SqlAlchemyTransactionListener(engine, timeout=local_transaction_timeout)

    async def explain_failure(self, exc: BaseException) -> BaseException:
        tables = getattr(self.delivery, "tables", (outbox_messages,))
        return await aexplain_missing(
            self.engine, exc, lambda url, existing: missing_tables_error(url, existing, tables))

    def relay(self, publisher: AsyncPublisher, config: RelayConfig | None = None) -> AsyncRelay:
        """An :class:`AsyncRelay` on this outbox's database, nudged after each local commit."""
        relay = AsyncRelay(self.engine, publisher, config)
        self.subscribe_commits(relay.wakeup)
        return relay

    async def send(
        self, session: AsyncSession, *, topic: str, payload: Any, key: str | int | None = None,
        message_id: str | int | None = None, tag: str | None = None,
        headers: Mapping[str, str] | None = None, deliver_at: dt.datetime | None = None,
        deliver_after: dt.timedelta | None = None,
    ) -> Message:
        """Add a message to ``session``'s transaction (see :meth:`outbox.Outbox.send`;
        ``deliver_at``/``deliver_after`` hold it back the same way)."""
        if not isinstance(session, AsyncSession):
            raise MisuseError(
                f"AsyncOutbox.send needs an AsyncSession, got {type(session).__name__}; for a "
                "sync Session use Outbox(engine).send(session, ...)"
            )
        message = self.message(topic=topic, payload=payload, key=key, message_id=message_id,
                               tag=tag, headers=headers, deliver_at=deliver_at,
                               deliver_after=deliver_after)
        scope = self._scope_for(session.sync_session, session, "AsyncOutbox.send")
        self._register(topic)
        await self._join(scope, message)
        return message

    async def _join(self, scope: Scope, message: Message) -> None:
        ticket = await self.delivery.aprepare(self, message)
        try:
            await awrite_records(scope.user_session, scope.attach(ticket), ticket)
        except BaseException:
            scope.detach(ticket)
            raise

    async def call(self, spec: MessageSpec, fn: Callable[..., Awaitable[R]],
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        """Run ``await fn(session, *args, **kwargs)`` and its message in one transaction."""
        bound = spec.bind(args, kwargs)
        message = spec.message(self.codec, bound)
        active = current_scope()
        if active is not None:  # a nested call, or a call from a handler: join
            active.check_join(self.identity, True, spec.name)
            result = await fn(active.user_session, *bound.args, **bound.kwargs)
            await self._join(active, message)
            return result
        ticket = await self.delivery.aprepare(self, message)
        return await arun_owned(
            self.session_factory, identity=self.identity, owner=spec.name, ticket=ticket,
            lock=self._lock_statement(),
            work=lambda session: fn(session, *bound.args, **bound.kwargs),
            explain=self.explain_failure,
        )

    def transactional_message(
        self,
        *,
        topic: str,
        payload: Callable[..., Any] | None = None,
        key: str | Callable[..., Any] | None = None,
        message_id: str | Callable[..., Any] | None = None,
        tag: str | None = None,
        headers: Mapping[str, str] | None = None,
        deliver_at: str | Callable[..., dt.datetime | None] | None = None,
        deliver_after: dt.timedelta | str | Callable[..., dt.timedelta | None] | None = None,
    ) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
        """Decorate ``async def fn(session, *args, **kwargs)``: its database work and a
        message commit together or not at all (see :func:`outbox.transactional_message`;
        the options are the same)."""
        check_options(topic, payload)

        def decorate(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
            check_function_kind(fn, is_async=True, decorator="AsyncOutbox.transactional_message")
            spec = MessageSpec(fn, topic=topic, payload=payload, key=key,
                               message_id=message_id, tag=tag, headers=headers,
                               deliver_at=deliver_at, deliver_after=deliver_after)
            self._register(topic)

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> R:
                return await self.call(spec, fn, args, kwargs)

            wrapper.__signature__ = spec.signature  # type: ignore[attr-defined]
            return wrapper

        return decorate


__all__ = ["AsyncOutbox", "arun_owned", "awrite_records"]
