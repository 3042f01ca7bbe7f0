"""The application object, the ``@transactional_message`` decorator and the local outbox."""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

import structlog
from sqlalchemy import Engine, Table
from sqlalchemy import inspect as inspect_db
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from .codec import JsonCodec
from .db import lock_for_writing, safe_url
from .errors import ConfigurationError, MessageError
from .message import Message
from .relay import Relay, RelayConfig
from .schema import outbox_messages, utcnow
from .storage import add_message
from .transaction import (
    CREATED_AT_HEADER,
    DEFAULT_LOCAL_TRANSACTION_TIMEOUT,
    LocalWork,
    SqlAlchemyTransactionListener,
)
from .typing import Codec, Publisher

log = structlog.get_logger("outbox")

P = ParamSpec("P")
R = TypeVar("R")


class DeliveryAdapter(Protocol):
    """How a decorated call's message leaves: the local outbox, RocketMQ, ...

    ``send`` runs ``work`` in a local transaction together with whatever makes the
    message durable, and returns the work's result or raises its exception.
    """

    def send(self, outbox: Outbox, message: Message, work: LocalWork) -> Any: ...


@runtime_checkable
class TopicRegistry(Protocol):
    """Optional ability of a delivery adapter: learn, when a function is decorated,
    which database produces a topic (to answer the broker's check-backs)."""

    def register(self, topic: str, outbox: Outbox) -> None: ...


class LocalOutbox:
    """Writes the message as an outbox row in the business transaction.

    One INSERT is added to the transaction and nothing else; a relay publishes the
    row after the commit. The business operation never waits for a broker.
    """

    def send(self, outbox: Outbox, message: Message, work: LocalWork) -> Any:
        try:
            with outbox.session_factory() as session, session.begin():
                lock_for_writing(session.connection(), outbox_messages)
                work.run(session)
                add_message(session, message)
        except DBAPIError as exc:
            error = outbox.explain_failure(exc, outbox_messages)
            if error is exc:
                raise
            raise error from None
        log.debug("outbox_message_committed", **message.log_fields())
        outbox.notify_committed()
        return work.result


class Outbox:
    """One service's database, delivery adapter and codec.

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
            self.session_factory: sessionmaker[Session] = sessionmaker(bind, expire_on_commit=False)
        elif isinstance(bind, sessionmaker):
            self.session_factory = bind
        else:
            raise ConfigurationError(
                f"Outbox needs a SQLAlchemy Engine or sessionmaker, got {type(bind).__name__}; "
                "create one with outbox.create_engine(url)"
            )
        self.delivery: DeliveryAdapter = delivery if delivery is not None else LocalOutbox()
        self.codec: Codec = codec if codec is not None else JsonCodec()
        self.listener = SqlAlchemyTransactionListener(
            self.session_factory, timeout=local_transaction_timeout
        )
        self._wakeups: list[threading.Event] = []
        self._lock = threading.Lock()

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
        if not isinstance(exc, DBAPIError) or not isinstance(bind, Engine):
            return exc
        try:
            existing = set(inspect_db(bind).get_table_names())
        except DBAPIError:
            return exc
        missing = [t.name for t in tables if t.name not in existing]
        if not missing:
            return exc
        return ConfigurationError(
            f"table(s) {', '.join(missing)} missing in {safe_url(bind.url)}; create them "
            "with  outbox migrate --db URL  (or alembic upgrade outbox@head, or "
            "outbox.metadata.create_all(engine))"
        )

    def subscribe_commits(self, event: threading.Event) -> None:
        """Set ``event`` after every local commit that wrote an outbox row (relay nudge)."""
        with self._lock:
            self._wakeups.append(event)

    def notify_committed(self) -> None:
        with self._lock:
            events = list(self._wakeups)
        for event in events:
            event.set()

    def relay(self, publisher: Publisher, config: RelayConfig | None = None) -> Relay:
        """A relay on this outbox's database, nudged right after each local commit."""
        relay = Relay(self.engine, publisher, config)
        self.subscribe_commits(relay.wakeup)
        return relay

    def transactional_message(
        self,
        *,
        topic: str,
        payload: Callable[..., Any] | None = None,
        key: str | Callable[..., Any] | None = None,
        message_id: str | Callable[..., Any] | None = None,
        tag: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Callable[[Callable[..., R]], Callable[..., R]]:
        """See :func:`transactional_message`."""
        return transactional_message(
            self, topic=topic, payload=payload, key=key, message_id=message_id,
            tag=tag, headers=headers,
        )


def _argument_getter(
    what: str, spec: str | Callable[..., Any] | None, params: Mapping[str, inspect.Parameter]
) -> Callable[[inspect.BoundArguments], Any] | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in params:
            raise ConfigurationError(
                f"{what}={spec!r} names no parameter of the decorated function; "
                f"parameters are {', '.join(params) or '(none)'}"
            )
        return lambda bound: bound.arguments[spec]
    if callable(spec):
        return lambda bound: spec(*bound.args, **bound.kwargs)
    raise ConfigurationError(f"{what} must be a parameter name or a callable, got {spec!r}")


def _as_text(what: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise MessageError(f"message {what} must be a str or int, got {type(value).__name__}")


def transactional_message(
    outbox: Outbox,
    *,
    topic: str,
    payload: Callable[..., Any] | None = None,
    key: str | Callable[..., Any] | None = None,
    message_id: str | Callable[..., Any] | None = None,
    tag: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorate ``fn(session, *args, **kwargs)`` so its database work and a message
    commit together or not at all.

    The caller calls ``fn(*args, **kwargs)`` without the session: the framework
    opens one, runs ``fn``, and makes the message durable in the same transaction
    (how depends on ``outbox.delivery``). If ``fn`` raises, everything rolls back,
    nothing is sent and the exception reaches the caller.

    The message is built from the call's arguments before the transaction runs:
    ``payload(*args, **kwargs)`` gives the body (default: the arguments by name),
    ``key`` and ``message_id`` are a parameter name or a callable. A deterministic
    ``message_id`` (say, a transfer number) makes the consumer's de-duplication
    follow your business key.
    """
    if not isinstance(topic, str) or not topic:
        raise ConfigurationError("transactional_message needs a non-empty topic")
    if payload is not None and not callable(payload):
        raise ConfigurationError("payload must be a callable taking the function's arguments")

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        if isinstance(outbox.delivery, TopicRegistry):
            outbox.delivery.register(topic, outbox)
        params = list(inspect.signature(fn).parameters.values())
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
        ):
            raise ConfigurationError(
                f"{fn.__qualname__} must take the session as its first positional parameter"
            )
        call_sig = inspect.Signature(params[1:])
        by_name = {p.name: p for p in params[1:]}
        get_key = _argument_getter("key", key, by_name)
        get_id = _argument_getter("message_id", message_id, by_name)
        static_headers = dict(headers or {})

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            try:
                bound = call_sig.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{fn.__qualname__}(): {exc}") from None
            bound.apply_defaults()
            body = payload(*bound.args, **bound.kwargs) if payload else dict(bound.arguments)
            msg_headers = {**static_headers, CREATED_AT_HEADER: utcnow().isoformat()}
            msg_kwargs: dict[str, Any] = {}
            if get_id is not None:
                msg_kwargs["id"] = _as_text("id", get_id(bound))
            message = Message(
                topic=topic, payload=outbox.codec.encode(body),
                key=_as_text("key", get_key(bound)) if get_key else None,
                tag=tag, headers=msg_headers, **msg_kwargs,
            )
            work = LocalWork(fn, bound.args, bound.kwargs)
            return outbox.delivery.send(outbox, message, work)  # type: ignore[no-any-return]

        wrapper.__signature__ = call_sig  # type: ignore[attr-defined]
        return wrapper

    return decorate
