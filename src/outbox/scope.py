"""The local transaction that messages join, written once for every way of calling.

A :class:`Scope` is one database transaction and the messages attached to it. The
decorator opens one around the user's function, the idempotent consumer opens one
around a handler, and ``Outbox.send(session, ...)`` attaches to the caller's own
session. A decorated function called while a scope is open (a nested call, or a
call from a handler) joins it: one commit, all messages.

A delivery adapter turns a message into a :class:`Ticket`: the records that make
it durable inside the transaction (each a statement built once and its parameters),
and what to do before and after the commit. The scope decides what an outcome
means; the sync and asyncio drivers (``app.py`` and ``aio/app.py``) only execute
its steps.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from sqlalchemy import Executable, Table
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, SessionTransaction

from . import instrument
from .errors import MisuseError, TransactionOutcomeUnknown
from .log import get_logger

log = get_logger("outbox")

#: ``session.info`` keys: who owns the session while user code runs, what the user
#: code did wrong with it, and the scope attached to a caller-owned session.
GUARD_KEY = "outbox.guard"
MISUSE_KEY = "outbox.misuse"
SCOPE_KEY = "outbox.scope"


#: A statement built once (so SQLAlchemy compiles it once and the driver may prepare
#: it) with the parameters of one execution.
Record = tuple[Executable, Mapping[str, Any]]


class Ticket(Protocol):
    """One message in one transaction, as its delivery adapter handles it.

    ``records`` are written inside the transaction (the outbox row, or the
    transaction-log row of a half message), each as a statement built once and the
    parameters of this message, so the driver and the database reuse its plan.
    ``before_commit`` may raise to refuse the commit. ``committed`` and
    ``rolled_back`` follow the outcome and must not block an event loop (an asyncio
    adapter schedules its work). ``unknown`` is called when the COMMIT itself failed
    midway and returns the error the caller gets, or None for the database's own
    error.
    """

    records: Sequence[Record]

    def before_commit(self) -> None: ...

    def committed(self) -> None: ...

    def rolled_back(self) -> None: ...

    def unknown(self) -> BaseException | None: ...

    def duplicate(self) -> BaseException:
        """The error for a record refused as a duplicate (its message id was used)."""
        ...


def database_identity(url: URL) -> URL:
    """The database a URL names, whatever its driver (sync and asyncio alike)."""
    return url.set(drivername=url.get_backend_name())


_CURRENT: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "outbox_scope", default=None)


def _runner() -> object:
    """What runs the code here: the asyncio task, else the thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        task = None
    return task if task is not None else threading.get_ident()


def current_scope() -> Scope | None:
    """The scope whose user code is running in this context, if any.

    A context copied into another thread or task (``asyncio.create_task``,
    ``run_in_executor``) still names its parent's scope: while that scope is open,
    code there can neither join it (a session is not shared across tasks or
    threads) nor commit apart from it, so that is refused; once it has ended, code
    there runs transactions of its own.
    """
    scope = _CURRENT.get()
    if scope is None or scope.runner is None:
        return None
    if scope.runner != _runner():
        raise MisuseError(
            f"a call in another thread or task while the transaction of {scope.owner} is "
            "open: it cannot join that transaction, and committing on its own would break "
            "the outer call's all-or-nothing. Call it in the same task, or after the outer "
            "call returns"
        )
    return scope


def open_on(session: Session) -> bool:
    """Whether the user code of a scope on ``session`` runs in this context."""
    scope = _CURRENT.get()
    return scope is not None and scope.runner is not None and scope.session is session


class Scope:
    """One local transaction and the tickets of the messages that joined it.

    ``owned`` scopes are opened and committed by the framework, which refuses the
    user code's own commit, rollback or close of the session. A caller-owned scope
    (``Outbox.send`` on the caller's session) follows the session's commit through
    session events.
    """

    __slots__ = ("_committing", "_savepoints", "owned", "owner", "runner", "session", "tickets",
                 "url", "user_session")

    def __init__(self, session: Session, user_session: Any, *, url: URL, owner: str,
                 owned: bool) -> None:
        self.session = session          # the sync Session (an AsyncSession's sync_session)
        self.user_session = user_session  # what user code is given
        self.url = url
        self.owner = owner
        self.owned = owned
        self.tickets: list[Ticket] = []
        self._savepoints: list[SessionTransaction | None] = []
        self._committing = False
        self.runner: object | None = None  # the task or thread of the user code running
        session.info[SCOPE_KEY] = self

    @property
    def is_async(self) -> bool:
        return self.user_session is not self.session

    # -- user code -------------------------------------------------------------------

    @contextmanager
    def user_code(self) -> Iterator[None]:
        """While user code runs: nested calls join this scope, and the session refuses
        commit, rollback and close."""
        info = self.session.info
        info[GUARD_KEY] = self.owner
        self.runner = _runner()
        token = _CURRENT.set(self)
        try:
            yield
        finally:
            _CURRENT.reset(token)
            self.runner = None
            info.pop(GUARD_KEY, None)

    def check_join(self, url: URL, is_async: bool, what: str) -> None:
        """Refuse a nested call that cannot join this transaction."""
        if is_async != self.is_async:
            kind = "an async" if is_async else "a sync"
            raise MisuseError(
                f"{what} is {kind} call inside {'an async' if self.is_async else 'a sync'} "
                f"transaction of {self.owner}; it cannot join it, and running on its own "
                "would commit apart from the outer work. Use the same model for both"
            )
        if url != self.url:
            raise MisuseError(
                f"{what} writes to another database than the open transaction of "
                f"{self.owner}; it cannot join it, and committing on its own would leave its "
                "message behind if the outer work rolls back. Call it after the outer commit"
            )

    # -- the messages ----------------------------------------------------------------

    def attach(self, ticket: Ticket) -> Sequence[Record]:
        """Add ``ticket``; returns the records the driver writes now."""
        self.tickets.append(ticket)
        # A ticket written inside a savepoint goes if that savepoint rolls back.
        self._savepoints.append(self.session.get_nested_transaction())
        return ticket.records

    def detach(self, ticket: Ticket) -> None:
        """Take back a ticket whose record could not be written."""
        for i, t in enumerate(self.tickets):
            if t is ticket:
                del self.tickets[i]
                del self._savepoints[i]
                _quietly(ticket.rolled_back)
                return

    def savepoint_rolled_back(self, savepoint: SessionTransaction) -> None:
        """Roll back the tickets written inside ``savepoint`` (or a savepoint in it)."""
        keep: list[Ticket] = []
        keep_sp: list[SessionTransaction | None] = []
        for ticket, sp in zip(self.tickets, self._savepoints, strict=True):
            t = sp
            while t is not None and t is not savepoint:
                t = t.parent
            if t is None:
                keep.append(ticket)
                keep_sp.append(sp)
            else:
                _quietly(ticket.rolled_back)
        self.tickets, self._savepoints = keep, keep_sp

    def before_commit(self) -> None:
        misuse = self.session.info.pop(MISUSE_KEY, None)
        if misuse is not None:
            raise MisuseError(
                f"{self.owner} called session.{misuse} although the framework owns the "
                "session; nothing of the call was committed"
            )
        for ticket in self.tickets:
            ticket.before_commit()
        self._committing = True

    def _take(self) -> list[Ticket]:
        tickets, self.tickets, self._savepoints = self.tickets, [], []
        self._committing = False
        return tickets

    def committed(self) -> None:
        for ticket in self._take():
            _quietly(ticket.committed)
            message = getattr(ticket, "message", None)
            if instrument.observers and message is not None:
                instrument.emit(instrument.WRITTEN, topic=message.topic,
                                message_id=message.id, key=message.key,
                                headers=message.headers)

    def rolled_back(self) -> None:
        for ticket in self._take():
            _quietly(ticket.rolled_back)

    def unknown(self) -> None:
        """A caller-owned session's COMMIT failed midway: each ticket leaves its message
        to what the database holds (a half message to the broker's check-back)."""
        for ticket in self._take():
            _quietly(ticket.unknown)

    def failed(self, exc: BaseException) -> BaseException:
        """The transaction did not commit: what the caller gets."""
        self.session.info.pop(MISUSE_KEY, None)
        if self._committing and isinstance(exc, SQLAlchemyError | asyncio.CancelledError):
            # The COMMIT itself failed (or was cancelled): it may or may not have
            # reached the disk.
            errors = [e for e in (t.unknown() for t in self._take()) if e is not None]
            return errors[0] if errors else exc
        self.rolled_back()
        return exc


def _quietly(fn: Callable[[], object]) -> None:
    # After the outcome is durable, a follow-up that fails (a lost end-transaction
    # call, say) is settled by the broker's check-back or a guard row: never raise.
    try:
        fn()
    except Exception as exc:
        log.warning("outbox_after_outcome_failed", error=f"{type(exc).__name__}: {exc}")


def outcome_unknown(message_id: str) -> TransactionOutcomeUnknown:
    return TransactionOutcomeUnknown(
        f"the commit of message {message_id}'s local transaction failed midway; the "
        "broker's check-back will deliver or drop the message to match what the "
        "database holds"
    )


# -- the sync driver ------------------------------------------------------------------

R = TypeVar("R")


def run_owned(
    session_factory: Callable[[], Session], *, identity: URL, owner: str,
    ticket: Ticket | None, lock: Executable | None, work: Callable[[Session], R],
    explain: Callable[[BaseException], BaseException],
) -> R:
    """Open, lock, run the user code, write the ticket's record, commit; then follow up.

    The one sync sequence of a transaction the framework owns (``aio/app.py`` awaits the
    same steps). ``ticket`` was prepared before (a half message is already sent); a
    consumer's transaction has none of its own, only what its handler sends.
    """
    with session_factory() as session:
        scope = Scope(session, session, url=identity, owner=owner, owned=True)
        records = scope.attach(ticket) if ticket is not None else ()
        try:
            with session.begin():
                if lock is not None:
                    session.execute(lock)
                with scope.user_code():
                    result = work(session)
                if ticket is not None:
                    write_records(session, records, ticket)
                scope.before_commit()
        except BaseException as exc:
            error = explain(scope.failed(exc))
            if error is exc:
                raise
            # A missing-table explanation hides the driver's text (it may quote the URL).
            raise error from (exc if isinstance(error, TransactionOutcomeUnknown) else None)
    scope.committed()
    return result


def write_records(session: Session, records: Sequence[Record], ticket: Ticket) -> None:
    """Write a ticket's durable records; a reused message id is a DuplicateMessageError."""
    try:
        for statement, params in records:
            session.execute(statement, params)
    except IntegrityError:
        raise ticket.duplicate() from None


# -- SQLite's single writer ----------------------------------------------------------


def write_lock_statement(dialect: str, table: Table) -> Executable | None:
    """On SQLite, a no-op UPDATE that takes the write lock as the first statement.

    SQLite's Python drivers begin a transaction only at the first write, so reads
    before it see no consistent snapshot; this makes the whole transaction one
    serialized write transaction. Other databases lock rows instead.
    """
    if dialect != "sqlite":
        return None
    col = next(iter(table.primary_key.columns))
    return table.update().where(col.is_(None)).values({col.name: col})
