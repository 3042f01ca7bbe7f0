"""The write path: a business transaction with its outbox message, against the same
transaction with one bare extra INSERT of the payload (the cheapest a user could do)."""

from __future__ import annotations

import gc
import json
import random
import time
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    insert,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

import outbox

from .common import Report, Timings, fresh_engine, ratio

bench_metadata = MetaData()
accounts = Table(
    "bench_accounts", bench_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("balance", BigInteger, nullable=False),
)
bare = Table(
    "bench_bare", bench_metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
           autoincrement=True),
    Column("payload", LargeBinary, nullable=False),
)

ACCOUNTS = 1000


def setup(engine: Any) -> None:
    bench_metadata.drop_all(engine)
    bench_metadata.create_all(engine)
    outbox.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(accounts), [{"id": i, "balance": 10**9} for i in range(ACCOUNTS)])


def run(url: str, report: Report, *, iterations: int) -> None:
    from sqlalchemy import bindparam

    engine = fresh_engine(url)
    setup(engine)
    debit_stmt = (update(accounts).where(accounts.c.id == bindparam("account"))
                  .values(balance=accounts.c.balance - bindparam("amount")))
    bare_stmt = insert(bare)
    box = outbox.Outbox(engine)
    factory = sessionmaker(engine)

    @box.transactional_message(topic="bench.transfer", key="account")
    def transfer(session: Session, account: int, amount: int, transfer_no: str) -> None:
        session.execute(debit_stmt, {"account": account, "amount": amount})

    def with_bare_insert(account: int, amount: int, transfer_no: str) -> None:
        with factory() as session, session.begin():
            session.execute(debit_stmt, {"account": account, "amount": amount})
            body = {"account": account, "amount": amount, "transfer_no": transfer_no}
            session.execute(bare_stmt, {"payload": json.dumps(body).encode()})

    def business_only(account: int, amount: int, transfer_no: str) -> None:
        with factory() as session, session.begin():
            session.execute(debit_stmt, {"account": account, "amount": amount})

    variants = {"outbox": transfer, "bare_insert": with_bare_insert, "business": business_only}
    timings = {name: Timings() for name in variants}
    rnd = random.Random(7)
    warmup = max(50, iterations // 10)
    names = list(variants)
    gc.collect()
    for i in range(warmup + iterations):
        rnd.shuffle(names)  # no variant always runs first (cache, pool, scheduler)
        for name in names:
            fn = variants[name]
            args = (rnd.randrange(ACCOUNTS), 1, f"T{i}-{name}")
            start = time.perf_counter()
            fn(*args)
            took = time.perf_counter() - start
            if i >= warmup:
                timings[name].add(took)
        if i and i % 1000 == 0:
            report.progress(f"write: {i}/{warmup + iterations}")
    engine.dispose()

    o, b, z = timings["outbox"], timings["bare_insert"], timings["business"]
    p50 = ratio(o.ms(50), b.ms(50))
    p99 = ratio(o.ms(99), b.ms(99))
    report.figure("write_vs_insert_p50", p50)
    report.figure("write_vs_insert_p99", p99)
    for name, t in timings.items():
        report.row(f"write {name} p50/p95/p99 ms",
                   f"{t.ms(50):.3f}/{t.ms(95):.3f}/{t.ms(99):.3f}", f"n={len(t.values)}")
    report.row("write outbox - bare insert p50", f"{o.ms(50) - b.ms(50):+.3f} ms",
               f"business tx alone p50 {z.ms(50):.3f} ms")
    report.row("write_vs_insert p50 / p99", f"{p50:.3f} / {p99:.3f}", "target <= 1.05 / 1.10")
    report.detail("write", {name: t.summary() for name, t in timings.items()})
