"""Codecs turn a payload object into bytes and back."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
import secrets
import sys
import uuid
from typing import Any

from .errors import ConfigurationError, DecodeError, MessageError

#: Payloads above this size are refused when encoding and dead-lettered when decoding.
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024


def _default(value: Any) -> Any:
    # Money stays exact: a Decimal travels as its string form, never as a float.
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise MessageError(f"cannot encode non-finite decimal {value}")
        return str(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise MessageError(
        f"cannot encode a {type(value).__name__} as JSON; pass str, int, Decimal, "
        "bool, None, lists or dicts"
    )


class JsonCodec:
    """UTF-8 JSON with Decimal, datetime and UUID written as strings.

    Decoding parses JSON floats as :class:`decimal.Decimal`, so amounts never pass
    through binary floating point.

    ``decimals="number"`` writes a Decimal as a JSON number with exactly its digits
    (``Decimal("100.50")`` as ``100.50``) for receivers that expect numbers, such as
    a Java service mapping the field to ``BigDecimal`` or ``double``; the default,
    ``"string"``, writes ``"100.50"``, which every JSON parser keeps exact.
    """

    content_type = "application/json"

    def __init__(self, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, *,
                 decimals: str = "string") -> None:
        if decimals not in ("string", "number"):
            raise ConfigurationError(
                f"JsonCodec(decimals={decimals!r}): use \"string\" (the default) or \"number\"")
        self.max_bytes = max_bytes
        self.decimals = decimals

    def encode(self, value: Any) -> bytes:
        try:
            if self.decimals == "number":
                text = _dumps_decimal_numbers(value)
            else:
                text = json.dumps(
                    value, default=_default, ensure_ascii=False, separators=(",", ":"),
                    allow_nan=False,
                )
            data = text.encode("utf-8")
        except RecursionError:
            raise MessageError(
                "payload is nested too deeply to encode as JSON (Python's recursion limit, "
                f"about {sys.getrecursionlimit()} levels); flatten it"
            ) from None  # the traceback of a recursion overflow is thousands of frames long
        except (TypeError, ValueError) as exc:
            raise MessageError(f"payload cannot be encoded as JSON: {exc}") from exc
        if len(data) > self.max_bytes:
            raise MessageError(
                f"payload is {len(data)} bytes; the limit is {self.max_bytes} bytes"
            )
        return data

    def decode(self, data: bytes) -> Any:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"payload must be bytes, got {type(data).__name__}")
        if len(data) == 0:
            raise DecodeError("payload is empty")
        if len(data) > self.max_bytes:
            raise DecodeError(f"payload is {len(data)} bytes; the limit is {self.max_bytes}")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(
                f"payload is not valid UTF-8: {exc.reason} at byte {exc.start}"
            ) from exc
        try:
            return json.loads(text, parse_float=decimal.Decimal, parse_constant=_reject_constant)
        except RecursionError:
            raise DecodeError(
                "payload is not valid JSON: nested too deeply to decode (Python's recursion "
                f"limit, about {sys.getrecursionlimit()} levels)"
            ) from None
        except ValueError as exc:
            raise DecodeError(f"payload is not valid JSON: {exc}") from exc


def _dumps_decimal_numbers(value: Any) -> str:
    """JSON text with every Decimal as a number of exactly its digits. The json
    module cannot write a number it did not make, so each Decimal first becomes a
    string with a marker no payload can contain (a fresh random one per call), then
    the quoted markers are replaced by the digits."""
    marker = "\x00" + secrets.token_hex(8) + ":"

    def default(item: Any) -> Any:
        if isinstance(item, decimal.Decimal):
            return marker + _default(item)
        return _default(item)

    text = json.dumps(value, default=default, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)
    quoted = json.dumps(marker)[:-1]  # '"\u0000<hex>:'
    return re.sub(re.escape(quoted) + r'([-+0-9.Ee]+)"', r"\1", text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a payload")
