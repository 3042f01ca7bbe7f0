"""How a decorated function's call becomes a message: checked once when decorating,
built on every call before any I/O. Shared by the sync and the asyncio decorator."""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from . import instrument
from .envelope import CREATED_AT_HEADER, DELIVER_AT_HEADER, check_user_headers, format_utc
from .errors import ConfigurationError, MessageError, MisuseError
from .message import Message
from .schema import utcnow
from .typing import Codec

Spec = str | Callable[..., Any] | None
#: The decorator's ``deliver_after``: one delay for every call, or a parameter name or a
#: callable giving each call's (a timedelta, or None for "at once").
DelaySpec = dt.timedelta | str | Callable[..., Any] | None


def check_function_kind(fn: Callable[..., Any], *, is_async: bool, decorator: str) -> None:
    """Refuse, when decorating, a function the decorator could not run to completion.

    A sync decorator would commit the outbox row of a coroutine or generator function
    without ever running its body; an async one cannot await a plain function.
    """
    target = inspect.unwrap(fn)
    name = getattr(fn, "__qualname__", repr(fn))
    if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
        raise MisuseError(
            f"{decorator} cannot decorate the generator {name}: its body would run only "
            "when iterated, after the transaction. Make it a plain function that returns"
        )
    if inspect.iscoroutinefunction(target) and not is_async:
        raise MisuseError(
            f"{decorator} is the sync decorator and {name} is an async def; decorate it "
            "with AsyncOutbox(async_engine).transactional_message instead"
        )
    if is_async and not inspect.iscoroutinefunction(target):
        raise MisuseError(
            f"{decorator} is the asyncio decorator and {name} is not an async def; "
            "decorate it with Outbox(engine).transactional_message instead"
        )


def _argument_getter(
    what: str, spec: Spec, params: Mapping[str, inspect.Parameter]
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


def as_text(what: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise MessageError(f"message {what} must be a str or int, got {type(value).__name__}")


def check_delay(what: str, value: Any) -> dt.timedelta | None:
    """A ``deliver_after`` value: a timedelta of zero or more, or None."""
    if value is None:
        return None
    if not isinstance(value, dt.timedelta):
        raise MessageError(
            f"{what} must be a datetime.timedelta (e.g. timedelta(minutes=5)), got "
            f"{type(value).__name__}")
    if value < dt.timedelta(0):
        raise MessageError(f"{what} must not be negative, got {value!r}; "
                           "pass timedelta(0) or None to deliver at once")
    return value


def check_instant(what: str, value: Any) -> dt.datetime | None:
    """A ``deliver_at`` value: an aware datetime, or None."""
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        raise MessageError(
            f"{what} must be a datetime.datetime with a time zone, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise MessageError(
            f"{what}={value.isoformat()} is a naive datetime, whose time zone nobody knows; "
            "pass an aware one, e.g. datetime.now(UTC) + timedelta(minutes=5) or "
            "value.replace(tzinfo=ZoneInfo(...))")
    return value


def delivery_at(now: dt.datetime, deliver_at: Any = None, deliver_after: Any = None
                ) -> dt.datetime | None:
    """When a message built at ``now`` (naive UTC) may be delivered, as naive UTC; None
    for "at once" (nothing asked, or a time not after ``now``). ``deliver_at`` (an aware
    datetime) and ``deliver_after`` (a timedelta from ``now``) exclude each other."""
    at = check_instant("deliver_at", deliver_at)
    after = check_delay("deliver_after", deliver_after)
    if at is not None and after is not None:
        raise MessageError("give deliver_at or deliver_after, not both")
    try:
        if at is not None:
            due = at.astimezone(dt.UTC).replace(tzinfo=None)
        elif after is not None:
            due = now + after
        else:
            return None
    except OverflowError:
        raise MessageError("the delivery time asked for is after the year 9999") from None
    return due if due > now else None


#: ``build_message(message_id=RANDOM_ID)``: give the message a fresh random id.
RANDOM_ID: Any = object()


def build_message(
    codec: Codec, *, topic: str, body: Any, key: Any = None, message_id: Any = RANDOM_ID,
    tag: str | None = None, headers: Mapping[str, str] | None = None,
    deliver_at: Any = None, deliver_after: Any = None,
) -> Message:
    """The message for ``body``, stamped with its creation time (for check-backs) and,
    when asked for a later delivery, with its delivery time (``outbox-deliver-at``)."""
    check_user_headers(headers)
    now = utcnow()
    msg_headers = {**(headers or {}), CREATED_AT_HEADER: format_utc(now)}
    if instrument.observers:  # a trace context, where an observer writes one
        msg_headers = {**instrument.context_headers(), **msg_headers}
    if deliver_at is not None or deliver_after is not None:
        due = delivery_at(now, deliver_at, deliver_after)
        if due is not None:
            msg_headers[DELIVER_AT_HEADER] = format_utc(due)
    key_text = as_text("key", key)
    if message_id is RANDOM_ID:
        return Message(topic=topic, payload=codec.encode(body), key=key_text, tag=tag,
                       headers=msg_headers)
    id_text = as_text("id", message_id)
    return Message(topic=topic, payload=codec.encode(body), key=key_text, tag=tag,
                   headers=msg_headers, id=id_text)  # type: ignore[arg-type]


class MessageSpec:
    """What the decorator was told: topic, and how to take payload, key and id from the
    call. Checked against the function's signature when decorating."""

    def __init__(
        self, fn: Callable[..., Any], *, topic: str, payload: Callable[..., Any] | None,
        key: Spec, message_id: Spec, tag: str | None, headers: Mapping[str, str] | None,
        deliver_at: Spec = None, deliver_after: DelaySpec = None,
    ) -> None:
        params = list(inspect.signature(fn).parameters.values())
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
        ):
            raise ConfigurationError(
                f"{fn.__qualname__} must take the session as its first positional parameter"
            )
        self.name = fn.__qualname__
        self.topic = topic
        self.signature = inspect.Signature(params[1:])
        by_name = {p.name: p for p in params[1:]}
        self._payload = payload
        self._key = _argument_getter("key", key, by_name)
        self._id = _argument_getter("message_id", message_id, by_name)
        self._tag = tag
        try:
            check_user_headers(headers)  # refused when decorating, not at the first call
        except MessageError as exc:
            raise ConfigurationError(str(exc)) from None
        self._headers = dict(headers or {})
        self._deliver_at, self._deliver_after = _delivery_getters(deliver_at, deliver_after,
                                                                  by_name)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        bound.apply_defaults()
        return bound

    def message(self, codec: Codec, bound: inspect.BoundArguments) -> Message:
        body = self._payload(*bound.args, **bound.kwargs) if self._payload else dict(
            bound.arguments)
        return build_message(
            codec, topic=self.topic, body=body,
            key=self._key(bound) if self._key else None,
            message_id=self._id(bound) if self._id else RANDOM_ID,
            tag=self._tag, headers=self._headers,
            deliver_at=self._deliver_at(bound) if self._deliver_at else None,
            deliver_after=self._deliver_after(bound) if self._deliver_after else None,
        )


def _delivery_getters(
    deliver_at: Spec, deliver_after: DelaySpec, params: Mapping[str, inspect.Parameter]
) -> tuple[Callable[[inspect.BoundArguments], Any] | None,
           Callable[[inspect.BoundArguments], Any] | None]:
    """The decorator's ``deliver_at`` and ``deliver_after``, checked when decorating."""
    if deliver_at is not None and deliver_after is not None:
        raise ConfigurationError(
            "give transactional_message deliver_at or deliver_after, not both")
    if isinstance(deliver_at, dt.datetime):
        raise ConfigurationError(
            "deliver_at of a decorator would be the same instant for every call; pass a "
            "parameter name or a callable giving each call's time, or deliver_after="
            "timedelta(...) for a fixed delay")
    if isinstance(deliver_after, dt.timedelta):
        try:
            delay = check_delay("deliver_after", deliver_after)
        except MessageError as exc:
            raise ConfigurationError(str(exc)) from None
        return None, lambda _bound: delay
    if deliver_after is not None and not isinstance(deliver_after, str) \
            and not callable(deliver_after):
        raise ConfigurationError(
            "deliver_after must be a timedelta, a parameter name or a callable, got "
            f"{deliver_after!r}")
    return (_argument_getter("deliver_at", deliver_at, params),
            _argument_getter("deliver_after", deliver_after, params))


def check_options(topic: object, payload: object) -> None:
    if not isinstance(topic, str) or not topic:
        raise ConfigurationError("transactional_message needs a non-empty topic")
    if payload is not None and not callable(payload):
        raise ConfigurationError("payload must be a callable taking the function's arguments")

