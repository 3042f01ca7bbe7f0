"""The transport contract: every transport runs every test; a test marked
``needs(feature)`` runs only on transports that declare that feature (see
``Features``), and is deselected for the others."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from outbox import Message, PublishError
from outbox.typing import BatchPublisher

from .transports import Features, TransportUnderTest, message


def fetch_all(sub: object, expected: int, timeout: float = 10.0) -> list:  # type: ignore[type-arg]
    """Fetch until ``expected`` deliveries arrived (or the timeout), acknowledging each."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = sub.fetch(50, 0.2)  # type: ignore[attr-defined]
        for d in batch:
            sub.ack(d)  # type: ignore[attr-defined]
        got.extend(batch)
    return got


def test_features_are_declared(transport: TransportUnderTest) -> None:
    assert isinstance(transport.features, Features)


def test_publish_then_fetch_keeps_every_field(transport: TransportUnderTest) -> None:
    sent = message(
        id="m-0001", key="account-1", tag="debit",
        headers={"trace": "abc", "ünï": "✓ 张三", "empty": ""},
        payload=b"\x00\xff\xfe not utf-8 \x80\xc3(",
    )
    sub = transport.subscriber("contract", "g")
    transport.publisher().publish(sent)

    [d] = sub.fetch(10, 2.0)
    assert (d.topic, d.message_id, d.key, d.tag, d.attempt) == (
        "contract", "m-0001", "account-1", "debit", 1
    )
    assert d.payload == sent.payload and type(d.payload) is bytes
    assert dict(d.headers) == {"trace": "abc", "ünï": "✓ 张三", "empty": ""}
    assert d.to_message() == sent


def test_large_binary_payload_is_intact(transport: TransportUnderTest) -> None:
    payload = random.Random(7).randbytes(300_000)  # past MySQL's 64 KiB BLOB
    transport.publisher().publish(message(id="big", payload=payload))
    [d] = transport.subscriber("contract", "g").fetch(10, 2.0)
    assert d.payload == payload


def test_optional_fields_may_be_absent(transport: TransportUnderTest) -> None:
    transport.publisher().publish(message(id="bare", payload=b""))
    [d] = transport.subscriber("contract", "g").fetch(10, 2.0)
    assert (d.message_id, d.key, d.tag, dict(d.headers), d.payload) == ("bare", None, None, {}, b"")


def test_only_the_subscribed_topic_is_delivered(transport: TransportUnderTest) -> None:
    pub = transport.publisher()
    pub.publish(message("other", id="o-1"))
    pub.publish(message("contract", id="c-1"))
    assert [d.message_id for d in transport.subscriber("contract", "g").fetch(10, 1.0)] == ["c-1"]


@pytest.mark.needs("ordered")
def test_fetch_hands_out_at_most_max_messages_in_publish_order(
    transport: TransportUnderTest,
) -> None:
    pub = transport.publisher()
    ids = [f"m-{i:03d}" for i in range(12)]
    for i in ids:
        pub.publish(message(id=i))
    sub = transport.subscriber("contract", "g")
    first = sub.fetch(5, 1.0)
    assert [d.message_id for d in first] == ids[:5]
    rest = fetch_all(sub, 7)
    assert [d.message_id for d in rest] == ids[5:]


def test_ack_removes_the_message(transport: TransportUnderTest) -> None:
    transport.publisher().publish(message(id="m-1"))
    sub = transport.subscriber("contract", "g", visibility_timeout=0.2)
    [d] = sub.fetch(10, 2.0)
    sub.ack(d)
    time.sleep(0.3)  # past the visibility timeout: an acknowledged message stays gone
    assert sub.fetch(10, 0.2) == []
    assert transport.dead_letters("contract", "g") == []


@pytest.mark.needs("redelivers_after_visibility_timeout")
def test_unacknowledged_message_comes_back_after_the_visibility_timeout(
    transport: TransportUnderTest,
) -> None:
    transport.publisher().publish(message(id="m-1", payload=b"x"))
    sub = transport.subscriber("contract", "g", visibility_timeout=0.4)
    taken = time.monotonic()
    [first] = sub.fetch(10, 2.0)
    assert first.attempt == 1
    assert sub.fetch(10, 0.0) == []  # hidden while in flight

    [again] = sub.fetch(10, 3.0)
    assert time.monotonic() - taken >= 0.35  # 0.4 s, less clock granularity
    assert (again.message_id, again.attempt, again.payload) == ("m-1", 2, b"x")
    sub.ack(again)
    assert sub.fetch(10, 0.6) == []


def test_retry_hides_the_message_for_the_delay(transport: TransportUnderTest) -> None:
    transport.publisher().publish(message(id="m-1"))
    sub = transport.subscriber("contract", "g", visibility_timeout=30)
    [d] = sub.fetch(10, 2.0)
    retried = time.monotonic()
    sub.retry(d, 0.6, "handler failed")
    assert sub.fetch(10, 0.3) == []

    [again] = sub.fetch(10, 3.0)
    assert time.monotonic() - retried >= 0.55
    assert (again.message_id, again.attempt) == ("m-1", 2)


def test_retry_with_no_delay_is_visible_at_once(transport: TransportUnderTest) -> None:
    transport.publisher().publish(message(id="m-1"))
    sub = transport.subscriber("contract", "g", visibility_timeout=30)
    [d] = sub.fetch(10, 2.0)
    sub.retry(d, 0, "again")
    [again] = sub.fetch(10, 1.0)
    assert again.attempt == 2


def test_dead_letter_keeps_it_out_and_lists_the_reason(transport: TransportUnderTest) -> None:
    pub = transport.publisher()
    pub.publish(message(id="bad"))
    pub.publish(message(id="good"))
    sub = transport.subscriber("contract", "g", visibility_timeout=0.2)
    bad, good = sub.fetch(10, 2.0)
    reason = "undecodable message: payload is empty " + "x" * 1500
    sub.dead_letter(bad, reason)
    sub.ack(good)
    time.sleep(0.3)
    assert sub.fetch(10, 0.2) == []
    assert transport.dead_letters("contract", "g") == [("bad", reason)]
    # Another group is not affected by this group's dead letter.
    other = transport.subscriber("contract", "other")
    assert {d.message_id for d in fetch_all(other, 2)} == {"bad", "good"}
    assert transport.dead_letters("contract", "other") == []


def test_every_group_gets_every_message(transport: TransportUnderTest) -> None:
    pub = transport.publisher()
    ids = [f"m-{i}" for i in range(15)]
    a = transport.subscriber("contract", "group-a")
    for i in ids[:5]:
        pub.publish(message(id=i))
    assert len(fetch_all(a, 5)) == 5  # group-a has already consumed these
    for i in ids[5:]:
        pub.publish(message(id=i))
    b = transport.subscriber("contract", "group-b")  # a late group still sees all
    assert sorted(d.message_id for d in fetch_all(a, 10)) == sorted(ids[5:])
    assert sorted(d.message_id for d in fetch_all(b, 15)) == sorted(ids)


def test_subscribers_of_one_group_never_share_a_message(transport: TransportUnderTest) -> None:
    total = 150
    pub = transport.publisher()
    for i in range(total):
        pub.publish(message(id=f"m-{i:04d}"))

    lock = threading.Lock()
    in_flight: set[str] = set()
    overlaps: list[str] = []
    acked: Counter[str] = Counter()
    errors: list[BaseException] = []
    done = threading.Event()

    def work() -> None:
        sub = transport.subscriber("contract", "g", visibility_timeout=60)
        try:
            while not done.is_set():
                for d in sub.fetch(4, 0.05):
                    assert d.message_id is not None
                    with lock:
                        if d.message_id in in_flight:
                            overlaps.append(d.message_id)
                        in_flight.add(d.message_id)
                    time.sleep(0.001)
                    with lock:
                        in_flight.discard(d.message_id)
                        acked[d.message_id] += 1
                    sub.ack(d)
                with lock:
                    if sum(acked.values()) >= total:
                        done.set()
        except BaseException as exc:
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    done.wait(30)
    done.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert overlaps == []
    assert len(acked) == total
    assert set(acked.values()) == {1}


@pytest.mark.needs("batch_publish")
def test_publish_batch_is_all_or_nothing(transport: TransportUnderTest) -> None:
    pub = transport.publisher()
    assert isinstance(pub, BatchPublisher)
    # A message that slipped past validation: the store must refuse it, and with it
    # every other message of the batch.
    broken = object.__new__(Message)
    for name, value in {"topic": "contract", "payload": None, "id": "broken", "key": None,
                        "tag": None, "headers": {}}.items():
        object.__setattr__(broken, name, value)
    with pytest.raises(PublishError):
        pub.publish_batch([message(id="b-1"), message(id="b-2"), broken])
    sub = transport.subscriber("contract", "g")
    assert sub.fetch(10, 0.3) == []

    pub.publish_batch([message(id="c-1"), message(id="c-2"), message(id="c-3")])
    assert [d.message_id for d in fetch_all(sub, 3)] == ["c-1", "c-2", "c-3"]


def test_fetch_waits_up_to_wait_seconds_then_returns_empty(
    transport: TransportUnderTest,
) -> None:
    sub = transport.subscriber("contract", "g")
    start = time.monotonic()
    assert list(sub.fetch(10, 0.5)) == []
    elapsed = time.monotonic() - start
    assert 0.45 <= elapsed < 3.0
    start = time.monotonic()
    assert list(sub.fetch(10, 0)) == []
    assert time.monotonic() - start < 1.0


def test_fetch_returns_as_soon_as_a_message_arrives(transport: TransportUnderTest) -> None:
    sub = transport.subscriber("contract", "g")
    timer = threading.Timer(0.2, lambda: transport.publisher().publish(message(id="late")))
    start = time.monotonic()
    timer.start()
    try:
        got = sub.fetch(10, 10.0)
    finally:
        timer.join()
    assert [d.message_id for d in got] == ["late"]
    assert time.monotonic() - start < 5.0


@pytest.mark.needs("shared_between_processes")
def test_another_process_can_publish(transport: TransportUnderTest) -> None:
    ids = [f"p-{i}" for i in range(5)]
    transport.publish_from_another_process("contract", ids)
    got = fetch_all(transport.subscriber("contract", "g"), 5)
    assert [(d.message_id, d.payload) for d in got] == [(i, i.encode()) for i in ids]
