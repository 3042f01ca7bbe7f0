from __future__ import annotations

from typing import Any

import pytest

from outbox import DecodeError, Delivery, MessageError


def delivery(**fields: Any) -> Delivery:
    values: dict[str, Any] = {"topic": "t", "payload": b"{}", "message_id": "m-1", "attempt": 1}
    values.update(fields)
    return Delivery(**values)


def test_valid_delivery_becomes_a_message() -> None:
    d = delivery(key="k", tag="g", headers={"h": "v"}, payload=b"\xff\x00")
    m = d.to_message()
    assert (m.id, m.topic, m.key, m.tag, dict(m.headers), m.payload) == (
        "m-1", "t", "k", "g", {"h": "v"}, b"\xff\x00"
    )


@pytest.mark.parametrize("message_id", [None, ""])
def test_missing_message_id_is_a_decode_error(message_id: str | None) -> None:
    with pytest.raises(DecodeError, match="no message id"):
        delivery(message_id=message_id).to_message()


@pytest.mark.parametrize(
    "fields",
    [
        {"topic": ""},
        {"message_id": "x" * 65},
        {"message_id": "a\x00b"},
        {"key": "k" * 201},
        {"payload": "not bytes"},
        {"headers": {"h": 1}},
    ],
)
def test_malformed_fields_are_decode_errors_caused_by_message_errors(
    fields: dict[str, Any],
) -> None:
    with pytest.raises(DecodeError, match="not a valid message") as info:
        delivery(**fields).to_message()
    assert isinstance(info.value.__cause__, MessageError)
