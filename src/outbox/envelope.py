"""The message envelope around the payload: its headers, written and read in one place
for every store and transport (the outbox table, the SQL transport, RocketMQ).

Headers travel as one JSON object of strings. The framework's own headers (the
creation stamp a check-back reads) carry the reserved prefix ``outbox-``; a user's
header may not, so the two never collide.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping

from .errors import MessageError

#: Header names the framework keeps for itself.
INTERNAL_PREFIX = "outbox-"
#: The UTC ISO time a message was built (before its transaction ran), e.g.
#: "2026-12-01T09:30:00.123456Z" (earlier versions wrote it without the "Z").
CREATED_AT_HEADER = "outbox-created-at"
#: The UTC ISO time before which the message must not be delivered, same format.
DELIVER_AT_HEADER = "outbox-deliver-at"


def parse_utc(raw: str | None) -> dt.datetime | None:
    """A header's ISO time as naive UTC (the framework's clock), None if absent or
    unreadable."""
    if raw is None:
        return None
    try:
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when


def format_utc(when: dt.datetime) -> str:
    """Naive UTC (or an aware time) as the headers' ISO form, ending in "Z"."""
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when.isoformat() + "Z"


def delivery_time(headers: Mapping[str, str]) -> dt.datetime | None:
    """When a message asked to be delivered (naive UTC), from its headers; None for
    "at once"."""
    return parse_utc(headers.get(DELIVER_AT_HEADER))


def encode_headers(headers: Mapping[str, str]) -> str:
    """The headers as they are stored and sent: one JSON object, keys sorted."""
    return json.dumps(dict(headers), ensure_ascii=False, sort_keys=True)


def decode_headers(raw: str | bytes | None) -> dict[str, str]:
    """The headers of a stored or received message. Anything that is not a JSON
    object gives no headers: a hostile sender cannot make a delivery unreadable."""
    if not raw or raw == "{}":
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def check_user_headers(headers: Mapping[str, str] | None) -> None:
    """Refuse a user header in the framework's namespace."""
    for name in headers or ():
        if isinstance(name, str) and name.lower().startswith(INTERNAL_PREFIX):
            raise MessageError(
                f"header {name!r} is in the framework's namespace ({INTERNAL_PREFIX}...); "
                "give your header another name"
            )
