"""The Redis stream entry format, both ways, and what a hostile entry becomes."""

from __future__ import annotations

import pytest

from outbox import Message
from outbox.errors import PublishError
from outbox.testing import broken_message
from outbox_redis.mapping import dead_fields, delivery_fields, to_delivery, to_fields


def test_a_message_round_trips_through_its_fields() -> None:
    sent = Message(id="m-1", topic="t", key="acct", tag="debit",
                   headers={"traceparent": "00-x-y-01", "ünï": "✓ 张三", "empty": ""},
                   payload=b"\x00\xff")
    d = to_delivery("t", b"1-0", to_fields(sent), attempt=2)
    assert d.to_message() == sent
    assert (d.attempt, d.handle) == (2, b"1-0")


def test_absent_and_hostile_fields_become_none() -> None:
    d = to_delivery("t", b"1-0", {b"id": b"\xff", b"key": b"\xfe", b"h:\xff": b"v",
                                  b"h:ok": b"\xff", b"payload": "not bytes"}, attempt=0)
    assert (d.message_id, d.key, d.tag, dict(d.headers), d.payload, d.attempt) == (
        None, None, None, {}, b"", 1)
    assert to_delivery("t", b"1-0", None, 1).message_id is None


def test_a_dead_letter_keeps_the_message_and_says_who_and_why() -> None:
    d = to_delivery("t", b"5-1", to_fields(Message(id="m", topic="t", payload=b"p")), 3)
    fields = dead_fields(delivery_fields(d), "bank2", b"5-1", "handler failed")
    assert fields == {b"id": b"m", b"payload": b"p", b"dead-group": b"bank2",
                      b"dead-reason": b"handler failed", b"dead-entry": b"5-1"}


def test_a_message_that_is_not_one_is_refused() -> None:
    broken = broken_message()
    with pytest.raises(PublishError, match="cannot be written"):
        to_fields(broken)
