"""The embedded SQL transport (the default, no broker), always on SQLite, its
embedded form: publish and consume rates against a raw SQLite INSERT, and one
fetch with 1,000 messages retained against the same with 1,000,000 (quick: 100,000).

Everything here runs on a temporary SQLite file (``common.database_url("sqlite")``)
with the engine ``outbox.create_engine`` makes (WAL, ``synchronous=NORMAL``). The
``url`` the bench passes in is used for a second figure only: when it names a
server (PostgreSQL or MariaDB), the fetch at both retained sizes is measured there
too; a SQLite ``url`` (or an empty one) adds nothing.

    raw INSERT/s      one ~100-byte row per transaction through the DB-API
                      connection of the same engine: the baseline
    publish msg/s     SqlPublisher.publish, one message per call (one transaction)
    batch msg/s       SqlPublisher.publish_batch of 100 (one statement, one transaction)
    consume msg/s     fetch(100) then ack each delivery (one transaction per ack)
    fetch p50 ms      one fetch(100) of 100 new messages on top of a history the
                      group has already consumed (delivery rows done, its cursor at
                      the head, as after it ran for a while); the ratio big/small
                      is what "costs the same" means
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from sqlalchemy import Engine, make_url, text

from outbox import Message, SqlTransport
from outbox.sql_transport import cursors, deliveries, messages, transport_metadata

from .common import Report, Timings, database_url, drop_database, fresh_engine, ratio

TOPIC = "bench.sql"
GROUP = "bench"
#: About 100 bytes, as the other parts use.
PAYLOAD = (b'{"transfer_no":"T-000000000","from_account":"1","to_account":"2",'
           b'"amount":"100.00","currency":"EUR"}')
BATCH = 100
CHUNK = 100_000


def _message(i: int, topic: str = TOPIC) -> Message:
    return Message(topic=topic, id=f"m-{i:09d}", payload=PAYLOAD)


def reset(engine: Engine) -> None:
    transport_metadata.drop_all(engine)
    transport_metadata.create_all(engine)


# -- the baseline and the rates ------------------------------------------------------


def raw_insert_rate(engine: Engine, count: int) -> float:
    """Rows per second, one INSERT and one COMMIT each, straight through the DB-API."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS bench_raw"))
        conn.execute(text("CREATE TABLE bench_raw (id INTEGER PRIMARY KEY, topic TEXT NOT NULL,"
                          " payload BLOB NOT NULL, created_at TEXT NOT NULL)"))
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        sql = "INSERT INTO bench_raw (topic, payload, created_at) VALUES (?, ?, ?)"
        start = time.perf_counter()
        for i in range(count):
            cur.execute(sql, (TOPIC, PAYLOAD, f"2024-01-01 00:00:{i % 60:02d}.000000"))
            raw.commit()
        took = time.perf_counter() - start
        cur.close()
    finally:
        raw.close()
    return count / took


def publish_rates(transport: SqlTransport, count: int) -> tuple[float, float]:
    """(one message per publish, publish_batch of BATCH) in messages per second."""
    publisher = transport.publisher()
    start = time.perf_counter()
    for i in range(count):
        publisher.publish(_message(i))
    single = count / (time.perf_counter() - start)
    batches = [[_message(count + b * BATCH + j) for j in range(BATCH)]
               for b in range(count // BATCH)]
    start = time.perf_counter()
    for batch in batches:
        publisher.publish_batch(batch)
    batched = len(batches) * BATCH / (time.perf_counter() - start)
    return single, batched


def consume_rate(transport: SqlTransport, group: str) -> tuple[float, int]:
    """Drain ``TOPIC`` for ``group``: fetch up to 100, acknowledge each."""
    sub = transport.subscriber(TOPIC, group)
    done = 0
    start = time.perf_counter()
    while True:
        batch = sub.fetch(BATCH, 0.0)
        if not batch:
            break
        for d in batch:
            sub.ack(d)
        done += len(batch)
    return done / (time.perf_counter() - start), done


# -- fetch at any history ------------------------------------------------------------


def _fill_messages_sql(dialect: str, first: int, count: int) -> str:
    key = "`key`" if dialect == "mysql" else '"key"'
    cols = f"topic, message_id, {key}, tag, headers, payload, created_at"
    hexed = PAYLOAD.hex()
    if dialect == "sqlite":
        return (f"WITH RECURSIVE s(g) AS (SELECT {first} UNION ALL SELECT g + 1 FROM s "
                f"WHERE g < {first + count - 1}) "
                f"INSERT INTO {messages.name} ({cols}) SELECT '{TOPIC}', 'h' || g, NULL, NULL, "
                f"'{{}}', X'{hexed}', datetime('now', '-1 hour') FROM s")
    if dialect == "postgresql":
        return (f"INSERT INTO {messages.name} ({cols}) SELECT '{TOPIC}', 'h' || g, NULL, NULL, "
                f"'{{}}', '\\x{hexed}'::bytea, now() - interval '1 hour' "
                f"FROM generate_series({first}, {first + count - 1}) AS g")
    return (f"INSERT INTO {messages.name} ({cols}) SELECT '{TOPIC}', CONCAT('h', seq), NULL, "
            f"NULL, '{{}}', X'{hexed}', NOW(6) - INTERVAL 1 HOUR "
            f"FROM seq_{first}_to_{first + count - 1}")


def fill_history(engine: Engine, total: int, report: Report) -> None:
    """``total`` messages of TOPIC that GROUP has consumed: a done delivery row each,
    and the group's cursor at the newest (as the fetches that consumed them leave it)."""
    dialect = engine.dialect.name
    dialect = "mysql" if dialect == "mariadb" else dialect
    done = 0
    while done < total:
        n = min(CHUNK, total - done)
        with engine.begin() as conn:
            # Not ``done``: MariaDB numbers an INSERT ... SELECT in blocks, leaving gaps.
            after = conn.execute(text(f"SELECT COALESCE(MAX(seq), 0) FROM {messages.name}"))
            conn.execute(text(_fill_messages_sql(dialect, done + 1, n)))
            conn.execute(text(
                f"INSERT INTO {deliveries.name} (consumer_group, seq, topic, status, attempts,"
                f" visible_at) SELECT '{GROUP}', seq, topic, 'done', 1, created_at"
                f" FROM {messages.name} WHERE seq > :after"), {"after": after.scalar_one()})
        done += n
        if total > CHUNK:
            report.progress(f"sqltransport: {done:,}/{total:,} retained messages")
    with engine.begin() as conn:
        head = conn.execute(text(f"SELECT MAX(seq) FROM {messages.name}")).scalar_one()
        conn.execute(cursors.insert().values(consumer_group=GROUP, topic=TOPIC,
                                             scanned_seq=int(head), gaps=""))
    if dialect == "postgresql":
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text(f"VACUUM ANALYZE {messages.name}, {deliveries.name}"))
    elif dialect == "sqlite":
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(text(f"ANALYZE TABLE {messages.name}, {deliveries.name}"))


class FetchRound:
    """One transport with a retained history: publish a batch, time the fetch that
    takes it, acknowledge it."""

    def __init__(self, engine: Engine) -> None:
        transport = SqlTransport(engine)
        self.publisher = transport.publisher()
        self.sub = transport.subscriber(TOPIC, GROUP)
        self.timings = Timings()
        self.rows = 0
        self.done = 0

    def __call__(self, keep: bool) -> None:
        self.publisher.publish_batch(
            [_message(10_000_000 + self.done * BATCH + j) for j in range(BATCH)])
        self.done += 1
        start = time.perf_counter()
        batch = self.sub.fetch(BATCH, 0.0)
        took = time.perf_counter() - start
        for d in batch:
            self.sub.ack(d)
        if keep:
            self.timings.add(took)
            self.rows = len(batch)


def fetch_scale(urls: tuple[str, str], big: int, rounds: int, report: Report
                ) -> dict[str, Any]:
    """Fetch p50 with 1,000 retained (on ``urls[0]``) and ``big`` (on ``urls[1]``).
    Two URLs: both filled first, then the rounds alternate, so a busy machine slows
    both alike. One URL twice: filled and measured one after the other."""
    engines = [fresh_engine(u) for u in dict.fromkeys(urls)]
    try:
        sizes = (1000, big)
        results: list[FetchRound] = []
        if len(engines) == 2:
            for engine, size in zip(engines, sizes, strict=True):
                reset(engine)
                fill_history(engine, size, report)
            pair = [FetchRound(e) for e in engines]
            for i in range(rounds + 5):
                for one in pair:
                    one(i >= 5)
            results = pair
        else:
            for size in sizes:
                reset(engines[0])
                fill_history(engines[0], size, report)
                one = FetchRound(engines[0])
                for i in range(rounds + 5):
                    one(i >= 5)
                results.append(one)
    finally:
        for engine in engines:
            engine.dispose()
    small, large = results
    return {"small": small.timings, "large": large.timings, "rows": (small.rows, large.rows),
            "ratio": ratio(large.timings.ms(50), small.timings.ms(50))}


def _label(n: int) -> str:
    return f"{n // 1000}k" if n < 1_000_000 else f"{n / 1e6:g}M"


def run(url: str, report: Report, *, quick: bool) -> None:
    count = 5000 if quick else 20_000
    big = 100_000 if quick else 1_000_000
    rounds = 50 if quick else 200
    lite = database_url("sqlite", "outbox_bench_sqltransport")
    lite_big = database_url("sqlite", "outbox_bench_sqltransport_big")
    try:
        engine = fresh_engine(lite)
        try:
            reset(engine)
            raw = raw_insert_rate(engine, count)
            transport = SqlTransport(engine)
            single, batched = publish_rates(transport, count)
            consume, consumed = consume_rate(transport, "bench.consume")
        finally:
            engine.dispose()
        drop_database("sqlite", lite)
        report.progress("sqltransport: fetch with a retained history on SQLite")
        scale = fetch_scale((lite, lite_big), big, rounds, report)
    finally:
        for one in (lite, lite_big):
            drop_database("sqlite", one)
            with contextlib.suppress(OSError):  # the temporary folder, now empty
                os.rmdir(os.path.dirname(make_url(one).database or ""))

    label = _label(big)
    report.row("sqltransport raw SQLite INSERT/s", f"{raw:,.0f}", "1 row per transaction")
    report.row("sqltransport publish msg/s", f"{single:,.0f}",
               f"1 per publish, {ratio(single, raw):.2f}x raw INSERT")
    report.row(f"sqltransport publish_batch({BATCH}) msg/s", f"{batched:,.0f}",
               f"{ratio(batched, raw):.2f}x raw INSERT")
    report.row("sqltransport consume msg/s", f"{consume:,.0f}",
               f"fetch {BATCH} + ack each, {consumed:,} messages, {ratio(consume, raw):.2f}x raw")
    s, b = scale["small"], scale["large"]
    report.row("sqltransport fetch p50/p99 ms, 1k retained", f"{s.ms(50):.3f}/{s.ms(99):.3f}",
               f"{scale['rows'][0]} new per fetch")
    report.row(f"sqltransport fetch p50/p99 ms, {label} retained",
               f"{b.ms(50):.3f}/{b.ms(99):.3f}", f"{scale['rows'][1]} new per fetch")
    report.row(f"sqltransport fetch_{label}_vs_1k (p50)", f"{scale['ratio']:.2f}",
               "target <= 1.5 at 1M")
    detail: dict[str, Any] = {
        "db": "sqlite", "messages": count, "raw_insert_per_s": raw,
        "publish_per_s": single, "publish_batch_per_s": batched, "batch": BATCH,
        "consume_per_s": consume, "consumed": consumed, "retained_large": big,
        "fetch_small": s.summary(), "fetch_large": b.summary(), "fetch_ratio": scale["ratio"],
    }

    backend = make_url(url).get_backend_name() if url else "sqlite"
    backend = {"mysql": "mysql/mariadb"}.get(backend, backend)
    if backend != "sqlite":
        report.progress(f"sqltransport: fetch with a retained history on {backend}")
        server = fetch_scale((url, url), big, rounds, report)
        ss, sb = server["small"], server["large"]
        report.row(f"sqltransport fetch p50 ms on {backend}, 1k / {label} retained",
                   f"{ss.ms(50):.3f}/{sb.ms(50):.3f}", f"ratio {server['ratio']:.2f}")
        detail["server"] = {"db": backend, "fetch_small": ss.summary(),
                            "fetch_large": sb.summary(), "fetch_ratio": server["ratio"]}
    report.figure("sqltransport_msgs", int(consume))
    report.detail("sqltransport", detail)
