from __future__ import annotations

import dataclasses
import re
import unicodedata

import pytest

from outbox import Message, MessageError, OutboxError
from outbox.message import MAX_ID_LENGTH, MAX_KEY_LENGTH, MAX_TAG_LENGTH, MAX_TOPIC_LENGTH


def make(**fields: object) -> Message:
    values: dict[str, object] = {"topic": "transfers", "payload": b"{}"}
    values.update(fields)
    return Message(**values)  # type: ignore[arg-type]


def test_default_id_is_fresh_hex() -> None:
    a, b = make(), make()
    assert re.fullmatch(r"[0-9a-f]{32}", a.id)
    assert a.id != b.id


def test_fields_are_kept() -> None:
    m = make(id="tx-1", key="account-1", tag="debit", headers={"h": "v"}, payload=b"\x00\xff")
    assert (m.id, m.topic, m.key, m.tag, dict(m.headers), m.payload) == (
        "tx-1", "transfers", "account-1", "debit", {"h": "v"}, b"\x00\xff"
    )


@pytest.mark.parametrize("bad_id", ["", None, 42, "x" * (MAX_ID_LENGTH + 1), "a\x00b"])
def test_bad_id_is_refused(bad_id: object) -> None:
    with pytest.raises(MessageError, match="message id"):
        make(id=bad_id)


def test_id_at_the_limit_is_accepted() -> None:
    assert make(id="x" * MAX_ID_LENGTH).id == "x" * MAX_ID_LENGTH


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("topic", ""),
        ("topic", None),
        ("topic", "t" * (MAX_TOPIC_LENGTH + 1)),
        ("topic", "a\x00"),
        ("key", "k" * (MAX_KEY_LENGTH + 1)),
        ("key", "k\x00"),
        ("key", 7),
        ("tag", "t" * (MAX_TAG_LENGTH + 1)),
        ("tag", "\x00"),
    ],
)
def test_bad_text_fields_are_refused(name: str, value: object) -> None:
    with pytest.raises(MessageError, match=f"message {name}"):
        make(**{name: value})


CONTROL_CHARACTERS = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cc"]


def test_the_control_characters_are_the_c0_and_c1_ranges() -> None:
    assert [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]] == CONTROL_CHARACTERS


@pytest.mark.parametrize("name", ["id", "topic", "key", "tag"])
@pytest.mark.parametrize("char", CONTROL_CHARACTERS, ids=lambda c: f"U+{ord(c):04X}")
def test_control_characters_are_refused_in_every_text_field(name: str, char: str) -> None:
    with pytest.raises(MessageError, match=f"message {name} must not contain control") as info:
        make(**{name: f"a{char}b"})
    assert f"U+{ord(char):04X}" in str(info.value)
    assert "position 1" in str(info.value)
    assert char not in str(info.value)  # the error itself is safe to log


def test_the_error_names_common_control_characters() -> None:
    with pytest.raises(MessageError, match=r"U\+000A \(LF\)"):
        make(id="tx-1\nINFO forged log line")
    with pytest.raises(MessageError, match=r"U\+0000 \(NUL\)"):
        make(key="k\x00")


@pytest.mark.parametrize("text", ["tx-1 2", "账户-1", "a\u00a0b", "émoji-✓", "a\u200bb"])
def test_printable_text_with_inner_spaces_and_non_ascii_is_accepted(text: str) -> None:
    m = make(id=text, topic=text, key=text, tag=text)
    assert (m.id, m.topic, m.key, m.tag) == (text, text, text, text)


def test_optional_fields_at_their_limits_are_accepted() -> None:
    m = make(topic="t" * MAX_TOPIC_LENGTH, key="k" * MAX_KEY_LENGTH, tag="g" * MAX_TAG_LENGTH)
    assert len(m.topic) == MAX_TOPIC_LENGTH and m.key is not None and m.tag is not None


@pytest.mark.parametrize("payload", ["text", bytearray(b"x"), None, {"a": 1}])
def test_payload_must_be_bytes(payload: object) -> None:
    with pytest.raises(MessageError, match="payload must be bytes"):
        make(payload=payload)


@pytest.mark.parametrize("headers", [[("a", "b")], {"a": 1}, {1: "a"}, {"a": None}])
def test_headers_must_map_str_to_str(headers: object) -> None:
    with pytest.raises(MessageError, match="header"):
        make(headers=headers)


def test_headers_are_immutable_and_detached_from_the_callers_dict() -> None:
    source = {"trace": "1"}
    m = make(headers=source)
    source["trace"] = "2"
    source["extra"] = "x"
    assert dict(m.headers) == {"trace": "1"}
    with pytest.raises(TypeError):
        m.headers["trace"] = "3"  # type: ignore[index]


def test_message_is_frozen_and_replace_revalidates() -> None:
    m = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.topic = "other"  # type: ignore[misc]
    with pytest.raises(MessageError):
        dataclasses.replace(m, id="")


def test_message_error_is_an_outbox_error() -> None:
    assert issubclass(MessageError, OutboxError)
