"""What every benchmark shares: the databases, timing, percentiles and the report."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import URL, Engine, make_url, text
from sqlalchemy import create_engine as sa_create_engine

import outbox
from outbox.db import safe_url


def env_url(name: str) -> str:
    url = os.environ.get(name)
    if not url:
        raise SystemExit(
            f"bench: {name} is not set; run through  make bench  (it starts the servers), "
            "or  eval \"$(scripts/services env)\"  first")
    return url


def database_url(db: str, name: str = "outbox_bench") -> str:
    """The URL of a fresh benchmark database on ``db`` (sqlite, postgres, mariadb)."""
    if db == "sqlite":
        folder = tempfile.mkdtemp(prefix="outbox-bench-")
        return f"sqlite:///{folder}/{name}.db"
    base = env_url("OUTBOX_TEST_POSTGRES_URL" if db == "postgres" else "OUTBOX_TEST_MARIADB_URL")
    return recreate_databases(make_url(base), [name])[0]


def recreate_databases(server: URL, names: list[str]) -> list[str]:
    """Drop and create ``names`` on ``server``'s PostgreSQL or MariaDB; their URLs."""
    postgres = server.get_backend_name() == "postgresql"
    admin = sa_create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for name in names:
                if postgres:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    conn.execute(text(f"CREATE DATABASE {name}"))
                else:
                    conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
                    conn.execute(text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    finally:
        admin.dispose()
    return [server.set(database=n).render_as_string(hide_password=False) for n in names]


def fresh_engine(url: str, **kwargs: Any) -> Engine:
    return outbox.create_engine(url, **kwargs)


def drop_database(db: str, url: str) -> None:
    if db == "sqlite":
        path = make_url(url).database or ""
        for suffix in ("", "-wal", "-shm"):
            with suppress(FileNotFoundError):
                os.remove(path + suffix)
        return
    parsed = make_url(url)
    name = parsed.database
    admin = sa_create_engine(parsed.set(database="postgres" if db == "postgres" else None),
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        force = " WITH (FORCE)" if db == "postgres" else ""
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
    admin.dispose()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


@dataclass
class Timings:
    """Durations in seconds; summarised in milliseconds."""

    values: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    def ms(self, p: float) -> float:
        return pct(self.values, p) * 1000

    def summary(self) -> dict[str, float]:
        return {"p50_ms": self.ms(50), "p95_ms": self.ms(95), "p99_ms": self.ms(99),
                "mean_ms": statistics.fmean(self.values) * 1000 if self.values else 0.0,
                "n": len(self.values)}


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed:`` ... ``elapsed()`` seconds, wall clock."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


class Report:
    """Collects figures, prints the table, writes JSON and the BENCH line."""

    def __init__(self, *, db: str, quick: bool, broker: str) -> None:
        self.db = db
        self.quick = quick
        self.broker = broker
        self.rows: list[tuple[str, str, str]] = []
        self.figures: dict[str, float | int | None] = {}
        self.details: dict[str, Any] = {}

    def progress(self, text_: str) -> None:
        print(f"bench: {text_}", file=sys.stderr, flush=True)

    def row(self, name: str, value: str, note: str = "") -> None:
        self.rows.append((name, value, note))

    def figure(self, name: str, value: float | int | None) -> None:
        self.figures[name] = value

    def detail(self, section: str, data: Any) -> None:
        self.details[section] = data

    def print_table(self) -> None:
        width = max((len(r[0]) for r in self.rows), default=10)
        vwidth = max((len(r[1]) for r in self.rows), default=10)
        print(f"outbox bench: db={self.db} broker={self.broker} quick={int(self.quick)}")
        print("-" * (width + vwidth + 40))
        for name, value, note in self.rows:
            print(f"{name:<{width}}  {value:>{vwidth}}  {note}")
        print("-" * (width + vwidth + 40))

    def write_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"db": self.db, "broker": self.broker, "quick": self.quick,
                       "figures": self.figures, "details": self.details}, f, indent=2,
                      default=str)

    BENCH_KEYS = (
        "write_vs_insert_p50", "write_vs_insert_p99", "claim_1m_vs_1k", "relay_vs_pipeline",
        "relay_cpu_ms", "e2e_p99_vs_direct", "sqltransport_msgs", "consumer_inbox_vs_bare",
        "halfmsg_vs_plain", "seam_write_observed_p50", "seam_relay_observed",
    )

    def bench_line(self) -> str:
        parts = []
        for key in self.BENCH_KEYS:
            value = self.figures.get(key)
            if value is None:
                shown = "na"
            elif key == "sqltransport_msgs":
                shown = str(int(value))
            elif key == "relay_cpu_ms":
                shown = f"{value:.4f}"
            else:
                shown = f"{value:.2f}"
            parts.append(f"{key}={shown}")
        return "BENCH " + " ".join(parts)


def shown_url(url: str) -> str:
    return safe_url(url)
