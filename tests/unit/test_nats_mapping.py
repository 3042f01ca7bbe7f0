"""The NATS message format, both ways, what a hostile message becomes, and the names
of subjects, streams and consumers."""

from __future__ import annotations

import pytest

from outbox import Message
from outbox.errors import PublishError
from outbox.testing import broken_message
from outbox_nats.mapping import (
    DeadLetter,
    check_subject,
    consumer_name,
    dead_headers,
    dead_letter_subject,
    stream_name,
    to_dead_letter,
    to_delivery,
    to_nats,
)


def test_a_message_round_trips_through_its_headers() -> None:
    sent = Message(id="m-1", topic="t", key="acct", tag="debit",
                   headers={"traceparent": "00-x-y-01", "ünï": "✓ 张三", "empty": "",
                            "pad": " x ", "line": "a\nb", "Nats-Expected-Stream": "X"},
                   payload=b"\x00\xff")
    headers, payload = to_nats(sent)
    d = to_delivery("t", headers, payload, attempt=2, handle="msg")
    assert d.to_message() == sent
    assert (d.attempt, d.handle) == (2, "msg")


def test_headers_travel_natively_where_nats_can_carry_them() -> None:
    headers, payload = to_nats(Message(
        id="m-1", topic="t", key="k", tag="debit", payload=b"body",
        headers={"traceparent": "00-ab-01", "ünï": "✓", "Nats-Expected-Stream": "X",
                 "outbox-key": "forged"}))
    assert payload == b"body"
    assert headers == {
        "traceparent": "00-ab-01", "Nats-Msg-Id": "m-1", "Outbox-Key": "k",
        "Outbox-Tag": "debit",
        # A name NATS cannot send, and names it (or we) would act on: in one JSON object.
        "Outbox-Headers": '{"\\u00fcn\\u00ef":"\\u2713","Nats-Expected-Stream":"X",'
                          '"outbox-key":"forged"}',
    }
    assert to_nats(Message(id="bare", topic="t", payload=b"")) == ({"Nats-Msg-Id": "bare"}, b"")


def test_absent_and_hostile_headers_become_none() -> None:
    d = to_delivery("t", {"Nats-Msg-Id": "", "Outbox-Key": 3, "Outbox-Headers": "{bad",
                          7: "x", "ok": "v", "n": None}, "not bytes", attempt=0)
    assert (d.message_id, d.key, d.tag, dict(d.headers), d.payload, d.attempt) == (
        None, None, None, {"ok": "v"}, b"", 1)
    assert to_delivery("t", None, None, 1).message_id is None
    listed = to_delivery("t", {"Outbox-Headers": '["not", "an object"]'}, b"", 1)
    assert dict(listed.headers) == {}
    mixed = to_delivery("t", {"Outbox-Headers": '{"a": "1", "b": 2}'}, bytearray(b"p"), 1)
    assert (dict(mixed.headers), mixed.payload) == ({"a": "1"}, b"p")


def test_a_dead_letter_keeps_the_message_and_says_who_and_why() -> None:
    headers, payload = to_nats(Message(id="m", topic="t", key="k", payload=b"p",
                                       headers={"ünï": "✓", "trace": "1"}))
    d = to_delivery("t", headers, payload, 3)
    dead = dead_headers(d, "bank2", 17, "handler failed 3 times:\r\nRuntimeError: x")
    assert dead == {
        "trace": "1", "Outbox-Headers": '{"\\u00fcn\\u00ef":"\\u2713"}', "Outbox-Id": "m",
        "Outbox-Key": "k", "Nats-Msg-Id": "dead:bank2:17", "Outbox-Dead-Group": "bank2",
        "Outbox-Dead-Reason": "handler failed 3 times:  RuntimeError: x",
        "Outbox-Dead-Sequence": "17"}
    assert to_dead_letter(dead, b"p") == DeadLetter(
        message_id="m", group="bank2", reason="handler failed 3 times:  RuntimeError: x",
        sequence=17, payload=b"p", key="k", headers={"ünï": "✓", "trace": "1"})
    assert to_dead_letter(None, None) == DeadLetter(None, None, None, None)
    assert to_dead_letter({"Outbox-Dead-Sequence": "x1"}, b"").sequence is None


def test_a_message_that_is_not_one_is_refused() -> None:
    broken = broken_message()
    with pytest.raises(PublishError, match="cannot be written"):
        to_nats(broken)
    padded = Message.stored(id=" x", topic="t", payload=b"", key=None, tag=None, headers={})
    with pytest.raises(PublishError, match="message id has control characters or spaces"):
        to_nats(padded)
    surrogate = Message.stored(id="x", topic="t", payload=b"", key="\udc80", tag=None,
                               headers={})
    with pytest.raises(PublishError, match="cannot be written"):
        to_nats(surrogate)


@pytest.mark.parametrize(("topic", "problem"), [
    ("has space", "contains a space"), ("a.*", "wildcard"), ("a>", "wildcard"),
    ("a..b", "empty token"), (".a", "empty token"), ("a.", "empty token"), ("", "empty"),
    ("orders.dead", "dead-letter subject of topic 'orders'"), ("a\x85b", "U+0085"),
])
def test_a_topic_that_cannot_be_a_subject_says_why_and_what_to_do(topic: str,
                                                                  problem: str) -> None:
    with pytest.raises(ValueError, match="forbid spaces, '\\*' and '>'") as info:
        check_subject("outbox.", topic)
    assert problem in str(info.value)


def test_subjects_and_names() -> None:
    assert check_subject("outbox.", "orders.created") == "outbox.orders.created"
    assert check_subject("outbox.", "dead") == "outbox.dead"
    assert check_subject("outbox.", "ünï") == "outbox.ünï"
    with pytest.raises(ValueError, match=r"starts with '\$'"):
        check_subject("", "$JS.API")
    assert dead_letter_subject("outbox.orders") == "outbox.orders.dead"
    assert stream_name("outbox.orders.created") == "outbox_orders_created"
    # Subjects that would share a name keep apart by a hash of the subject.
    assert stream_name("outbox.orders_created").startswith("outbox_orders_created-")
    assert stream_name("outbox.orders_created") != stream_name("outbox.orders.created")
    assert stream_name("outbox.ünï") != stream_name("outbox.___")
    assert consumer_name("bank-2") == "bank-2"
    assert consumer_name("bank.2").startswith("bank_2-")
    assert consumer_name("bank.2") != consumer_name("bank_2")
