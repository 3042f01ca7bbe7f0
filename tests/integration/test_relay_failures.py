"""Relay failures: backoff, parking as dead, replay, and one bad row never blocking others."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import tenacity
from sqlalchemy import Engine

from outbox import Message, RelayConfig
from outbox.schema import DEAD, DISCARDED, PENDING, SENT, utcnow
from outbox.storage import counts

from .helpers import BatchRecordingPublisher, RecordingPublisher, add_messages, make_due, outbox_row
from .models import Model

ALWAYS = 10**9


def do(model: Model, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A relay method of either model, run to its end."""
    return model.run(lambda: model.call(fn, *args, **kwargs))


def msg(message_id: str, key: str | None = None) -> Message:
    return Message(topic="transfers", id=message_id, key=key, payload=message_id.encode())


def status_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return counts(conn)


def test_backoff_grows_then_the_row_is_dead_then_replayed(model: Model, engine: Engine) -> None:
    publisher = RecordingPublisher(failures={"bad": ALWAYS})
    relay = model.relay(
        model.publisher(publisher),
        config=RelayConfig(
            max_attempts=4, backoff=tenacity.wait_exponential(multiplier=1, min=1, max=300)
        ),
    )
    add_messages(engine, [msg("bad", key="k1"), msg("later", key="k1"), msg("other", key="k2")])

    delays = []
    for attempt in (1, 2, 3):
        before = utcnow()
        result = do(model, relay.run_once)
        assert (result.failed, result.dead) == (1, 0)
        row = outbox_row(engine, "bad")
        assert (row.status, row.attempts) == (PENDING, attempt)
        assert row.last_error == "BrokerUnavailableError: injected failure for bad"
        delay = (row.next_attempt_at - before).total_seconds()
        assert row.next_attempt_at > utcnow()
        delays.append(delay)
        # Same key, later row: held back while "bad" is pending.
        assert "later" not in publisher.ids()
        assert do(model, relay.run_once).claimed == 0  # nothing is due during the backoff
        make_due(engine, "bad")
    assert publisher.ids() == ["other"]  # another key was not held up
    # 1 s, 2 s, 4 s, plus however long the relay's own batch took
    assert all(
        expected <= d < expected + 1 for d, expected in zip(delays, [1, 2, 4], strict=True)
    ), delays

    result = do(model, relay.run_once)
    assert (result.failed, result.dead) == (1, 1)
    row = outbox_row(engine, "bad")
    assert (row.status, row.attempts) == (DEAD, 4)
    assert row.last_error == "BrokerUnavailableError: injected failure for bad"
    assert publisher.attempts["bad"] == 4

    # A dead row keeps its key parked: "later" waits until "bad" is replayed or discarded.
    assert do(model, relay.run_once).claimed == 0
    assert publisher.ids() == ["other"]
    assert outbox_row(engine, "later").status == PENDING

    [dead] = do(model, relay.dead)
    assert (dead.message_id, dead.topic, dead.key, dead.attempts) == ("bad", "transfers", "k1", 4)
    assert dead.last_error is not None and "injected failure" in dead.last_error

    publisher.failures.clear()
    assert do(model, relay.replay) == 1
    row = outbox_row(engine, "bad")
    assert (row.status, row.attempts) == (PENDING, 0)
    assert do(model, relay.drain, timeout=10) == 2
    assert publisher.ids() == ["other", "bad", "later"]  # the key's commit order
    assert do(model, relay.dead) == []
    assert status_counts(engine) == {PENDING: 0, SENT: 3, DEAD: 0, DISCARDED: 0}
    assert outbox_row(engine, "bad").last_error is None


def test_replay_of_named_rows_only(model: Model, engine: Engine) -> None:
    publisher = RecordingPublisher(failures={"a": ALWAYS, "b": ALWAYS})
    relay = model.relay(model.publisher(publisher), config=RelayConfig(max_attempts=1))
    add_messages(engine, [msg("a"), msg("b")])
    assert do(model, relay.run_once).dead == 2
    publisher.failures.clear()
    assert do(model, relay.replay, ["b", "no-such-id"]) == 1
    assert do(model, relay.replay, []) == 0
    do(model, relay.drain, timeout=10)
    assert publisher.ids() == ["b"]
    assert [d.message_id for d in do(model, relay.dead)] == ["a"]


def test_one_bad_row_does_not_block_other_keys_beyond_one_batch(
    model: Model, engine: Engine
) -> None:
    """More rows of the failing key than fit in a batch must not starve other keys."""
    publisher = RecordingPublisher(failures={"bad": ALWAYS})
    relay = model.relay(
        model.publisher(publisher), config=RelayConfig(batch_size=5, max_attempts=10)
    )
    add_messages(engine, [msg("bad", key="stuck")])
    add_messages(engine, [msg(f"stuck-{i}", key="stuck") for i in range(12)])
    add_messages(engine, [msg("free-1", key="free"), msg("free-2"), msg("free-3", key="other")])

    for _ in range(6):
        do(model, relay.run_once)
    assert publisher.ids() == ["free-1", "free-2", "free-3"]
    assert outbox_row(engine, "bad").attempts == 1  # in its backoff, not retried yet
    assert all(outbox_row(engine, f"stuck-{i}").status == PENDING for i in range(12))


def test_failing_batch_publish_falls_back_to_one_by_one(model: Model, engine: Engine) -> None:
    publisher = BatchRecordingPublisher(failures={"m-3": ALWAYS})
    relay = model.relay(model.publisher(publisher), config=RelayConfig(max_attempts=3))
    add_messages(engine, [msg(f"m-{i}", key="k" if i >= 3 else None) for i in range(6)])
    result = do(model, relay.run_once)
    assert (result.claimed, result.published, result.failed) == (6, 3, 1)
    assert publisher.batches == [[f"m-{i}" for i in range(6)]]
    # m-4 and m-5 share m-3's key: not published ahead of it.
    assert publisher.ids() == ["m-0", "m-1", "m-2"]
    assert publisher.counts() == {"m-0": 1, "m-1": 1, "m-2": 1}
    assert outbox_row(engine, "m-3").attempts == 1


def test_delete_sent_removes_rows_instead_of_marking_them(model: Model, engine: Engine) -> None:
    publisher = RecordingPublisher()
    relay = model.relay(model.publisher(publisher), config=RelayConfig(delete_sent=True))
    add_messages(engine, [msg("a"), msg("b")])
    assert do(model, relay.drain, timeout=10) == 2
    assert status_counts(engine) == {PENDING: 0, SENT: 0, DEAD: 0, DISCARDED: 0}


def test_large_payload_and_headers_reach_the_publisher_intact(model: Model, engine: Engine) -> None:
    payload = bytes(range(256)) * 1200  # 300 KiB, every byte value
    sent = Message(
        topic="transfers",
        id="big",
        key="k",
        tag="t",
        payload=payload,
        headers={"trace": "ü-✓-张三", "n": "1"},
    )
    add_messages(engine, [sent])
    publisher = RecordingPublisher()
    do(model, model.relay(model.publisher(publisher)).drain, timeout=10)
    assert publisher.published == [sent]


def test_sent_row_records_its_time(model: Model, engine: Engine) -> None:
    relay = model.relay(model.publisher(RecordingPublisher()))
    add_messages(engine, [msg("a")])
    before = utcnow()
    do(model, relay.drain, timeout=10)
    row = outbox_row(engine, "a")
    assert row.status == SENT
    assert before - dt.timedelta(seconds=1) <= row.sent_at <= utcnow() + dt.timedelta(seconds=1)
    assert row.attempts == 0


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_rows_die_after_exactly_max_attempts(
    model: Model, engine: Engine, max_attempts: int
) -> None:
    publisher = RecordingPublisher(failures={"x": ALWAYS})
    relay = model.relay(
        model.publisher(publisher),
        config=RelayConfig(max_attempts=max_attempts, backoff=tenacity.wait_fixed(0)),
    )
    add_messages(engine, [msg("x")])
    do(model, relay.drain, timeout=10)
    assert publisher.attempts["x"] == max_attempts
    assert outbox_row(engine, "x").status == DEAD
