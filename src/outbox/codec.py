"""Codecs turn a payload object into bytes and back."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import sys
import uuid
from typing import Any

from .errors import DecodeError, MessageError

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
    """

    content_type = "application/json"

    def __init__(self, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.max_bytes = max_bytes

    def encode(self, value: Any) -> bytes:
        try:
            data = json.dumps(
                value, default=_default, ensure_ascii=False, separators=(",", ":"),
                allow_nan=False,
            ).encode("utf-8")
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a payload")
