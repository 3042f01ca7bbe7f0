"""The envelope: one way to write and read headers everywhere, and the framework's
own headers kept out of the user's namespace."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker

from outbox import ConfigurationError, Message, MessageError, Outbox
from outbox.envelope import CREATED_AT_HEADER, decode_headers, encode_headers
from outbox.sql_queue import _row
from outbox.storage import message_row, to_message


def test_headers_round_trip_exactly() -> None:
    headers = {"trace": "ü-✓-张三", "b": "2", "a": "1"}
    text = encode_headers(headers)
    assert text == '{"a": "1", "b": "2", "trace": "ü-✓-张三"}'  # sorted, UTF-8 as is
    assert decode_headers(text) == headers


@pytest.mark.parametrize("raw", [None, "", b"", "not json", "[1, 2]", "7", "[" * 5000])
def test_headers_that_are_not_an_object_read_as_none(raw: Any) -> None:
    assert decode_headers(raw) == {}


def test_header_values_read_as_strings() -> None:
    assert decode_headers('{"n": 1, "t": true}') == {"n": "1", "t": "True"}


def test_every_store_writes_the_headers_the_same_way() -> None:
    message = Message(topic="t", payload=b"{}", id="m1", headers={"x": "1", CREATED_AT_HEADER: "t"})
    import datetime as dt

    now = dt.datetime(2026, 1, 1)
    assert message_row(message, now)["headers"] == _row(message, now)["headers"] == (
        encode_headers(message.headers))


def test_a_stored_message_reads_back_with_its_headers() -> None:
    import datetime as dt

    message = Message(topic="t", payload=b"{}", id="m1", headers={"x": "1"})
    row = message_row(message, dt.datetime(2026, 1, 1))

    assert to_message(SimpleNamespace(**row)).headers == {"x": "1"}


@pytest.mark.parametrize("name", ["outbox-created-at", "Outbox-Trace", "outbox-anything"])
def test_a_user_header_in_the_framework_namespace_is_refused(name: str) -> None:
    ob = Outbox(sessionmaker())
    with pytest.raises(ConfigurationError, match="framework's namespace"):
        ob.transactional_message(topic="t", headers={name: "x"})(lambda session: None)
    with pytest.raises(MessageError, match="framework's namespace"):
        ob.message(topic="t", payload={}, headers={name: "x"})


def test_the_framework_stamps_its_own_header() -> None:
    message = Outbox(sessionmaker()).message(topic="t", payload={}, headers={"trace": "1"})
    assert set(message.headers) == {"trace", CREATED_AT_HEADER}
