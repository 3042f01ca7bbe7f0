"""Claiming at any backlog: one batch's claim with 1,000 pending rows against the
same with a large backlog (1,000,000 by default), keys in backoff and dead rows
included, so the parking rules are part of what is timed."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, text

import outbox
from outbox import storage
from outbox.schema import utcnow

from .common import Report, Timings, fresh_engine, ratio

KEYS = 5000


#: A payload of about 100 bytes, as hex for the INSERT ... SELECT.
PAYLOAD = (b'{"transfer_no":"T-000000000","from_account":"1","to_account":"2",'
           b'"amount":"100.00","currency":"EUR"}')
PAYLOAD_HEX = PAYLOAD.hex()


def quoted_key(dialect: str) -> str:
    """The column ``key``: a reserved word in MySQL and MariaDB."""
    return "`key`" if dialect == "mysql" else "key"


def fill_sql(dialect: str, first: int, count: int, topic: str) -> str:
    """One INSERT ... SELECT of ``count`` pending rows (seq from ``first``): keys cycle
    over KEYS, one row in ten has no key."""
    cols = (f"message_id, topic, {quoted_key(dialect)}, tag, headers, payload, status, "
            "attempts, next_attempt_at, created_at")
    key = "CASE WHEN MOD(g, 10) = 0 THEN NULL ELSE {concat} END"
    if dialect == "postgresql":
        return (
            f"INSERT INTO outbox_messages ({cols}) SELECT 'm' || g, '{topic}', "
            + key.format(concat=f"'k' || MOD(g, {KEYS})")
            + f", NULL, '{{}}', '\\x{PAYLOAD_HEX}'::bytea, 'pending', 0, "
            "now() - interval '1 hour', now() "
            f"FROM generate_series({first}, {first + count - 1}) AS g"
        )
    if dialect == "sqlite":
        return (
            f"WITH RECURSIVE s(g) AS (SELECT {first} UNION ALL SELECT g + 1 FROM s "
            f"WHERE g < {first + count - 1}) "
            f"INSERT INTO outbox_messages ({cols}) SELECT 'm' || g, '{topic}', "
            + key.format(concat=f"'k' || (g % {KEYS})").replace("MOD(g, 10)", "(g % 10)")
            + f", NULL, '{{}}', X'{PAYLOAD_HEX}', 'pending', 0, datetime('now', '-1 hour'), "
            "datetime('now') FROM s"
        )
    # MariaDB's sequence engine
    return (
        f"INSERT INTO outbox_messages ({cols}) SELECT CONCAT('m', seq), '{topic}', "
        + key.format(concat=f"CONCAT('k', MOD(seq, {KEYS}))").replace("MOD(g, 10)",
                                                                       "MOD(seq, 10)")
        + f", NULL, '{{}}', X'{PAYLOAD_HEX}', 'pending', 0, NOW(6) - INTERVAL 1 HOUR, NOW(6) "
        f"FROM seq_{first}_to_{first + count - 1}"
    )


def fill(engine: Engine, total: int, report: Report, topic: str = "bench.claim", *,
         outage: bool = True) -> None:
    """Fill the outbox with ``total`` pending rows, in chunks, showing progress; with
    ``outage``, as a broker outage leaves them (see below)."""
    dialect = engine.dialect.name
    dialect = "mysql" if dialect == "mariadb" else dialect
    chunk = 100_000
    with engine.connect() as conn:
        done = conn.execute(text("SELECT COUNT(*) FROM outbox_messages")).scalar_one()
    first = int(done) + 1
    while done < total:
        n = min(chunk, total - done)
        with engine.begin() as conn:
            conn.execute(text(fill_sql(dialect, first, n, topic)))
        done += n
        first += n
        if total > chunk:
            report.progress(f"fill: {done:,}/{total:,} pending rows")
    if outage:
        _outage(engine, total, quoted_key(dialect))
    analyze(engine)


def _outage(engine: Engine, total: int, key: str) -> None:
    head = max(100, total // 50)
    keyed = f"{key} IS NULL OR {key} IN (" + ", ".join(f"'k{i}'" for i in range(50)) + ")"
    with engine.begin() as conn:
        # After a broker outage: the oldest 2 % were tried and back off; of those, the
        # rows of 1 % of the keys (and those without a key) are still waiting, which
        # parks those keys. A few keys are parked behind dead rows. A claim must step
        # over all of them at the same cost whatever the backlog behind.
        conn.execute(text(
            "UPDATE outbox_messages SET next_attempt_at = :later, attempts = 1 "
            f"WHERE seq <= :head AND ({keyed})"
        ), {"later": utcnow().replace(year=utcnow().year + 1), "head": head})
        conn.execute(text(
            "UPDATE outbox_messages SET status = 'dead', attempts = 10 "
            "WHERE message_id IN (" + ", ".join(f"'m{i}'" for i in range(3, 400, 11)) + ")"
        ))


def analyze(engine: Engine) -> None:
    """Fresh planner statistics after a bulk fill, as autovacuum would give them."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE outbox_messages"))
    elif dialect == "sqlite":
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE TABLE outbox_messages"))


def time_claims(engine: Engine, rounds: int, batch_size: int = 100) -> tuple[Timings, int]:
    """Claim one batch ``rounds`` times, rolling back each (the backlog stays)."""
    t = Timings()
    claimed = 0
    for i in range(rounds + 5):
        with engine.connect() as conn, conn.begin() as tx:
            start = time.perf_counter()
            rows = storage.claim(conn, batch_size, utcnow())
            took = time.perf_counter() - start
            tx.rollback()
        if i >= 5:
            t.add(took)
            claimed = len(rows)
    return t, claimed


def reset(engine: Engine) -> None:
    outbox.metadata.drop_all(engine)
    outbox.metadata.create_all(engine)


def run(url: str, report: Report, *, backlog: int, rounds: int) -> dict[str, Any]:
    engine = fresh_engine(url)
    reset(engine)
    fill(engine, 1000, report)
    small, n_small = time_claims(engine, rounds)
    reset(engine)
    fill(engine, backlog, report)
    big, n_big = time_claims(engine, rounds)
    engine.dispose()
    value = ratio(big.ms(50), small.ms(50))
    report.figure("claim_1m_vs_1k", value)
    label = f"{backlog // 1000}k" if backlog < 1_000_000 else f"{backlog / 1e6:g}M"
    report.row("claim p50/p99 ms, 1k pending", f"{small.ms(50):.3f}/{small.ms(99):.3f}",
               f"{n_small} rows per claim")
    report.row(f"claim p50/p99 ms, {label} pending", f"{big.ms(50):.3f}/{big.ms(99):.3f}",
               f"{n_big} rows per claim")
    report.row(f"claim_{label}_vs_1k (p50)", f"{value:.2f}", "target <= 1.5 at 1M")
    report.detail("claim", {"backlog": backlog, "small": small.summary(), "big": big.summary()})
    return {"engine_url": url}
