"""How a decorated function's call becomes a message: checked once when decorating,
built on every call before any I/O. Shared by the sync and the asyncio decorator."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from .envelope import CREATED_AT_HEADER, check_user_headers, format_utc
from .errors import ConfigurationError, MessageError, MisuseError
from .message import Message
from .schema import utcnow
from .typing import Codec

Spec = str | Callable[..., Any] | None


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


#: ``build_message(message_id=RANDOM_ID)``: give the message a fresh random id.
RANDOM_ID: Any = object()


def build_message(
    codec: Codec, *, topic: str, body: Any, key: Any = None, message_id: Any = RANDOM_ID,
    tag: str | None = None, headers: Mapping[str, str] | None = None,
) -> Message:
    """The message for ``body``, stamped with its creation time (for check-backs)."""
    check_user_headers(headers)
    msg_headers = {**(headers or {}), CREATED_AT_HEADER: format_utc(utcnow())}
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
        )


def check_options(topic: object, payload: object) -> None:
    if not isinstance(topic, str) or not topic:
        raise ConfigurationError("transactional_message needs a non-empty topic")
    if payload is not None and not callable(payload):
        raise ConfigurationError("payload must be a callable taking the function's arguments")

