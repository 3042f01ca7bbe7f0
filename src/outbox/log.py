"""The library's loggers: structlog's API over the standard library's :mod:`logging`.

``get_logger("outbox.relay")`` wraps ``logging.getLogger("outbox.relay")``, so the
application decides what is shown and where, as with any library: set a level and
a handler on the ``outbox`` logger (or the root logger). Nothing is printed until
the application configures logging, except that, as always with :mod:`logging`,
warnings and errors reach stderr through the last-resort handler.

An event becomes one record whose message is one line, ``event key=value ...``,
with the fields also in ``record.outbox`` (``extra={"outbox": {...}}``) for
structured handlers. Control characters are escaped and database URL passwords
hidden in every value, so no field can forge a log line or leak a secret. A
disabled level costs one :meth:`logging.Logger.isEnabledFor` call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import structlog
from sqlalchemy.engine import URL

from .db import hide_secrets, safe_url

DEBUG, INFO, WARNING, ERROR, CRITICAL = (
    logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL
)

# Category Cc, the Unicode line and paragraph separators, and the bidirectional
# overrides that can make a line display as something it is not.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_QUOTES = re.compile(r'[\s"]')
_PLAIN = (bool, int, float)

# Frames between the caller and logging.Logger.log: Logger.info, Logger._emit.
_STACKLEVEL = 3


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with control characters (and line separators) written as escapes."""
    return _UNSAFE.sub(_escape_char, text)


def clean(value: object) -> str:
    """A value as safe one-line text: URL secrets hidden, control characters escaped."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, URL):
        return escape(safe_url(value))
    else:
        text = str(value)
    return escape(hide_secrets(text))


def _quoted(text: str) -> str:
    # Quotes only around a value with spaces or quotes (or none at all); the
    # escapes of control characters stay as they are, readable.
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    return '"' + text.replace('"', '\\"') + '"'


def render(event: object, fields: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The one-line message and the cleaned fields of an event."""
    name = clean(event)
    out: dict[str, Any] = {"event": name}
    parts = [name]
    for key, value in fields.items():
        key = escape(key)
        if value is None or isinstance(value, _PLAIN):
            out[key] = value
            parts.append(f"{key}={value}")
        else:
            text = clean(value)
            out[key] = text
            parts.append(f"{key}={_quoted(text)}")
    return " ".join(parts), out


class Logger(structlog.BoundLoggerBase):
    """A structlog bound logger (``bind``, ``new``, ``unbind``) writing to a
    :class:`logging.Logger`; see the module's documentation."""

    _logger: logging.Logger

    def is_enabled_for(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def debug(self, event: str, **kw: Any) -> None:
        if self._logger.isEnabledFor(DEBUG):
            self._emit(DEBUG, event, kw)

    def info(self, event: str, **kw: Any) -> None:
        if self._logger.isEnabledFor(INFO):
            self._emit(INFO, event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        if self._logger.isEnabledFor(WARNING):
            self._emit(WARNING, event, kw)

    def error(self, event: str, **kw: Any) -> None:
        if self._logger.isEnabledFor(ERROR):
            self._emit(ERROR, event, kw)

    def critical(self, event: str, **kw: Any) -> None:
        if self._logger.isEnabledFor(CRITICAL):
            self._emit(CRITICAL, event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        """An error with the exception being handled, as ``logging`` does."""
        if self._logger.isEnabledFor(ERROR):
            kw.setdefault("exc_info", True)
            self._emit(ERROR, event, kw)

    def log(self, level: int, event: str, **kw: Any) -> None:
        if self._logger.isEnabledFor(level):
            self._emit(level, event, kw)

    def _emit(self, level: int, event: str, kw: dict[str, Any]) -> None:
        exc_info = kw.pop("exc_info", None)
        stack_info = bool(kw.pop("stack_info", False))
        fields = {**self._context, **kw} if self._context else kw
        line, cleaned = render(event, fields)
        self._logger.log(level, line, exc_info=exc_info, stack_info=stack_info,
                         extra={"outbox": cleaned}, stacklevel=_STACKLEVEL)


def get_logger(name: str) -> Logger:
    """The logger the library's module ``name`` uses (``outbox.relay``, ...)."""
    return Logger(logging.getLogger(name), (), {})


__all__ = ["Logger", "clean", "escape", "get_logger", "render"]
