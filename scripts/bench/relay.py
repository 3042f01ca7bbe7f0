"""The relay against the broker itself: msg/s draining a backlog with the default
configuration, against raw publishes through the same client (one by one, and
pipelined 100 at a time), and the relay's CPU per message."""

from __future__ import annotations

import time
from typing import Any

from outbox import Relay

from . import claim
from .common import Report, fresh_engine, ratio
from .redis_publisher import PerMessagePublisher, RedisListPublisher, client

TOPIC = "bench.relay"


def raw_rates(conn: Any, messages: int) -> tuple[float, float]:
    """msg/s of RPUSH one at a time, and pipelined 100 per round trip."""
    values = [b"m%d\n" % i + claim.PAYLOAD for i in range(messages)]
    conn.delete("bench.raw")
    n_seq = min(messages, 5000)
    start = time.perf_counter()
    for v in values[:n_seq]:
        conn.rpush("bench.raw", v)
    sequential = n_seq / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, messages, 100):
        pipe = conn.pipeline(transaction=False)
        for v in values[i:i + 100]:
            pipe.rpush("bench.raw", v)
        pipe.execute()
    pipelined = messages / (time.perf_counter() - start)
    conn.delete("bench.raw")
    return sequential, pipelined


def drain(url: str, publisher: Any, messages: int, report: Report) -> tuple[float, float]:
    """Fill ``messages`` pending rows, drain them with a default relay: (msg/s, CPU ms/msg)."""
    engine = fresh_engine(url)
    claim.reset(engine)
    claim.fill(engine, messages, report, TOPIC, outage=False)
    relay = Relay(engine, publisher)
    relay.run_once()  # connect, compile: not part of the rate
    wall, cpu = time.perf_counter(), time.process_time()
    published = relay.drain(timeout=600)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    left = relay.counts()["pending"]
    engine.dispose()
    if left:
        raise SystemExit(f"bench: the relay left {left} rows pending")
    published += relay.config.batch_size  # the warm-up batch
    return published / wall, cpu * 1000 / published


def run(url: str, report: Report, *, messages: int) -> None:
    conn = client()
    conn.delete(TOPIC)
    sequential, pipelined = raw_rates(conn, messages)
    report.progress("relay: default configuration (batch publish)")
    batch_rate, batch_cpu = drain(url, RedisListPublisher(client()), messages, report)
    arrived = conn.llen(TOPIC)
    report.progress("relay: a publisher without publish_batch")
    conn.delete(TOPIC)
    single_n = max(1000, messages // 10)
    single_rate, single_cpu = drain(url, PerMessagePublisher(client()), single_n, report)
    conn.delete(TOPIC)
    if arrived != messages:
        raise SystemExit(f"bench: {arrived} of {messages} messages reached the broker")
    value = ratio(batch_rate, pipelined)
    report.figure("relay_vs_pipeline", value)
    report.figure("relay_cpu_ms", batch_cpu)
    report.row("broker raw publish msg/s (one by one)", f"{sequential:,.0f}", "redis RPUSH")
    report.row("broker raw publish msg/s (pipelined 100)", f"{pipelined:,.0f}")
    report.row("relay msg/s (default config)", f"{batch_rate:,.0f}",
               f"{messages:,} rows, batch publish")
    report.row("relay msg/s (publisher without batch)", f"{single_rate:,.0f}",
               f"{single_n:,} rows; {ratio(single_rate, sequential):.2f} x raw one by one")
    report.row("relay_vs_pipeline", f"{value:.2f}", "target >= 0.5")
    report.row("relay CPU ms/msg (default / without batch)", f"{batch_cpu:.4f} / {single_cpu:.4f}",
               "target <= 0.015")
    report.detail("relay", {
        "messages": messages, "raw_sequential_per_s": sequential, "raw_pipelined_per_s": pipelined,
        "relay_per_s": batch_rate, "relay_cpu_ms_per_msg": batch_cpu,
        "relay_unbatched_per_s": single_rate, "relay_unbatched_cpu_ms_per_msg": single_cpu,
    })
