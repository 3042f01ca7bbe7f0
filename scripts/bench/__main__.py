"""outbox's own benchmark: every figure a ratio against a baseline measured in the same run.

    make bench                     PostgreSQL, the full run (under 10 minutes)
    make bench QUICK=1             the smoke run (under 2 minutes)
    make bench BENCH_ARGS="--db mariadb"
    PYTHONPATH=scripts .venv/bin/python -m bench --help
"""

from __future__ import annotations

import argparse
import sys
import time

from . import common


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=("postgres", "mariadb", "sqlite"), default="postgres")
    p.add_argument("--quick", action="store_true", help="the smoke run: small sizes")
    p.add_argument("--only", action="append", default=[],
                   help="run only these parts (repeatable): " + ", ".join(PARTS))
    p.add_argument("--backlog", type=int, default=0,
                   help="pending rows for the large claim (default 1,000,000; quick 100,000)")
    p.add_argument("--json", default="bench.json", help="where to write the figures")
    return p.parse_args(argv)


PARTS = ("write", "claim", "relay", "e2e", "scale", "sqltransport", "consumer", "rocketmq")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report = common.Report(db=args.db, quick=args.quick, broker="redis")
    parts = args.only or list(PARTS)
    started = time.monotonic()
    url = common.database_url(args.db)
    report.progress(f"database {common.shown_url(url)}")
    try:
        if "write" in parts:
            from . import write
            write.run(url, report, iterations=1000 if args.quick else 5000)
        if "claim" in parts:
            from . import claim
            claim.run(url, report, backlog=args.backlog or (100_000 if args.quick else 1_000_000),
                      rounds=30 if args.quick else 100)
    finally:
        common.drop_database(args.db, url)
    report.row("bench wall time", f"{time.monotonic() - started:.0f} s")
    report.print_table()
    report.write_json(args.json)
    print(report.bench_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
