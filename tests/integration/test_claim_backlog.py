"""Claiming at a large backlog keeps every guarantee: per-key commit order, keys parked
behind a dead row, rows backing off that hold back only their own key, a replayed row
leaving before the rows it held back, and several relays at once.

The backlog is what a broker outage leaves: tens of thousands of pending rows, the
oldest of some keys backing off, one dead."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter, defaultdict

from sqlalchemy import Engine, insert, update

from outbox import Message, Relay, RelayConfig
from outbox.schema import DEAD, outbox_messages, utcnow
from outbox.storage import claim, message_row

from .helpers import RecordingPublisher

ROWS = 20_000
KEYS = 200
BACKING_OFF = {"k1", "k2", "k3"}  # their oldest row is due in an hour
DEAD_KEY = "k4"  # its oldest row is dead


def key_of(i: int) -> str | None:
    return None if i % 10 == 0 else f"k{i % KEYS}"


def fill(engine: Engine) -> list[Message]:
    messages = [Message(topic="t", id=f"m-{i:06d}", key=key_of(i), payload=b"{}")
                for i in range(ROWS)]
    now = utcnow() - dt.timedelta(minutes=5)
    with engine.begin() as conn:
        for start in range(0, ROWS, 2000):
            conn.execute(insert(outbox_messages),
                         [message_row(m, now) for m in messages[start:start + 2000]])
    heads = {k: next(m.id for m in messages if m.key == k) for k in BACKING_OFF | {DEAD_KEY}}
    with engine.begin() as conn:
        T = outbox_messages
        conn.execute(update(T).where(T.c.message_id.in_([heads[k] for k in BACKING_OFF]))
                     .values(attempts=3, next_attempt_at=utcnow() + dt.timedelta(hours=1)))
        conn.execute(update(T).where(T.c.message_id == heads[DEAD_KEY])
                     .values(status=DEAD, attempts=10, last_error="gave up"))
    return messages


def drain_with(engine: Engine, relays: list[Relay]) -> None:
    """Run the relays in threads until none of them can claim anything.

    An empty claim alone does not mean that: rows queued behind a batch another relay
    holds are held back until it commits. A relay stops only after an empty claim it
    began while no other relay had a batch in hand.
    """
    errors: list[BaseException] = []
    lock = threading.Lock()
    busy = [0]

    def work(relay: Relay) -> None:
        try:
            while True:
                with lock:
                    alone = busy[0] == 0
                    busy[0] += 1
                try:
                    claimed = relay.run_once().claimed
                finally:
                    with lock:
                        busy[0] -= 1
                if not claimed:
                    if alone:
                        return
                    time.sleep(0.005)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []


def test_a_large_backlog_keeps_order_parking_and_backoff_with_two_relays(
        engine: Engine) -> None:
    messages = fill(engine)
    held = BACKING_OFF | {DEAD_KEY}

    # Backoff and parking hold back their own key only: the first claim is a full batch.
    with engine.connect() as conn, conn.begin() as tx:
        first = claim(conn, 100, utcnow())
        tx.rollback()
    assert len(first) == 100
    assert not {r.message.key for r in first} & held

    publisher = RecordingPublisher()
    config = RelayConfig(batch_size=100)
    drain_with(engine, [Relay(engine, publisher, config), Relay(engine, publisher, config)])

    published = publisher.counts()
    assert set(published.values()) == {1}, "a row was published twice"
    expected = {m.id for m in messages if m.key not in held}
    assert set(published) == expected, "rows of free keys were left, or held rows went"

    # The operator replays the dead row and the backoffs run out: the held keys flow,
    # each starting with the row that held it back.
    with engine.begin() as conn:
        conn.execute(update(outbox_messages).where(outbox_messages.c.status == DEAD)
                     .values(status="pending", attempts=0, next_attempt_at=utcnow()))
        conn.execute(update(outbox_messages)
                     .where(outbox_messages.c.next_attempt_at > utcnow())
                     .values(next_attempt_at=utcnow()))
    drain_with(engine, [Relay(engine, publisher, config), Relay(engine, publisher, config)])

    assert publisher.counts() == Counter({m.id: 1 for m in messages})
    by_key: dict[str, list[str]] = defaultdict(list)
    for m in publisher.published:
        if m.key is not None:
            by_key[m.key].append(m.id)
    for key, ids in by_key.items():
        assert ids == [m.id for m in messages if m.key == key], f"{key} out of commit order"
