"""Commit to consumed: at a steady 200 transactions per second, how long from the
commit until a consumer on the broker has the message, through the outbox and its
relay, against publishing right after the commit (which is not atomic: the baseline
a user gives up for atomicity)."""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.orm import Session, sessionmaker

import outbox

from . import write
from .common import Report, Timings, fresh_engine, ratio
from .redis_publisher import RedisListPublisher, client

TOPIC = "bench.e2e"
RATE = 200.0


class Consumer(threading.Thread):
    """BLPOP the topic's list; the receive time of each message id."""

    def __init__(self, expected: int) -> None:
        super().__init__(daemon=True, name="bench-consumer")
        self.expected = expected
        self.received: dict[str, float] = {}
        self.conn = client()
        self.done = threading.Event()

    def run(self) -> None:
        while len(self.received) < self.expected:
            item = self.conn.blpop([TOPIC], timeout=1)
            if item is None:
                if self.done.is_set():
                    return
                continue
            now = time.perf_counter()
            message_id = item[1].split(b"\n", 1)[0].decode()
            self.received.setdefault(message_id, now)


def paced(count: int, step: Any) -> dict[str, float]:
    """Call ``step(i)`` ``count`` times at RATE per second; ``step`` returns the id and
    the moment its commit returned."""
    committed: dict[str, float] = {}
    start = time.perf_counter()
    for i in range(count):
        due = start + i / RATE
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        message_id, at = step(i)
        committed[message_id] = at
    return committed


def latencies(committed: dict[str, float], consumer: Consumer, timeout: float) -> Timings:
    deadline = time.monotonic() + timeout
    while len(consumer.received) < len(committed) and time.monotonic() < deadline:
        time.sleep(0.05)
    consumer.done.set()
    missing = [m for m in committed if m not in consumer.received]
    if missing:
        raise SystemExit(f"bench: {len(missing)} of {len(committed)} messages never arrived")
    t = Timings()
    for message_id, at in committed.items():
        t.add(consumer.received[message_id] - at)
    return t


def run(url: str, report: Report, *, count: int) -> None:
    engine = fresh_engine(url)
    write.setup(engine)
    client().delete(TOPIC)
    debit = (update(write.accounts).where(write.accounts.c.id == bindparam("account"))
             .values(balance=write.accounts.c.balance - 1))
    factory = sessionmaker(engine)
    direct_client = client()

    # Publish right after the commit.
    def direct(i: int) -> tuple[str, float]:
        message_id = f"d{i}"
        with factory() as session, session.begin():
            session.execute(debit, {"account": i % write.ACCOUNTS})
        at = time.perf_counter()
        direct_client.rpush(TOPIC, message_id.encode() + b"\n{}")
        return message_id, at

    consumer = Consumer(count)
    consumer.start()
    report.progress(f"e2e: {count} transfers at {RATE:.0f}/s, publish after commit")
    direct_t = latencies(paced(count, direct), consumer, 30)

    # Through the outbox: the relay runs beside the service, woken by its commits.
    box = outbox.Outbox(engine)

    @box.transactional_message(topic=TOPIC, message_id="transfer_no")
    def transfer(session: Session, account: int, transfer_no: str) -> None:
        session.execute(debit, {"account": account})

    relay = box.relay(RedisListPublisher(client())).start()

    def via_outbox(i: int) -> tuple[str, float]:
        message_id = f"o{i}"
        transfer(i % write.ACCOUNTS, message_id)
        return message_id, time.perf_counter()

    consumer = Consumer(count)
    consumer.start()
    report.progress(f"e2e: {count} transfers at {RATE:.0f}/s, through the outbox")
    try:
        outbox_t = latencies(paced(count, via_outbox), consumer, 60)
    finally:
        relay.stop()
        engine.dispose()
    value = ratio(outbox_t.ms(99), direct_t.ms(99))
    report.figure("e2e_p99_vs_direct", value)
    for name, t in (("publish after commit", direct_t), ("outbox + relay", outbox_t)):
        report.row(f"e2e {name} p50/p95/p99 ms",
                   f"{t.ms(50):.2f}/{t.ms(95):.2f}/{t.ms(99):.2f}", f"n={len(t.values)}")
    report.row("e2e_p99_vs_direct", f"{value:.2f}", "target <= 2 (relay in the service, nudged)")
    report.detail("e2e", {"rate": RATE, "direct": direct_t.summary(), "outbox": outbox_t.summary()})
