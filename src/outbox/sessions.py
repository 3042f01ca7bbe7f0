"""The session the framework owns, and the caller's own session followed through its
events: the two ways a :class:`~outbox.scope.Scope` learns its transaction's outcome."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, SessionTransaction

from .errors import MisuseError
from .scope import GUARD_KEY, MISUSE_KEY, SCOPE_KEY, Scope

# -- the session the framework owns ----------------------------------------------------


def _refuse(session: Session, what: str) -> None:
    owner = session.info.get(GUARD_KEY)
    if owner is not None:
        session.info[MISUSE_KEY] = what
        raise MisuseError(
            f"{owner} must not call session.{what}: the framework commits when it returns, "
            "together with its messages, and rolls back when it raises. Nothing of this "
            "call is committed"
        )


class _Guard:
    """Mixed into the Session class of the framework's sessions."""

    def commit(self) -> None:
        _refuse(self, "commit()")  # type: ignore[arg-type]
        super().commit()  # type: ignore[misc]

    def rollback(self) -> None:
        _refuse(self, "rollback()")  # type: ignore[arg-type]
        super().rollback()  # type: ignore[misc]

    def close(self) -> None:
        _refuse(self, "close()")  # type: ignore[arg-type]
        super().close()  # type: ignore[misc]


class GuardedSession(_Guard, Session):
    """A Session that refuses commit, rollback and close while user code runs in a
    transaction the framework owns."""


_guarded: dict[type[Session], type[Session]] = {}


def guarded_class(cls: type[Session]) -> type[Session]:
    """``cls`` with the guard mixed in (a user's own Session subclass keeps its methods)."""
    if issubclass(cls, _Guard):
        return cls
    found = _guarded.get(cls)
    if found is None:
        found = GuardedSession if cls is Session else type(
            f"Guarded{cls.__name__}", (_Guard, cls), {})
        event.listen(found, "after_soft_rollback", _after_soft_rollback)
        _guarded[cls] = found
    return found


# -- following a session's outcome through its events --------------------------------


def caller_scope(session: Session, user_session: Any, identity: URL) -> Scope:
    """The scope of a session the caller owns and commits: its events drive the tickets."""
    scope = Scope(session, user_session, url=identity, owner="the caller", owned=False)
    event.listen(session, "before_commit", _before_commit)
    event.listen(session, "after_commit", _after_commit)
    event.listen(session, "after_transaction_end", _after_transaction_end)
    event.listen(session, "after_soft_rollback", _after_soft_rollback)
    return scope


def _scope(session: Session) -> Scope | None:
    scope = session.info.get(SCOPE_KEY)
    return scope if isinstance(scope, Scope) and scope.tickets else None


def _before_commit(session: Session) -> None:
    scope = _scope(session)
    if scope is not None and session.get_nested_transaction() is None:
        # Flush first: a flush error is a plain rollback, no COMMIT was sent. From here
        # on, a failure is the COMMIT's own, whose outcome is unknown.
        session.flush()
        scope.before_commit()


def _after_commit(session: Session) -> None:
    scope = _scope(session)
    if scope is not None:
        scope.committed()


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    scope = _scope(session)
    if scope is not None and transaction.parent is None:
        if scope._committing:
            scope.unknown()  # the COMMIT was sent and did not report success
        else:
            scope.rolled_back()  # the root ended without a commit: rollback, close, error


def _after_soft_rollback(session: Session, previous: SessionTransaction) -> None:
    scope = _scope(session)
    if scope is not None and previous.nested:
        scope.savepoint_rolled_back(previous)
