"""outbox's own benchmark: every figure a ratio against a baseline measured in the same
run, so it means the same on a noisy machine.

    make bench                          PostgreSQL, the full run (under 10 minutes)
    make bench QUICK=1                  the smoke run (under 2 minutes)
    make bench BENCH_ARGS="--db mariadb"
    PYTHONPATH=scripts .venv/bin/python -m bench --help

The reference broker is Redis (a list per topic, Debian's redis-server started by
scripts/services), reached through the public Publisher protocol; the embedded SQL
transport and RocketMQ get figures of their own. Prints one table, writes the figures
as JSON, and ends with one BENCH line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import common

PARTS = ("write", "claim", "relay", "e2e", "consumer", "scale", "sqltransport", "rocketmq",
         "seam")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=("postgres", "mariadb", "sqlite"), default="postgres",
                   help="the database of the outbox side (default: postgres)")
    p.add_argument("--quick", action="store_true", help="the smoke run: small sizes")
    p.add_argument("--only", action="append", default=[], choices=PARTS, metavar="PART",
                   help="run only this part (repeatable): " + ", ".join(PARTS))
    p.add_argument("--skip", action="append", default=[], choices=PARTS, metavar="PART",
                   help="leave this part out (repeatable)")
    p.add_argument("--backlog", type=int, default=0,
                   help="pending rows for the large claim (default 1,000,000; quick 100,000)")
    p.add_argument("--rocketmq-endpoints",
                   default=os.environ.get("OUTBOX_TEST_ROCKETMQ_ENDPOINTS", "127.0.0.1:8081"),
                   help="the RocketMQ proxy for halfmsg_vs_plain (default 127.0.0.1:8081)")
    p.add_argument("--json", default="bench.json", help="where to write the figures")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report = common.Report(db=args.db, quick=args.quick, broker="redis")
    parts = [p for p in (args.only or PARTS) if p not in args.skip]
    quick = args.quick
    started = time.monotonic()
    url = common.database_url(args.db)
    report.progress(f"outbox database {common.shown_url(url)}; parts: {', '.join(parts)}")
    try:
        for part in parts:
            t0 = time.monotonic()
            report.progress(f"{part} ...")
            run_part(part, url, report, args)
            report.progress(f"{part} done in {time.monotonic() - t0:.0f} s")
    finally:
        common.drop_database(args.db, url)
    report.row("bench wall time", f"{time.monotonic() - started:.0f} s",
               "quick" if quick else "full")
    report.print_table()
    report.write_json(args.json)
    print(f"figures written to {args.json}")
    print(report.bench_line())
    return 0


def run_part(part: str, url: str, report: common.Report, args: argparse.Namespace) -> None:
    quick = args.quick
    if part == "write":
        from . import write
        write.run(url, report, iterations=1000 if quick else 5000)
    elif part == "claim":
        from . import claim
        claim.run(url, report, backlog=args.backlog or (100_000 if quick else 1_000_000),
                  rounds=30 if quick else 100)
    elif part == "relay":
        from . import relay
        relay.run(url, report, messages=20_000 if quick else 100_000)
    elif part == "e2e":
        from . import e2e
        e2e.run(url, report, count=1000 if quick else 3000)
    elif part == "consumer":
        from . import consumer
        consumer.run(url, report, iterations=1000 if quick else 5000)
    elif part == "scale":
        from . import scale
        scale.run(url, report, quick=quick)
    elif part == "sqltransport":
        from . import sqltransport
        sqltransport.run(url, report, quick=quick)
    elif part == "rocketmq":
        from . import rocketmq
        rocketmq.run(report, quick=quick, endpoints=args.rocketmq_endpoints)
    elif part == "seam":
        from . import seam
        seam.run(url, report, iterations=1000 if quick else 5000,
                 messages=5_000 if quick else 50_000)


if __name__ == "__main__":
    sys.exit(main())
