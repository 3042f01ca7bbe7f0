"""The local transaction and its SQLAlchemy listener (execute and check-back)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .db import lock_for_writing
from .errors import TransactionRolledBack
from .message import Message, TransactionState
from .schema import transaction_log, utcnow
from .storage import add_message, duplicate_id

log = structlog.get_logger("outbox")

#: How long a local transaction may take before a missing log row means ROLLBACK.
DEFAULT_LOCAL_TRANSACTION_TIMEOUT = dt.timedelta(seconds=60)

#: Header holding the naive-UTC ISO time the message was built (before the transaction).
CREATED_AT_HEADER = "outbox-created-at"


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
        session_factory: sessionmaker[Session],
        *,
        timeout: dt.timedelta = DEFAULT_LOCAL_TRANSACTION_TIMEOUT,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.session_factory = session_factory
        self.timeout = timeout
        self.clock = clock

    def execute(
        self, message: Message, arg: Any, *, guard_until: dt.datetime | None = None
    ) -> TransactionState:
        """Run ``arg`` (a :class:`LocalWork`) with the log row in one transaction.

        With ``guard_until``, the message is also written as an outbox row due at
        that time: if the broker never delivers the half message, a relay will.
        """
        work: LocalWork = arg
        committing = False
        try:
            with self.session_factory() as session:
                transaction = session.begin()
                with transaction:
                    lock_for_writing(session.connection(), transaction_log)
                    work.run(session)
                    try:
                        session.execute(transaction_log.insert().values(
                            transaction_id=message.id, message_id=message.id,
                            topic=message.topic, created_at=self.clock(),
                        ))
                    except IntegrityError:
                        raise duplicate_id(message) from None
                    if guard_until is not None:
                        add_message(session, message, due_at=guard_until)
                    self._refuse_late_commit(message)
                    committing = True
        except Exception as exc:
            if work.exception is None:
                work.exception = exc
            if committing and isinstance(exc, SQLAlchemyError):
                # The commit itself failed: it may or may not have reached the disk.
                log.warning("local_transaction_outcome_unknown", error=type(exc).__name__,
                            **message.log_fields())
                return TransactionState.UNKNOWN
            return TransactionState.ROLLBACK
        return TransactionState.COMMIT

    def _refuse_late_commit(self, message: Message) -> None:
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
        with self.session_factory() as session:
            found = session.execute(
                select(transaction_log.c.transaction_id)
                .where(transaction_log.c.transaction_id == message.id)
            ).first()
        if found is not None:
            state = TransactionState.COMMIT
        else:
            created = message_created_at(message)
            if created is not None and self.clock() - created < self.timeout:
                state = TransactionState.UNKNOWN
            else:
                # Older than the timeout (or not stamped by us): it can never commit now.
                state = TransactionState.ROLLBACK
        log.info("check_back", state=state.value, **message.log_fields())
        return state


def message_created_at(message: Message) -> dt.datetime | None:
    """When the message was built, from the header every outbox message carries."""
    raw = message.headers.get(CREATED_AT_HEADER)
    if raw is None:
        return None
    try:
        return dt.datetime.fromisoformat(raw)
    except ValueError:
        return None
