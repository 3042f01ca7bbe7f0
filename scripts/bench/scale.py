"""Scaling out and across.

Out: N relay processes on one PostgreSQL database. The same backlog drained by one
relay process, then by two started at once (their claims skip the rows the other
holds); msg/s of each and their ratio, ``relays_2_vs_1`` (target >= 1.6 when the
broker is not the limit: Redis, pipelined, takes far more than one relay sends),
three rounds of 1-then-2 back to back, the round with the median ratio reported. The
relays, the database and the broker share this machine's CPUs: the rows say how
busy they were, and how busy other programs kept them before the run.

Across: one :class:`outbox.RelayGroup` (one process, one thread for the batches)
over T tenant databases on the same server, one with a big backlog and the rest
with a small one each. Its total msg/s, and its fairness: when the last small
tenant had all its rows published, against when the big one was drained. A relay
that served the databases one after the other would finish the small ones only
after the big one; round-robin finishes them within their first few turns.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, make_url

import outbox
from outbox import Message, Relay, RelayConfig, RelayGroup, storage
from outbox.schema import utcnow

from . import claim
from .common import (
    Report,
    drop_database,
    fresh_engine,
    ratio,
    recreate_databases,
    shown_url,
)
from .redis_publisher import RedisListPublisher, client
from .relay import raw_rates

TOPIC = "bench.scale"
TENANT_PREFIX = "outbox_bench_t"  # outbox_bench_t0, outbox_bench_t1, ...


# -- N relay processes on one database --------------------------------------------


def warm(engine: Engine) -> None:
    """Connect and compile the claim once, rolled back: not part of any rate."""
    with engine.connect() as conn, conn.begin() as tx:
        storage.claim(conn, 100, utcnow())
        tx.rollback()


def _relay_process() -> None:
    """One relay process (``python -c``, the URL as argument): says ``ready`` once
    connected and warm, waits for ``go`` on stdin, drains with the bench's Redis
    publisher until no row is pending (rows another relay holds stay pending until
    it commits), and prints what it published as JSON."""
    engine = outbox.create_engine(sys.argv[1])
    publisher = RedisListPublisher(client())
    ahead = len(sys.argv) < 3 or sys.argv[2] != "no-claim-ahead"
    relay = Relay(engine, publisher, RelayConfig(listen=False, claim_ahead=ahead))
    warm(engine)
    publisher.conn.ping()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    wall, cpu = time.perf_counter(), time.process_time()
    published = 0
    while True:
        published += relay.drain(timeout=600)
        if relay.counts()["pending"] == 0:
            break
        time.sleep(0.001)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"published": published, "wall_s": wall, "cpu_s": cpu}), flush=True)
    publisher.close()
    engine.dispose()


def _machine_cpu() -> tuple[int, int] | None:
    """(all, idle) jiffies of the whole machine, on Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(values), values[3] + values[4]


def machine_load(seconds: float = 1.0) -> float | None:
    """How busy the machine's CPUs are with nothing of this bench running: what
    other programs take from the relays, the database and the broker."""
    before = _machine_cpu()
    time.sleep(seconds)
    after = _machine_cpu()
    if not before or not after or after[0] <= before[0]:
        return None
    return 1 - (after[1] - before[1]) / (after[0] - before[0])


def drain_with_processes(url: str, n: int, claim_ahead: bool = True) -> dict[str, Any]:
    """Start ``n`` relay processes on the database's backlog at once; wall time from
    the start signal until the last one is done."""
    env = dict(os.environ)
    scripts = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (scripts, env.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen(
        [sys.executable, "-c", "from bench.scale import _relay_process; _relay_process()", url,
         "claim-ahead" if claim_ahead else "no-claim-ahead"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    ) for _ in range(n)]
    try:
        for p in procs:  # every process connected and warm
            assert p.stdout is not None and p.stdin is not None
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"bench: a relay process did not start (exit {p.wait()})")
        before = _machine_cpu()
        start = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        done = []
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"bench: a relay process failed (exit {p.wait()})")
            done.append(json.loads(line))
        wall = time.perf_counter() - start
        after = _machine_cpu()
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    busy = None
    if before and after and after[0] > before[0]:
        busy = 1 - (after[1] - before[1]) / (after[0] - before[0])
    published = sum(d["published"] for d in done)
    return {"processes": n, "published": published, "wall_s": wall,
            "per_s": published / wall, "per_process": [d["published"] for d in done],
            "cpu_s": [round(d["cpu_s"], 3) for d in done], "machine_cpu_busy": busy}


def scale_out(url: str, report: Report, rows: int, rounds: int) -> dict[str, Any]:
    """1 then 2 relay processes on the same backlog, ``rounds`` times in turn."""
    conn = client()
    engine = fresh_engine(url)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    plain: dict[int, dict[str, Any]] = {}
    idle_load = machine_load()
    try:
        def one_run(n: int, claim_ahead: bool) -> dict[str, Any]:
            conn.delete(TOPIC)
            claim.reset(engine)
            claim.fill(engine, rows, report, TOPIC, outage=False)
            run = drain_with_processes(url, n, claim_ahead)
            arrived = conn.llen(TOPIC)
            with engine.connect() as c:
                left = storage.counts(c)["pending"]
            if left or run["published"] != rows or arrived != rows:
                raise SystemExit(
                    f"bench: {n} relay processes published {run['published']} of {rows} "
                    f"rows ({left} pending, {arrived} at the broker)")
            report.progress(f"scale: {rows:,} rows, {n} relay process(es)"
                            f"{'' if claim_ahead else ' without claim ahead'}: "
                            f"{run['per_s']:,.0f} msg/s")
            return run

        for _ in range(rounds):
            for n in (1, 2):
                runs[n].append(one_run(n, True))
        # The same without claiming ahead: one connection per relay, so what two
        # processes add is what row locks between them allow, less what the CPUs lack.
        for n in (1, 2):
            plain[n] = one_run(n, False)
    finally:
        conn.delete(TOPIC)
        conn.close()
        engine.dispose()
    # Each round's 1 and 2 ran back to back, under much the same load from whatever
    # else the machine runs: the round with the median ratio counts.
    ratios = [ratio(b["per_s"], a["per_s"]) for a, b in zip(runs[1], runs[2], strict=True)]
    middle = sorted(range(rounds), key=lambda i: ratios[i])[rounds // 2]
    one, two, value = runs[1][middle], runs[2][middle], ratios[middle]
    broker = raw_rates(client(), rows)[1]
    report.figure("relays_2_vs_1", value)

    def busy(run: dict[str, Any]) -> str:
        b = run["machine_cpu_busy"]
        return "" if b is None else f"; machine CPU {b:.0%} busy"

    report.row("relay msg/s, 1 relay process", f"{one['per_s']:,.0f}",
               f"{rows:,} rows on one database{busy(one)}")
    shares = "/".join(f"{p:,}" for p in two["per_process"])
    report.row("relay msg/s, 2 relay processes", f"{two['per_s']:,.0f}",
               f"the same; rows per process {shares}{busy(two)}")
    others = "" if idle_load is None else f"; {idle_load:.0%} busy with other work before"
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    report.row("relays_2_vs_1", f"{value:.2f}",
               f"target >= 1.6; median of {rounds} rounds ({shown}); {os.cpu_count()} CPUs "
               f"shared with the database and broker{others}")
    plain_ratio = ratio(plain[2]["per_s"], plain[1]["per_s"])
    report.row("relays_2_vs_1 without claim ahead", f"{plain_ratio:.2f}",
               f"{plain[1]['per_s']:,.0f} -> {plain[2]['per_s']:,.0f} msg/s{busy(plain[2])}")
    report.row("broker raw msg/s (pipelined 100)", f"{broker:,.0f}",
               f"{ratio(broker, two['per_s']):.1f} x what 2 relays sent: not the limit")
    return {"rows": rows, "rounds": rounds, "one": one, "two": two, "ratio": value,
            "broker_pipelined_per_s": broker, "machine_busy_before": idle_load,
            "cpus": os.cpu_count(),
            "ratios": ratios, "without_claim_ahead": plain,
            "all_per_s": {n: [round(r["per_s"]) for r in rs] for n, rs in runs.items()}}


# -- one RelayGroup over many tenant databases ----------------------------------------


class TimingPublisher:
    """The Redis publisher, noting when each topic (one per tenant) had all its rows."""

    def __init__(self, inner: RedisListPublisher, expected: dict[str, int]) -> None:
        self.inner = inner
        self.expected = expected
        self.seen: Counter[str] = Counter()
        self.done_at: dict[str, float] = {}
        self.all_done = threading.Event()

    def _count(self, messages: Sequence[Message]) -> None:
        now = time.perf_counter()
        for m in messages:
            self.seen[m.topic] += 1
            if self.seen[m.topic] == self.expected.get(m.topic):
                self.done_at[m.topic] = now
        if len(self.done_at) == len(self.expected):
            self.all_done.set()

    def publish(self, message: Message) -> None:
        self.inner.publish(message)
        self._count([message])

    def publish_batch(self, messages: Sequence[Message]) -> None:
        self.inner.publish_batch(messages)
        self._count(messages)

    def close(self) -> None:
        self.inner.close()


def tenant_urls(url: str, count: int) -> list[str]:
    """Fresh databases next to ``url``'s: outbox_bench_t0... on its server, or SQLite
    files in a folder of their own."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        folder = tempfile.mkdtemp(prefix="outbox-bench-scale-")
        return [f"sqlite:///{folder}/{TENANT_PREFIX}{i}.db" for i in range(count)]
    return recreate_databases(parsed, [f"{TENANT_PREFIX}{i}" for i in range(count)])


def drop_tenants(url: str, urls: list[str]) -> None:
    kind = {"sqlite": "sqlite", "postgresql": "postgres"}.get(
        make_url(url).get_backend_name(), "mariadb")
    for u in urls:
        drop_database(kind, u)
    if kind == "sqlite":
        with contextlib.suppress(OSError):
            Path(make_url(urls[0]).database or "").parent.rmdir()


def scale_across(url: str, report: Report, *, tenants: int, big: int, small: int,
                 single_per_s: float | None) -> dict[str, Any]:
    conn = client()
    urls = tenant_urls(url, tenants)
    engines: list[Engine] = []
    topics = [f"{TOPIC}.t{i}" for i in range(tenants)]
    try:
        report.progress(f"scale: {tenants} tenant databases, {big:,} rows in one, "
                        f"{small:,} in each other")
        for i, u in enumerate(urls):
            engine = fresh_engine(u)
            engines.append(engine)
            claim.reset(engine)
            claim.fill(engine, big if i == 0 else small, report, topics[i], outage=False)
            warm(engine)
            conn.delete(topics[i])
        expected = {t: big if i == 0 else small for i, t in enumerate(topics)}
        publisher = TimingPublisher(RedisListPublisher(client()), expected)
        # The big backlog first in the rotation: the worst case for the small ones.
        group = RelayGroup(engines, publisher, RelayConfig())
        start = time.perf_counter()
        group.start()
        finished = publisher.all_done.wait(timeout=600)
        group.stop()
        if not finished:
            raise SystemExit(f"bench: the relay group did not drain: {dict(publisher.seen)}")
        arrived = sum(conn.llen(t) for t in topics)
        pending = sum(c["pending"] for c in group.counts().values())
        total = big + small * (tenants - 1)
        if arrived != total or pending:
            raise SystemExit(f"bench: the relay group published {arrived} of {total} rows "
                             f"({pending} pending)")
        done = {t: at - start for t, at in publisher.done_at.items()}
        wall = max(done.values())
        big_done = done[topics[0]]
        small_done = max(done[t] for t in topics[1:])
        per_s = total / wall
    finally:
        for t in topics:
            conn.delete(t)
        conn.close()
        for engine in engines:
            engine.dispose()
        drop_tenants(url, urls)
    share = ratio(small_done, big_done)
    report.figure("group_small_done_vs_big", share)
    vs_single = ratio(per_s, single_per_s) if single_per_s else None
    report.row(f"relay group msg/s, {tenants} databases", f"{per_s:,.0f}",
               f"{total:,} rows in one process"
               + (f"; {vs_single:.2f} x one relay on one database" if vs_single else ""))
    report.row("group: small tenants all published (s)", f"{small_done:.3f}",
               f"{tenants - 1} tenants x {small:,} rows, behind a {big:,}-row backlog")
    report.row("group: big tenant drained (s)", f"{big_done:.3f}",
               f"small ones done at {share:.1%} of it (one after the other: 100%)")
    return {
        "tenants": tenants, "big_rows": big, "small_rows": small, "total_rows": total,
        "wall_s": wall, "per_s": per_s, "vs_one_relay": vs_single,
        "big_drained_s": big_done, "small_all_published_s": small_done,
        "small_vs_big": share,
        "small_done_s": {t: round(done[t], 4) for t in topics[1:]},
        "database": shown_url(urls[0]),
    }


def run(url: str, report: Report, *, quick: bool) -> None:
    rows = 20_000 if quick else 100_000
    details: dict[str, Any] = {"quick": quick}
    single: float | None = None
    if make_url(url).get_backend_name() == "postgresql":
        details["out"] = scale_out(url, report, rows, rounds=3)
        single = details["out"]["one"]["per_s"]
    else:
        report.figure("relays_2_vs_1", None)
        report.row("relays_2_vs_1", "skipped",
                   f"N relay processes on one database are measured on PostgreSQL; "
                   f"this run is on {report.db}")
    details["across"] = scale_across(
        url, report, tenants=5 if quick else 20, big=rows, small=200 if quick else 500,
        single_per_s=single)
    report.detail("scale", details)
