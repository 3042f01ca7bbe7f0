"""The instrumentation seam's cost: the write path and the relay with no observer
(the seam's truth tests only) against the same with the Prometheus observer counting
every event, interleaved in one run; and the unused seam's checks against the write."""

from __future__ import annotations

import gc
import random
import time
import timeit
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.orm import Session

import outbox
from outbox import instrument

from . import relay as relay_part
from . import write
from .common import Report, Timings, fresh_engine, ratio
from .redis_publisher import RedisListPublisher, client

#: The seam's checks on one message's way (decorator, commit, claim, publish, result).
CHECKS_PER_MESSAGE = 5


def _observer() -> Any:
    from prometheus_client import CollectorRegistry

    from outbox.metrics import PrometheusObserver

    return PrometheusObserver(CollectorRegistry())


def run(url: str, report: Report, *, iterations: int, messages: int) -> None:
    engine = fresh_engine(url)
    write.setup(engine)
    debit = (update(write.accounts).where(write.accounts.c.id == bindparam("account"))
             .values(balance=write.accounts.c.balance - bindparam("amount")))
    box = outbox.Outbox(engine)

    @box.transactional_message(topic="bench.seam", key="account")
    def transfer(session: Session, account: int, amount: int, transfer_no: str) -> None:
        session.execute(debit, {"account": account, "amount": amount})

    observer = _observer()
    timings = {"unobserved": Timings(), "observed": Timings()}
    rnd = random.Random(11)
    warmup = max(50, iterations // 10)
    names = list(timings)
    gc.collect()
    for i in range(warmup + iterations):
        rnd.shuffle(names)
        for name in names:
            remove = instrument.add_observer(observer) if name == "observed" else None
            start = time.perf_counter()
            transfer(rnd.randrange(write.ACCOUNTS), 1, f"S{i}-{name}")
            took = time.perf_counter() - start
            if remove is not None:
                remove()
            if i >= warmup:
                timings[name].add(took)
        if i and i % 1000 == 0:
            report.progress(f"seam write: {i}/{warmup + iterations}")
    engine.dispose()
    u, o = timings["unobserved"], timings["observed"]
    write_ratio = ratio(o.ms(50), u.ms(50))
    report.figure("seam_write_observed_p50", write_ratio)
    report.row("seam: write observed / unobserved p50", f"{write_ratio:.3f}",
               f"{o.ms(50):.3f} / {u.ms(50):.3f} ms (Prometheus observer)")

    # The relay: the same backlog drained without, then with, then without again.
    report.progress("seam relay: draining without and with the observer")
    rates = []
    for observed in (False, True, False, True):
        remove = instrument.add_observer(observer) if observed else None
        try:
            rate, _ = relay_part.drain(url, RedisListPublisher(client()), messages, report)
        finally:
            if remove is not None:
                remove()
        rates.append(rate)
        client().delete(relay_part.TOPIC)
    plain = (rates[0] + rates[2]) / 2
    seen = (rates[1] + rates[3]) / 2
    relay_ratio = ratio(seen, plain)
    report.figure("seam_relay_observed", relay_ratio)
    report.row("seam: relay msg/s observed / unobserved", f"{relay_ratio:.3f}",
               f"{seen:,.0f} / {plain:,.0f} msg/s")

    # Unused: what the checks cost next to one write.
    loops = 1_000_000
    check = timeit.timeit("if instrument.observers: pass", globals={"instrument": instrument},
                          number=loops) / loops
    share = CHECKS_PER_MESSAGE * check / (u.ms(50) / 1000)
    report.figure("seam_unused_share", share)
    report.row("seam: unused checks / write p50", f"{share:.2e}",
               f"{CHECKS_PER_MESSAGE} checks x {check * 1e9:.0f} ns")
    report.detail("seam", {"write": {k: t.summary() for k, t in timings.items()},
                           "relay_rates": rates, "check_ns": check * 1e9})
