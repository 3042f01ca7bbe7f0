"""The application object, the ``@transactional_message`` decorator, ``send`` on the
caller's session, and the local outbox adapter."""

from __future__ import annotations

import datetime as dt
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from sqlalchemy import Connection, Engine, Executable, Table
from sqlalchemy import inspect as inspect_db
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from .codec import JsonCodec
from .db import safe_url
from .decorator import (
    RANDOM_ID,
    MessageSpec,
    build_message,
    check_function_kind,
    check_options,
)
from .errors import ConfigurationError, MissingTableError, MisuseError
from .log import get_logger
from .message import Message
from .relay import Relay, RelayConfig
from .schema import outbox_messages
from .scope import (
    SCOPE_KEY,
    Record,
    Scope,
    Ticket,
    current_scope,
    database_identity,
    open_on,
    run_owned,
    write_lock_statement,
    write_records,
)
from .sessions import caller_scope, guarded_class
from .storage import duplicate_id, insert_message
from .transaction import DEFAULT_LOCAL_TRANSACTION_TIMEOUT, SqlAlchemyTransactionListener
from .typing import Codec, Publisher

log = get_logger("outbox")

R = TypeVar("R")


class DeliveryAdapter(Protocol):
    """How a message leaves: the local outbox, RocketMQ half messages, ...

    ``prepare`` is called before the message joins a transaction (a half message is
    sent here) and returns the :class:`~outbox.scope.Ticket` that writes the durable
    record in the transaction and follows its outcome.
    """

    def prepare(self, outbox: Any, message: Message) -> Ticket: ...


@runtime_checkable
class TopicRegistry(Protocol):
    """Optional ability of a delivery adapter: learn, when a function is decorated,
    which database produces a topic (to answer the broker's check-backs)."""

    def register(self, topic: str, outbox: Any) -> None: ...


class LocalTicket:
    """An outbox row in the transaction; after the commit, the relays are nudged."""

    __slots__ = ("message", "nudge", "records")

    def __init__(self, message: Message, nudge: Callable[[], None],
                 due_at: dt.datetime | None = None) -> None:
        self.message = message
        self.nudge = nudge
        self.records: Sequence[Record] = (insert_message(message, due_at=due_at),)

    def before_commit(self) -> None:
        pass

    def committed(self) -> None:
        log.debug("outbox_message_committed", **self.message.log_fields())
        self.nudge()

    def rolled_back(self) -> None:
        pass

    def unknown(self) -> BaseException | None:
        return None  # the row and the change are one transaction: the database's error

    def duplicate(self) -> BaseException:
        return duplicate_id(self.message)


class LocalOutbox:
    """Writes the message as an outbox row in the business transaction.

    One INSERT is added to the transaction and nothing else; a relay publishes the
    row after the commit. The business operation never waits for a broker.
    """

    def prepare(self, outbox: Any, message: Message) -> Ticket:
        return LocalTicket(message, outbox.notify_committed)

    async def aprepare(self, outbox: Any, message: Message) -> Ticket:
        return LocalTicket(message, outbox.notify_committed)


def missing_tables_error(url: URL, existing: set[str], tables: Sequence[Table]
                         ) -> MissingTableError | None:
    missing = [t.name for t in tables if t.name not in existing]
    if not missing:
        return None
    return MissingTableError(
        f"table(s) {', '.join(missing)} missing in {safe_url(url)}; create them with  "
        "outbox migrate --db URL  (or alembic upgrade outbox@head, or "
        "outbox.metadata.create_all(engine))"
    )


#: Given a database's URL and its table names, the error a missing table means (or None).
Explain = Callable[[URL, set[str]], BaseException | None]


def explain_missing(engine: Engine, exc: BaseException, explain: Explain) -> BaseException:
    """A database error as the user should see it when the cause is a missing table;
    else ``exc`` itself. Looked at only after a failure: the write path pays nothing."""
    if not isinstance(exc, DBAPIError):
        return exc
    try:
        existing = set(inspect_db(engine).get_table_names())
    except DBAPIError:
        return exc
    return explain(engine.url, existing) or exc


class BaseOutbox:
    """What the sync :class:`Outbox` and the asyncio ``AsyncOutbox`` share."""

    delivery: Any
    url: URL

    def __init__(self, *, delivery: Any, codec: Codec | None, url: URL, dialect: str) -> None:
        self.delivery = delivery if delivery is not None else LocalOutbox()
        self.codec: Codec = codec if codec is not None else JsonCodec()
        self.url = url
        self.identity = database_identity(url)
        self.dialect = "mysql" if dialect == "mariadb" else dialect
        self._wakeups: list[Any] = []
        self._lock = threading.Lock()

    def subscribe_commits(self, event_: Any) -> None:
        """Call ``event_.set()`` after every local commit that wrote an outbox row
        (a ``threading.Event`` or ``asyncio.Event``: the relay's nudge)."""
        with self._lock:
            self._wakeups.append(event_)

    def notify_committed(self) -> None:
        for wakeup in self._wakeups:
            wakeup.set()

    def message(
        self, *, topic: str, payload: Any, key: str | int | None = None,
        message_id: str | int | None = None, tag: str | None = None,
        headers: Mapping[str, str] | None = None, deliver_at: dt.datetime | None = None,
        deliver_after: dt.timedelta | None = None,
    ) -> Message:
        """The message ``send`` would write: ``payload`` encoded with this codec."""
        check_options(topic, None)
        return build_message(self.codec, topic=topic, body=payload, key=key,
                             message_id=RANDOM_ID if message_id is None else message_id,
                             tag=tag, headers=headers, deliver_at=deliver_at,
                             deliver_after=deliver_after)

    def _scope_for(self, session: Session, user_session: Any, what: str) -> Scope:
        """The scope a message sent on ``session`` joins: the framework's open one, or
        the caller's own session's (whose commit it then follows)."""
        is_async = user_session is not session
        active = current_scope() if open_on(session) else None
        if active is not None:
            active.check_join(self.identity, is_async, what)
            return active
        found = session.info.get(SCOPE_KEY)
        if isinstance(found, Scope):
            if found.owned:
                # The framework's session of a call that has returned: nothing would
                # commit the message, or follow its commit.
                raise MisuseError(
                    f"{what} got the session of {found.owner} after that call ended; send "
                    "inside the call, or on a session of your own")
            return found
        bind = session.get_bind()
        url = bind.engine.url if isinstance(bind, Connection) else bind.url
        if database_identity(url) != self.identity:
            raise MisuseError(
                f"{what} got a session of {safe_url(url)}, but this outbox writes to "
                f"{safe_url(self.url)}; send on a session of the outbox's own database"
            )
        return caller_scope(session, user_session, self.identity)

    def _register(self, topic: str) -> None:
        if isinstance(self.delivery, TopicRegistry):
            self.delivery.register(topic, self)

    def _lock_statement(self) -> Executable | None:
        return write_lock_statement(self.dialect, outbox_messages)


class Outbox(BaseOutbox):
    """One service's database, delivery adapter and codec (sync; see ``AsyncOutbox``).

    ``bind`` is an Engine or a ``sessionmaker``. ``delivery`` defaults to the local
    outbox; switching to another adapter needs no change in decorated functions.
    """

    def __init__(
        self,
        bind: Engine | sessionmaker[Session],
        *,
        delivery: DeliveryAdapter | None = None,
        codec: Codec | None = None,
        local_transaction_timeout: dt.timedelta = DEFAULT_LOCAL_TRANSACTION_TIMEOUT,
    ) -> None:
        if isinstance(bind, Engine):
            factory = sessionmaker(bind, class_=guarded_class(Session), expire_on_commit=False)
        elif isinstance(bind, sessionmaker):
            factory = sessionmaker(class_=guarded_class(bind.class_), **bind.kw)
        else:
            raise ConfigurationError(
                f"Outbox needs a SQLAlchemy Engine or sessionmaker, got {type(bind).__name__}; "
                "create one with outbox.create_engine(url) (for an AsyncEngine use AsyncOutbox)"
            )
        self.session_factory: sessionmaker[Session] = factory
        engine = factory.kw.get("bind")
        url = engine.url if isinstance(engine, Engine) else URL.create("unbound")
        dialect = engine.dialect.name if isinstance(engine, Engine) else "unbound"
        super().__init__(delivery=delivery, codec=codec, url=url, dialect=dialect)
        self.listener = SqlAlchemyTransactionListener(
            self.session_factory, timeout=local_transaction_timeout
        )

    @property
    def engine(self) -> Engine:
        bind = self.session_factory.kw.get("bind")
        if not isinstance(bind, Engine):
            raise ConfigurationError("this Outbox's sessionmaker is not bound to an Engine")
        return bind

    def explain_failure(self, exc: BaseException, *tables: Table) -> BaseException:
        """A database error as the user should see it: when the cause is a missing
        outbox table, an error that says how to create it; else ``exc`` itself.

        Looked at only after a failure, so the write path pays nothing for it.
        """
        bind = self.session_factory.kw.get("bind")
        if not isinstance(bind, Engine):
            return exc
        needed = tables or getattr(self.delivery, "tables", (outbox_messages,))
        return explain_missing(
            bind, exc, lambda url, existing: missing_tables_error(url, existing, needed))

    def relay(self, publisher: Publisher, config: RelayConfig | None = None) -> Relay:
        """A relay on this outbox's database, nudged right after each local commit."""
        relay = Relay(self.engine, publisher, config)
        self.subscribe_commits(relay.wakeup)
        return relay

    # -- the caller's own session ------------------------------------------------------

    def send(
        self, session: Session, *, topic: str, payload: Any, key: str | int | None = None,
        message_id: str | int | None = None, tag: str | None = None,
        headers: Mapping[str, str] | None = None, deliver_at: dt.datetime | None = None,
        deliver_after: dt.timedelta | None = None,
    ) -> Message:
        """Add a message to ``session``'s transaction: it is sent if and only if that
        transaction commits. Works on any session of this outbox's database: the
        caller's own (a web framework's, a repository's), the one a decorated
        function or a consumer's handler is given. Returns the message.

        ``deliver_at`` (an aware datetime) or ``deliver_after`` (a timedelta from now),
        not both, holds the message back until then: nothing delivers it earlier. A
        time already past means at once."""
        if not isinstance(session, Session):
            raise MisuseError(
                f"Outbox.send needs a sync SQLAlchemy Session, got {type(session).__name__}; "
                "for an AsyncSession use  await AsyncOutbox(...).send(session, ...)"
            )
        message = self.message(topic=topic, payload=payload, key=key, message_id=message_id,
                               tag=tag, headers=headers, deliver_at=deliver_at,
                               deliver_after=deliver_after)
        scope = self._scope_for(session, session, "Outbox.send")
        self._register(topic)
        self._join(scope, message, session)
        return message

    def _join(self, scope: Scope, message: Message, session: Session) -> None:
        """Attach ``message`` to an open transaction and write its record now."""
        ticket = self.delivery.prepare(self, message)
        try:
            write_records(session, scope.attach(ticket), ticket)
        except BaseException:
            scope.detach(ticket)
            raise

    # -- the decorated call -------------------------------------------------------------

    def call(self, spec: MessageSpec, fn: Callable[..., R], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> R:
        """Run ``fn(session, *args, **kwargs)`` and its message in one transaction."""
        bound = spec.bind(args, kwargs)
        message = spec.message(self.codec, bound)
        active = current_scope()
        if active is not None:  # a nested call, or a call from a handler: join
            active.check_join(self.identity, False, spec.name)
            result = fn(active.user_session, *bound.args, **bound.kwargs)
            self._join(active, message, active.session)
            return result
        return run_owned(
            self.session_factory, identity=self.identity, owner=spec.name,
            ticket=self.delivery.prepare(self, message), lock=self._lock_statement(),
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
    ) -> Callable[[Callable[..., R]], Callable[..., R]]:
        """See :func:`transactional_message`."""
        return transactional_message(
            self, topic=topic, payload=payload, key=key, message_id=message_id,
            tag=tag, headers=headers, deliver_at=deliver_at, deliver_after=deliver_after,
        )


def transactional_message(
    outbox: Outbox,
    *,
    topic: str,
    payload: Callable[..., Any] | None = None,
    key: str | Callable[..., Any] | None = None,
    message_id: str | Callable[..., Any] | None = None,
    tag: str | None = None,
    headers: Mapping[str, str] | None = None,
    deliver_at: str | Callable[..., dt.datetime | None] | None = None,
    deliver_after: dt.timedelta | str | Callable[..., dt.timedelta | None] | None = None,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorate ``fn(session, *args, **kwargs)`` so its database work and a message
    commit together or not at all.

    The caller calls ``fn(*args, **kwargs)`` without the session: the framework
    opens one, runs ``fn``, and makes the message durable in the same transaction
    (how depends on ``outbox.delivery``). If ``fn`` raises, everything rolls back,
    nothing is sent and the exception reaches the caller. Called from inside another
    decorated function or a consumer's handler, it joins that transaction instead.
    ``fn`` must not commit, roll back or close the session (that raises MisuseError
    and nothing is committed).

    The message is built from the call's arguments before the transaction runs:
    ``payload(*args, **kwargs)`` gives the body (default: the arguments by name),
    ``key`` and ``message_id`` are a parameter name or a callable. A deterministic
    ``message_id`` (say, a transfer number) makes the consumer's de-duplication
    follow your business key.

    ``deliver_after`` (one ``timedelta`` for every call, or a parameter name or a
    callable giving each call's) or ``deliver_at`` (a parameter name or a callable
    giving an aware datetime), not both, holds the message back: nothing delivers it
    before then. None, or a time already past, means at once.
    """
    check_options(topic, payload)

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        check_function_kind(fn, is_async=False, decorator="Outbox.transactional_message")
        spec = MessageSpec(fn, topic=topic, payload=payload, key=key, message_id=message_id,
                           tag=tag, headers=headers, deliver_at=deliver_at,
                           deliver_after=deliver_after)
        outbox._register(topic)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            return outbox.call(spec, fn, args, kwargs)

        wrapper.__signature__ = spec.signature  # type: ignore[attr-defined]
        return wrapper

    return decorate
