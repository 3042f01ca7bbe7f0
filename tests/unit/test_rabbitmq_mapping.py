"""The AMQP message format, both ways, what a hostile message becomes, the retry
buckets and the names of the topology; no server needed."""

from __future__ import annotations

from typing import Any

import pytest

from outbox import Message, testing
from outbox.errors import PublishError
from outbox_rabbitmq.mapping import (
    MAX_DELAY_MS,
    MAX_REASON,
    Outgoing,
    attempt_of,
    dead_copy,
    dead_queue_name,
    queue_name,
    retry_bucket_ms,
    retry_copy,
    retry_queue_name,
    to_dead_letter,
    to_delivery,
    to_outgoing,
)


def received(out: Outgoing, **extra: Any) -> dict[str, Any]:
    """The headers as a consumer sees them: what was sent, plus what RabbitMQ adds."""
    return {**out.headers, **extra}


def broken_message(**values: Any) -> Message:
    return testing.broken_message(**{"payload": b"", **values})


def test_a_message_travels_in_amqp_fields_and_round_trips() -> None:
    sent = Message(id="m-1", topic="accounts.debit", key="acct", tag="debit",
                   headers={"traceparent": "00-x-y-01", "ünï": "✓ 张三", "empty": "",
                            "content-type": "application/json"},
                   payload=b"\x00\xff")
    out = to_outgoing(sent)
    assert (out.routing_key, out.message_id, out.body, out.content_type) == (
        "accounts.debit", "m-1", b"\x00\xff", "application/json")
    assert out.headers == {"traceparent": "00-x-y-01", "ünï": "✓ 张三", "empty": "",
                           "content-type": "application/json",
                           "x-outbox-key": "acct", "x-outbox-tag": "debit"}
    d = to_delivery("accounts.debit", out.message_id, received(out), out.body, handle="h")
    assert d.to_message() == sent
    assert (d.attempt, d.handle) == (1, "h")


def test_no_content_type_is_made_up() -> None:
    out = to_outgoing(Message(id="m", topic="t", payload=b"{}"))
    assert (out.content_type, out.headers) == (None, {})


def test_the_attempt_counts_retries_and_redeliveries() -> None:
    assert attempt_of({}) == 1
    assert attempt_of({"x-delivery-count": 0}) == 1  # basic.get's first delivery says 0
    assert attempt_of({"x-delivery-count": 2}) == 3
    assert attempt_of({"x-outbox-attempt": 3}) == 4
    assert attempt_of({"x-outbox-attempt": 3, "x-delivery-count": 1}) == 5
    assert attempt_of(None) == 1
    # Hostile counts count for nothing, never raise.
    assert attempt_of({"x-outbox-attempt": "x", "x-delivery-count": -5}) == 1
    assert attempt_of({"x-outbox-attempt": True, "x-delivery-count": [1]}) == 1
    assert attempt_of({"x-outbox-attempt": b"2"}) == 3


def test_absent_and_hostile_fields_become_none() -> None:
    d = to_delivery("t", b"\xff\xfe", {"x-outbox-key": b"\xfe", "x-outbox-tag": 7,
                                       "ok": b"\xff", "n": 5, "list": [1], "fine": b"yes",
                                       b"\xff": "v"}, "not bytes", handle=None)
    assert (d.message_id, d.key, d.tag, dict(d.headers), d.payload, d.attempt) == (
        None, None, None, {"fine": "yes"}, b"", 1)
    assert to_delivery("t", None, None, None, None).message_id is None
    assert to_delivery("t", "", "not a mapping", b"p", None).message_id is None  # type: ignore[arg-type]


def test_what_rabbitmq_adds_is_not_a_header_of_the_message() -> None:
    out = to_outgoing(Message(id="m", topic="t", headers={"x-request-id": "r"}, payload=b""))
    d = to_delivery("t", "m", received(out, **{
        "x-delivery-count": 1, "x-death": [{"count": 1}], "x-first-death-reason": "expired",
        "x-first-death-queue": "q", "x-outbox-attempt": 1}), b"", None)
    assert dict(d.headers) == {"x-request-id": "r"}
    assert d.attempt == 3


@pytest.mark.parametrize("name", ["x-outbox-key", "x-outbox-anything", "x-delivery-count",
                                  "x-death", "CC", "BCC"])
def test_a_reserved_header_is_refused(name: str) -> None:
    with pytest.raises(PublishError, match="is reserved"):
        to_outgoing(Message(id="m", topic="t", headers={name: "v"}, payload=b""))


def test_a_message_that_is_not_one_is_refused() -> None:
    with pytest.raises(PublishError, match="cannot be sent to RabbitMQ"):
        to_outgoing(broken_message(payload=None))
    with pytest.raises(PublishError, match="cannot be sent to RabbitMQ"):
        to_outgoing(broken_message(headers={"a": 1}))
    with pytest.raises(PublishError, match="cannot be sent to RabbitMQ"):
        to_outgoing(broken_message(key=5))


def test_what_amqp_cannot_carry_is_refused_with_the_reason() -> None:
    # A valid id (64 characters) can still be too long for AMQP's message-id.
    with pytest.raises(PublishError, match="its id takes 256 bytes"):
        to_outgoing(Message(id="\U0001f600" * 64, topic="t", payload=b""))
    with pytest.raises(PublishError, match="content header frame"):
        to_outgoing(Message(id="m", topic="t", headers={"big": "x" * 70_000}, payload=b""))


def test_a_retried_copy_counts_the_deliveries_so_far() -> None:
    sent = Message(id="m", topic="t", key="k", headers={"h": "v"}, payload=b"p")
    out = to_outgoing(sent)
    first = to_delivery("t", out.message_id, received(out, **{"x-delivery-count": 1}),
                        out.body, None)
    assert first.attempt == 2
    copy = retry_copy(first, "q.retry.1000ms", "boom " * 500)
    assert copy.routing_key == "q.retry.1000ms"
    assert copy.headers["x-outbox-attempt"] == 2
    assert len(copy.headers["x-outbox-retry-error"]) == 1000
    # What RabbitMQ added to the original is not carried over: the copy starts anew.
    assert "x-delivery-count" not in copy.headers
    again = to_delivery("t", copy.message_id, received(copy), copy.body, None)
    assert (again.attempt, again.to_message()) == (3, sent)


def test_a_dead_letter_keeps_the_message_and_says_who_and_why() -> None:
    out = to_outgoing(Message(id="m", topic="t", tag="debit", payload=b"p"))
    d = to_delivery("t", "m", received(out, **{"x-delivery-count": 2}), b"p", None)
    copy = dead_copy(d, "outbox.t.bank2.dead", "bank2", "handler failed")
    assert copy.headers == {"x-outbox-tag": "debit", "x-outbox-attempt": 3,
                            "x-outbox-dead-group": "bank2",
                            "x-outbox-dead-reason": "handler failed"}
    dead = to_dead_letter(copy.message_id, received(copy, **{"x-delivery-count": 4}),
                          copy.body)
    assert (dead.message_id, dead.group, dead.reason, dead.attempt, dead.tag, dead.payload,
            dict(dead.headers)) == ("m", "bank2", "handler failed", 3, "debit", b"p", {})
    assert len(dead_copy(d, "q", "g", "x" * 20_000).headers["x-outbox-dead-reason"]) == \
        MAX_REASON


def test_a_dead_letter_of_a_message_without_id_says_so() -> None:
    d = to_delivery("t", None, {}, b"junk", None)
    copy = dead_copy(d, "q", "g", "delivery has no message id")
    # aio-pika gives a message without id a random one: the marker wins over it.
    dead = to_dead_letter("3f2a9c", received(copy), copy.body)
    assert (dead.message_id, dead.reason) == (None, "delivery has no message id")


def test_a_dead_letter_rabbitmq_made_gives_its_reason() -> None:
    dead = to_dead_letter("m", {"x-first-death-reason": "rejected", "x-death": []}, b"")
    assert (dead.message_id, dead.group, dead.reason, dead.attempt) == (
        "m", None, "rejected", 1)
    assert to_dead_letter(None, None, None).payload == b""


@pytest.mark.parametrize(("delay", "bucket"), [
    (0, 0), (-1, 0), (float("nan"), 0), (0.0001, 100), (0.02, 100), (0.1, 100),
    (0.101, 200), (0.6, 600), (0.95, 1000), (1, 1000), (1.2, 2000), (59.5, 60_000),
    (60, 60_000), (61, 120_000), (3599, 3_600_000), (3601, 7_200_000),
    (10**9, MAX_DELAY_MS), (float("inf"), MAX_DELAY_MS)])
def test_a_delay_is_rounded_up_to_its_bucket(delay: float, bucket: int) -> None:
    assert retry_bucket_ms(delay) == bucket


def test_the_topology_names() -> None:
    assert queue_name("outbox", "transfers", "bank2") == "outbox.transfers.bank2"
    assert dead_queue_name("outbox", "transfers", "bank2") == "outbox.transfers.bank2.dead"
    assert retry_queue_name("outbox.transfers.bank2", 600) == \
        "outbox.transfers.bank2.retry.600ms"
