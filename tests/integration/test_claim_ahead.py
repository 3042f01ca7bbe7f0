"""Claiming ahead: while a full batch publishes, the relay claims the next one on a
second connection. Order, exactly-once marking and the rollback of a batch claimed
ahead but never published hold on every database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import Engine, text

from outbox import Message, RelayConfig, storage
from outbox.schema import PENDING, SENT
from outbox.storage import counts

from .helpers import RecordingPublisher, add_messages
from .models import Model

BATCH = 20


class Halt(BaseException):
    """Not an Exception: it ends the relay the way a KeyboardInterrupt would."""


def unlocked_pending(engine: Engine) -> int:
    """Pending rows no transaction holds (PostgreSQL and MariaDB)."""
    with engine.begin() as conn:
        return len(conn.execute(text(
            "SELECT seq FROM outbox_messages WHERE status = 'pending' FOR UPDATE SKIP LOCKED"
        )).all())


def status_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return counts(conn)


def drain(model: Model, publisher: Any, **config: Any) -> int:
    relay = model.relay(model.publisher(publisher), config=RelayConfig(batch_size=BATCH, **config))
    return int(model.run(lambda: model.call(relay.drain, timeout=60)))


def test_one_hot_key_drains_in_order_though_each_claim_ahead_finds_it_held(
    model: Model,
) -> None:
    # Every row of the hot key queues behind the batch in flight, so each claim made
    # ahead comes back empty; the relay must claim again once the batch commits
    # instead of taking the empty claim for "nothing left".
    messages = [Message(topic="t", id=f"h-{i:03d}", key="hot", payload=b"%d" % i)
                for i in range(7 * BATCH)]
    add_messages(model.engine, messages)
    publisher = RecordingPublisher()

    assert drain(model, publisher) == len(messages)
    assert publisher.ids() == [m.id for m in messages]
    assert status_counts(model.engine)[SENT] == len(messages)


def test_many_keys_drain_exactly_once_in_key_order(model: Model) -> None:
    messages = [Message(topic="t", id=f"m-{i:04d}", key=None if i % 5 == 0 else f"k{i % 13}",
                        payload=b"%d" % i) for i in range(25 * BATCH + 7)]
    add_messages(model.engine, messages)
    publisher = RecordingPublisher()

    assert drain(model, publisher) == len(messages)
    published = publisher.ids()
    assert sorted(published) == sorted(m.id for m in messages)  # each once
    for key in {m.key for m in messages if m.key}:
        mine = [m.id for m in messages if m.key == key]
        assert [i for i in published if i in set(mine)] == mine
    assert status_counts(model.engine)[PENDING] == 0
    assert model.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


class HaltOnSecondBatch:
    """Publishes the first batch and halts on the second. At each batch it records
    how many rows the relay holds locked, once the claims it expects have landed
    (``claims`` counts the relay's claims: the probe locks rows itself, so it must not
    run while a claim does). :class:`SyncHalt` and :class:`AsyncHalt` wait for them."""

    def __init__(self, engine: Engine, total: int, claims: list[int], ahead: bool) -> None:
        self.recorder = RecordingPublisher()
        self.db = engine  # not .engine: that names a SQL transport's own database
        self.total = total
        self.claims = claims
        self.skip_locked = engine.dialect.name != "sqlite"
        self.expect_ahead = ahead and self.skip_locked
        self.held: list[int] = []

    def ready(self) -> bool:
        """Every claim expected by now has landed."""
        return len(self.claims) >= len(self.held) + 1 + (1 if self.expect_ahead else 0)

    def record(self, messages: list[Message]) -> None:
        # A claim that should not happen would have landed by now.
        assert len(self.claims) == len(self.held) + 1 + (1 if self.expect_ahead else 0)
        sent = BATCH * len(self.held)
        self.held.append(self.total - sent - unlocked_pending(self.db)
                         if self.skip_locked else -1)
        if len(self.held) == 2:
            raise Halt
        for m in messages:
            self.recorder.publish(m)


class SyncHalt(HaltOnSecondBatch):
    def publish(self, message: Message) -> None:
        self.recorder.publish(message)

    def publish_batch(self, messages: list[Message]) -> None:
        deadline = time.monotonic() + 10
        while not self.ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        self.record(messages)

    def close(self) -> None:
        pass


class AsyncHalt(HaltOnSecondBatch):
    async def publish(self, message: Message) -> None:
        self.recorder.publish(message)

    async def publish_batch(self, messages: list[Message]) -> None:
        deadline = time.monotonic() + 10
        while not self.ready() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        self.record(messages)

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("claim_ahead", [True, False], ids=["ahead", "not-ahead"])
def test_a_halt_mid_batch_rolls_back_the_batch_and_the_one_claimed_ahead(
    model: Model, claim_ahead: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = model.engine
    total = 6 * BATCH
    messages = [Message(topic="t", id=f"x-{i:03d}", key=f"k{i}", payload=b"x")
                for i in range(total)]
    add_messages(engine, messages)
    claims: list[int] = []
    real_claim = storage.claim

    def counted_claim(*args: Any, **kwargs: Any) -> list[storage.ClaimedRow]:
        rows = real_claim(*args, **kwargs)
        claims.append(len(rows))
        return rows

    monkeypatch.setattr(storage, "claim", counted_claim)
    kind = AsyncHalt if model.is_async else SyncHalt
    publisher = kind(engine, total, claims, claim_ahead)
    relay = model.relay(publisher, config=RelayConfig(batch_size=BATCH, claim_ahead=claim_ahead))

    with pytest.raises(Halt):
        model.run(lambda: model.call(relay.drain, timeout=60))

    if publisher.skip_locked:  # SQLite claims nothing ahead: it has one writer
        # While a batch published, the relay held it and, claiming ahead, the next.
        expected = 2 * BATCH if claim_ahead else BATCH
        assert publisher.held == [expected, expected]
        assert claims == [BATCH] * (3 if claim_ahead else 2)
        assert unlocked_pending(engine) == total - BATCH  # nothing left locked
    # Only the first batch is marked; both open transactions rolled back.
    assert status_counts(engine)[SENT] == BATCH
    assert status_counts(engine)[PENDING] == total - BATCH

    # A new relay publishes the rest, each once.
    monkeypatch.undo()
    rest = RecordingPublisher()
    assert drain(model, rest) == total - BATCH
    assert sorted(rest.ids() + publisher.recorder.ids()) == sorted(m.id for m in messages)
