"""The Kafka record format both ways, topic names, and URLs."""

from __future__ import annotations

import pytest

from outbox import Message
from outbox.errors import ConfigurationError, PublishError
from outbox.testing import broken_message
from outbox_kafka.broker import Handle, _Offsets, parse_url
from outbox_kafka.mapping import (
    dead_headers,
    delivery_record,
    to_delivery,
    to_record,
    topic_name,
)


def test_a_message_round_trips_through_its_record() -> None:
    sent = Message(id="m-1", topic="t", key="acct", tag="debit",
                   headers={"traceparent": "00-x-y-01", "ünï": "✓ 张三", "empty": ""},
                   payload=b"\x00\xff")
    key, value, headers = to_record(sent)
    d = to_delivery("t", key, value, headers, Handle("t", 0, 7))
    assert d.to_message() == sent
    assert (d.attempt, d.handle) == (1, Handle("t", 0, 7))
    assert delivery_record(d) == (key, value, headers)


def test_absent_and_hostile_fields_become_none() -> None:
    d = to_delivery("t", b"\xfe", None, [("outbox-id", b"\xff"), (b"\xff", b"v"), "junk",
                                         ("ok", None)], None)
    assert (d.message_id, d.key, d.tag, dict(d.headers), d.payload) == (None, None, None, {},
                                                                         b"")
    assert to_delivery("t", None, b"", None, None).message_id is None


def test_a_dead_letter_keeps_the_record_and_says_who_where_and_why() -> None:
    _, _, headers = to_record(Message(id="m", topic="t", payload=b"p"))
    assert dead_headers(headers, "bank2", "t/1/5", "handler failed") == [
        ("outbox-id", b"m"), ("outbox-dead-group", b"bank2"), ("outbox-dead-from", b"t/1/5"),
        ("outbox-dead-reason", b"handler failed")]


def test_a_message_that_is_not_one_is_refused() -> None:
    broken = broken_message()
    with pytest.raises(PublishError, match="cannot be written to Kafka"):
        to_record(broken)


@pytest.mark.parametrize("name", ["bad topic", "a/b", "ü", "", ".", "x" * 250])
def test_names_kafka_refuses(name: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot be a Kafka topic"):
        topic_name("", name)


def test_urls() -> None:
    assert parse_url("kafka://127.0.0.1:9092") == {"bootstrap.servers": "127.0.0.1:9092"}
    assert parse_url("kafka://u:p%40ss@h1:9092,h2:9092/?sasl_mechanism=SCRAM-SHA-256") == {
        "bootstrap.servers": "h1:9092,h2:9092", "sasl.username": "u", "sasl.password": "p@ss",
        "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256"}
    with pytest.raises(ConfigurationError, match="names no host"):
        parse_url("kafka://")
    with pytest.raises(ConfigurationError) as info:
        parse_url("redis://u:secret@h:1")
    assert "secret" not in str(info.value)


def test_offsets_commit_after_an_unbroken_run_of_acks() -> None:
    o = _Offsets()
    for offset in (5, 6, 7):
        o.handed_out(offset)
    assert not o.acked(6) and o.commit_at is None  # 5 is still out
    assert o.acked(5) and o.commit_at == 7
    assert not o.acked(42)  # never handed out here (another member's): ignored
    assert o.acked(7) and o.commit_at == 8
