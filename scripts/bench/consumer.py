"""The receiving side: the idempotent consumer (inbox row + handler in one
transaction, then the acknowledgement) against the same handler in a transaction of
its own without the inbox."""

from __future__ import annotations

import json
import random
import time
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox import IdempotentConsumer
from outbox.transport import Delivery

from . import write
from .common import Report, Timings, fresh_engine, ratio


class NullSubscriber:
    """Deliveries are handed to the consumer directly; acknowledgements go nowhere."""

    def fetch(self, max_messages: int, wait_seconds: float) -> list[Delivery]:
        return []

    def ack(self, delivery: Delivery) -> None:
        pass

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        raise SystemExit(f"bench: the handler failed: {error}")

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        raise SystemExit(f"bench: dead-lettered: {reason}")


def run(url: str, report: Report, *, iterations: int) -> None:
    engine = fresh_engine(url)
    write.setup(engine)
    credit = (update(write.accounts).where(write.accounts.c.id == bindparam("account"))
              .values(balance=write.accounts.c.balance + bindparam("amount")))

    def handler(session: Session, message: Any) -> None:
        session.execute(credit, {"account": message.body["account"],
                                 "amount": message.body["amount"]})

    consumer = IdempotentConsumer(engine, NullSubscriber(), "bench-group", handler)
    factory = sessionmaker(engine)
    codec = outbox.JsonCodec()

    def bare(delivery: Delivery) -> None:
        body = codec.decode(delivery.payload)
        with factory() as session, session.begin():
            session.execute(credit, {"account": body["account"], "amount": body["amount"]})

    rnd = random.Random(11)
    timings = {"inbox": Timings(), "bare": Timings()}
    warmup = max(50, iterations // 10)
    for i in range(warmup + iterations):
        payload = json.dumps({"account": rnd.randrange(write.ACCOUNTS), "amount": 1}).encode()
        order = [("inbox", consumer.handle), ("bare", bare)]
        rnd.shuffle(order)
        for name, fn in order:
            delivery = Delivery(topic="bench.consume", payload=payload,
                                message_id=f"{name}-{i}", attempt=1)
            start = time.perf_counter()
            fn(delivery)
            took = time.perf_counter() - start
            if i >= warmup:
                timings[name].add(took)
    engine.dispose()
    t_in, t_bare = timings["inbox"], timings["bare"]
    value = ratio(t_in.ms(50), t_bare.ms(50))
    report.figure("consumer_inbox_vs_bare", value)
    for name, t in timings.items():
        report.row(f"consume {name} p50/p95/p99 ms",
                   f"{t.ms(50):.3f}/{t.ms(95):.3f}/{t.ms(99):.3f}", f"n={len(t.values)}")
    report.row("consumer_inbox_vs_bare (p50)", f"{value:.2f}",
               "inbox row + handler + ack vs the handler's own transaction")
    report.detail("consumer", {name: t.summary() for name, t in timings.items()})
