"""The local transaction and its SQLAlchemy listener (execute and check-back)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, sessionmaker

from .envelope import CREATED_AT_HEADER as ENVELOPE_CREATED_AT
from .envelope import parse_utc
from .errors import MisuseError, TransactionOutcomeUnknown, TransactionRolledBack
from .log import get_logger
from .message import Message, TransactionState
from .schema import transaction_log, utcnow
from .scope import (
    Record,
    database_identity,
    outcome_unknown,
    run_owned,
    write_lock_statement,
)
from .storage import duplicate_id, insert_message

log = get_logger("outbox")

#: How long a local transaction may take before a missing log row means ROLLBACK.
DEFAULT_LOCAL_TRANSACTION_TIMEOUT = dt.timedelta(seconds=60)

#: Header holding the naive-UTC ISO time the message was built (before the transaction).
CREATED_AT_HEADER = ENVELOPE_CREATED_AT


class LocalWork:
    """The user's function bound to its call's arguments, run once inside a session.

    It remembers the function's result or exception so that the caller of the
    decorated function gets exactly what the function returned or raised.
    """

    __slots__ = ("_fn", "args", "exception", "kwargs", "ran", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self._fn = fn
        self.args = args
        self.kwargs = kwargs
        self.result: Any = None
        self.exception: BaseException | None = None
        self.ran = False

    def run(self, session: Session) -> Any:
        self.ran = True
        try:
            self.result = self._fn(session, *self.args, **self.kwargs)
        except BaseException as exc:
            self.exception = exc
            raise
        return self.result

    def outcome(self) -> Any:
        """Return the function's result, or raise what it raised."""
        if self.exception is not None:
            raise self.exception
        return self.result


class SqlAlchemyTransactionListener:
    """Runs the local transaction with a transaction-log row and answers check-backs.

    ``execute`` opens a session, runs the work, inserts the log row keyed by the
    message id, and commits, all in one database transaction. ``check`` reads the
    log: a row means COMMIT; no row and a message older than ``timeout`` means
    ROLLBACK (the transaction can no longer commit); otherwise UNKNOWN. It never
    answers UNKNOWN for ever, so the broker never silently discards a message that
    was in fact committed.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session] | AsyncEngine,
        *,
        timeout: dt.timedelta = DEFAULT_LOCAL_TRANSACTION_TIMEOUT,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        if isinstance(session_factory, AsyncEngine):
            self.session_factory: sessionmaker[Session] | None = None
            self.async_engine: AsyncEngine | None = session_factory
        else:
            self.session_factory, self.async_engine = session_factory, None
        self.timeout = timeout
        self.clock = clock

    def execute(
        self, message: Message, arg: Any, *, guard_until: dt.datetime | None = None
    ) -> TransactionState:
        """Run ``arg`` (a :class:`LocalWork`) with the log row in one transaction.

        With ``guard_until``, the message is also written as an outbox row due at
        that time (or at its delivery time, if later): if the broker never delivers
        the half message, a relay will.
        """
        work: LocalWork = arg
        if self.session_factory is None:
            raise MisuseError("execute runs sync work; this listener has an AsyncEngine")
        ticket = TransactionLogTicket(self, message, guard_until)
        bind = self.session_factory.kw.get("bind")
        dialect = bind.dialect.name if bind is not None else ""
        try:
            run_owned(
                self.session_factory,
                identity=database_identity(bind.url) if bind is not None else URL.create("-"),
                owner=getattr(work, "name", "the local transaction"), ticket=ticket,
                lock=write_lock_statement(dialect, transaction_log), work=work.run,
                explain=lambda exc: exc,
            )
        except TransactionOutcomeUnknown as exc:
            work.exception = work.exception or exc
            return TransactionState.UNKNOWN
        except Exception as exc:
            if work.exception is None:
                work.exception = exc
            return TransactionState.ROLLBACK
        return TransactionState.COMMIT

    def refuse_late_commit(self, message: Message) -> None:
        # A check-back answers ROLLBACK for a message older than the timeout without a
        # log row. Committing that late would leave the change without its message,
        # so a transaction past half the timeout rolls back instead: the other half
        # is the margin for the commit itself.
        created = message_created_at(message)
        if created is not None and self.clock() - created > self.timeout / 2:
            raise TransactionRolledBack(
                f"the local transaction for message {message.id} ran longer than half the "
                f"local-transaction timeout ({self.timeout.total_seconds():.0f} s) and was "
                "rolled back; raise Outbox(local_transaction_timeout=...) for longer work"
            )

    def check(self, message: Message) -> TransactionState:
        """Answer a check-back from the transaction log."""
        if self.session_factory is None:
            raise MisuseError("this listener reads through an AsyncEngine: await acheck()")
        now = self.clock()  # before the read: see decide()
        with self.session_factory() as session:
            found = session.execute(self.check_statement(message)).first()
        return self.decide(message, found is not None, now)

    async def acheck(self, message: Message) -> TransactionState:
        """:meth:`check` through the AsyncEngine of an ``AsyncOutbox``."""
        if self.async_engine is None:
            raise MisuseError("this listener reads through a sync sessionmaker: call check()")
        now = self.clock()  # before the read: see decide()
        async with self.async_engine.connect() as conn:
            found = (await conn.execute(self.check_statement(message))).first()
        return self.decide(message, found is not None, now)

    @staticmethod
    def check_statement(message: Message) -> Select[Any]:
        return select(transaction_log.c.transaction_id).where(
            transaction_log.c.transaction_id == message.id)

    def decide(self, message: Message, log_row_found: bool,
               now: dt.datetime | None = None) -> TransactionState:
        """The check-back's answer: COMMIT with a log row; without one, UNKNOWN while
        the transaction may still commit, ROLLBACK once it cannot.

        ``now`` is the time read *before* the log row was looked for. Read after it,
        a commit landing between the two reads would be taken for one that can never
        come: the row was absent, and by the later clock the timeout had passed, so the
        answer would be ROLLBACK for a committed transaction."""
        if log_row_found:
            state = TransactionState.COMMIT
        else:
            created = message_created_at(message)
            now = self.clock() if now is None else now
            if created is not None and now - created < self.timeout:
                state = TransactionState.UNKNOWN
            else:
                # Older than the timeout (or not stamped by us): it can never commit now.
                state = TransactionState.ROLLBACK
        log.info("check_back", state=state.value, **message.log_fields())
        return state


def message_created_at(message: Message) -> dt.datetime | None:
    """When the message was built, from the header every outbox message carries
    ("...Z" now; naive UTC in older rows)."""
    return parse_utc(message.headers.get(CREATED_AT_HEADER))


#: The transaction-log row's INSERT, built once.
INSERT_LOG_ROW = transaction_log.insert()


class TransactionLogTicket:
    """The transaction-log row of a half message in the local transaction.

    ``check`` answers the broker's check-back from that row. Before the commit, a
    transaction that ran past half the local-transaction timeout is refused (a
    check-back may already have answered ROLLBACK). ``guard_until`` also writes the
    message as an outbox row due then, or at the message's delivery time
    (``outbox-deliver-at``) if that is later (see the RocketMQ adapter's guard row).
    Subclasses (broker adapters) add what follows the commit.
    """

    __slots__ = ("listener", "message", "records")

    def __init__(self, listener: SqlAlchemyTransactionListener, message: Message,
                 guard_until: dt.datetime | None = None) -> None:
        self.listener = listener
        self.message = message
        log_row: Record = (INSERT_LOG_ROW, {
            "transaction_id": message.id, "message_id": message.id, "topic": message.topic,
            "created_at": listener.clock(),
        })
        if guard_until is None:
            self.records: Sequence[Record] = (log_row,)
        else:
            self.records = (log_row, insert_message(message, due_at=guard_until))

    def before_commit(self) -> None:
        self.listener.refuse_late_commit(self.message)

    def committed(self) -> None:
        pass

    def rolled_back(self) -> None:
        pass

    def unknown(self) -> BaseException | None:
        log.warning("local_transaction_outcome_unknown", **self.message.log_fields())
        return outcome_unknown(self.message.id)

    def duplicate(self) -> BaseException:
        return duplicate_id(self.message)
