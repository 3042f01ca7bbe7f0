"""One message as one NATS message, and back.

A topic is the subject ``<prefix><topic>`` (prefix ``outbox.`` by default), kept in
a JetStream stream of its own (:func:`stream_name`). The envelope travels in
headers that any NATS tool shows (``nats stream view``, a plain subscriber)::

    Nats-Msg-Id     the message id: JetStream stores a second message with the same
                    id only once if it arrives within the stream's duplicate window
                    (2 minutes by default; the consumer de-duplicates beyond it)
    Outbox-Key      the ordering key, when there is one
    Outbox-Tag      the tag, when there is one
    <name>          each user header as it is (``traceparent`` ...)
    Outbox-Headers  the user headers NATS cannot carry as they are, as one JSON
                    object: a name that is not an HTTP token (``ünï``) or starts with
                    ``Nats-`` or ``Outbox-`` (reserved), a value with control
                    characters or spaces at either end (NATS would trim them)

and the body is the payload, bytes as they are.

A subject is made of tokens separated by dots; it cannot hold spaces, ``*`` or
``>`` (wildcards), empty tokens, or start with ``$`` (the server's own API). A topic
whose last token is ``dead`` is refused too: ``<prefix><topic>.dead`` is the
subject of the topic's dead letters, kept in a stream of their own.

Reading back is tolerant: a message another program wrote with missing or garbled
headers becomes a :class:`~outbox.Delivery` with those fields None (the consumer
dead-letters it with the reason), never an exception.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from outbox.errors import PublishError
from outbox.message import Message
from outbox.transport import Delivery

MSG_ID, KEY, TAG, HEADERS = "Nats-Msg-Id", "Outbox-Key", "Outbox-Tag", "Outbox-Headers"
#: Headers a dead letter adds to the original's; its own Nats-Msg-Id names the
#: group and the original's stream sequence, so each group's dead letter is kept
#: once however often it is written, and the message id moves to Outbox-Id.
DEAD_ID, DEAD_GROUP, DEAD_REASON, DEAD_SEQUENCE = (
    "Outbox-Id", "Outbox-Dead-Group", "Outbox-Dead-Reason", "Outbox-Dead-Sequence")
DEAD_SUFFIX = ".dead"
#: Header names of NATS (Nats-Msg-Id, Nats-Expected-Stream ...) and of this mapping.
RESERVED_PREFIXES = ("nats-", "outbox-")

#: What NATS (nats-py) sends as a header name: an HTTP token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: What a header value cannot hold as it is: control characters (CR and LF end the
#: header line; nats-py turns them into spaces).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Characters stream and consumer names may not hold (dots, wildcards, spaces,
#: path separators ...): all but these become ``_``.
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def subject_problem(prefix: str, topic: str) -> str | None:
    """Why ``<prefix><topic>`` cannot be the subject of a topic, or None if it can."""
    subject = f"{prefix}{topic}"
    if not topic:
        return "the topic is empty"
    for char in subject:
        if char.isspace() or not char.isprintable():
            return f"it contains {'a space' if char == ' ' else f'U+{ord(char):04X}'}"
        if char in "*>":
            return f"it contains {char!r}, a NATS wildcard"
    if subject.startswith("$"):
        return "it starts with '$', which NATS keeps for its own API ($JS, $SYS)"
    if "" in subject.split("."):
        return "it has an empty token (a dot at either end, or two dots in a row)"
    if topic.endswith(DEAD_SUFFIX):
        return (f"its last token is 'dead': {subject} is the dead-letter subject of topic "
                f"{topic[:-len(DEAD_SUFFIX)]!r}")
    return None


def check_subject(prefix: str, topic: object) -> str:
    """The subject of ``topic``; ValueError saying what to do if it cannot be one."""
    if not isinstance(topic, str) or not isinstance(prefix, str):
        raise ValueError(f"topic {topic!r} must be a string")
    subject = f"{prefix}{topic}"
    problem = subject_problem(prefix, topic)
    if problem is not None:
        raise ValueError(
            f"topic {topic!r} cannot be a NATS subject ({subject!r}): {problem}; NATS "
            "subjects forbid spaces, '*' and '>': name topics with letters, digits, '-' and "
            "'_', with dots between words")
    return subject


def dead_letter_subject(subject: str) -> str:
    """The subject that keeps the dead letters of every group of ``subject``'s topic."""
    return f"{subject}{DEAD_SUFFIX}"


def sanitized(text: str) -> str:
    """``text`` with every character a stream or consumer name may not hold as ``_``."""
    return _NAME_CHARS.sub("_", text)


def stream_name(subject: str) -> str:
    """The name of the stream that keeps ``subject``: the subject with dots as
    ``_`` (``outbox.orders`` -> ``outbox_orders``), plus a short hash of the subject
    where other characters were replaced too, so that two subjects never share a
    name (``outbox.a_b`` and ``outbox.a.b``)."""
    name = sanitized(subject)
    if name.replace("_", ".") != subject:
        name += "-" + hashlib.sha256(subject.encode()).hexdigest()[:8]
    return name


def consumer_name(group: str) -> str:
    """The durable consumer of ``group`` (names as for :func:`stream_name`)."""
    name = sanitized(group)
    if name != group:
        name += "-" + hashlib.sha256(group.encode()).hexdigest()[:8]
    return name


def _reserved(name: str) -> bool:
    return name.lower().startswith(RESERVED_PREFIXES)


def _native(name: str, value: str) -> bool:
    """Whether NATS carries header ``name: value`` as it is."""
    if (_TOKEN.fullmatch(name) is None or _reserved(name) or _CONTROL.search(value)
            or value != value.strip()):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate: JSON escapes it
        return False
    return True


def _plain_value(what: str, value: str) -> str:
    """``value`` for a header of the envelope, refused if NATS would change it."""
    if _CONTROL.search(value) is not None or value != value.strip():
        raise ValueError(f"the {what} has control characters or spaces at either end")
    value.encode()  # a lone surrogate: UnicodeEncodeError
    return value


def user_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The NATS headers of a message's user headers: native where they can be, the
    rest in ``Outbox-Headers``."""
    native: dict[str, str] = {}
    extra: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"header {name!r} must map a str to a str")
        if _native(name, value):
            native[name] = value
        else:
            extra[name] = value
    if extra:
        native[HEADERS] = json.dumps(extra, ensure_ascii=True, separators=(",", ":"))
    return native


def to_nats(message: Message) -> tuple[dict[str, str], bytes]:
    """The headers and payload of ``message``; PublishError for a message that is
    not one, or one NATS cannot carry."""
    try:
        headers = user_headers(message.headers)
        headers[MSG_ID] = _plain_value("message id", message.id)
        if message.key is not None:
            headers[KEY] = _plain_value("key", message.key)
        if message.tag is not None:
            headers[TAG] = _plain_value("tag", message.tag)
        payload = bytes(message.payload)
    except (AttributeError, TypeError, ValueError) as exc:  # UnicodeEncodeError too
        raise PublishError(f"message {getattr(message, 'id', None)!r} cannot be written to "
                           f"a NATS subject: {exc}") from exc
    return headers, payload


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def read_user_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """The user headers of a NATS message's headers: every header but the reserved
    ones, and those in a readable ``Outbox-Headers`` object."""
    found = {name: value for name, value in headers.items()
             if isinstance(name, str) and isinstance(value, str) and not _reserved(name)}
    try:
        extra = json.loads(headers.get(HEADERS) or "{}")
    except (TypeError, ValueError):
        extra = None
    if isinstance(extra, dict):
        found.update({name: value for name, value in extra.items()
                      if isinstance(name, str) and isinstance(value, str)})
    return found


def to_delivery(topic: str, headers: Mapping[str, Any] | None, payload: Any, attempt: int,
                handle: Any = None) -> Delivery:
    """The delivery of one NATS message (``handle``: the message, to settle it)."""
    headers = headers if isinstance(headers, Mapping) else {}
    return Delivery(
        topic=topic, payload=bytes(payload) if isinstance(payload, bytes | bytearray) else b"",
        message_id=_text(headers.get(MSG_ID)) or None, attempt=max(1, attempt),
        key=_text(headers.get(KEY)), tag=_text(headers.get(TAG)),
        headers=read_user_headers(headers), handle=handle,
    )


def _one_line(text: str) -> str:
    """``text`` fit for a header value: control characters as spaces, trimmed."""
    return _CONTROL.sub(" ", text).strip()


def dead_headers(delivery: Delivery, group: str, sequence: int, reason: str
                 ) -> dict[str, str]:
    """The headers of ``delivery``'s dead letter: the original's, rebuilt from the
    delivery (which keeps every field it could read), plus who gave up and why.
    Control characters of the reason (line breaks) become spaces."""
    headers = user_headers(delivery.headers)
    for name, value in ((DEAD_ID, delivery.message_id), (KEY, delivery.key),
                        (TAG, delivery.tag)):
        if value is not None:
            headers[name] = _one_line(value)
    headers.update({
        MSG_ID: f"dead:{_one_line(group)}:{sequence}",
        DEAD_GROUP: _one_line(group), DEAD_REASON: _one_line(reason),
        DEAD_SEQUENCE: str(sequence),
    })
    return headers


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a group gave up on, as its dead-letter stream keeps it."""

    message_id: str | None
    group: str | None
    reason: str | None
    #: The original's sequence number in the topic's stream.
    sequence: int | None
    payload: bytes = b""
    key: str | None = None
    tag: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def to_dead_letter(headers: Mapping[str, Any] | None, payload: Any) -> DeadLetter:
    """A dead letter read back (tolerant, as :func:`to_delivery`)."""
    headers = headers if isinstance(headers, Mapping) else {}
    sequence = headers.get(DEAD_SEQUENCE)
    return DeadLetter(
        message_id=_text(headers.get(DEAD_ID)) or None, group=_text(headers.get(DEAD_GROUP)),
        reason=_text(headers.get(DEAD_REASON)),
        sequence=int(sequence) if isinstance(sequence, str) and sequence.isdigit() else None,
        payload=bytes(payload) if isinstance(payload, bytes | bytearray) else b"",
        key=_text(headers.get(KEY)), tag=_text(headers.get(TAG)),
        headers=read_user_headers(headers),
    )
