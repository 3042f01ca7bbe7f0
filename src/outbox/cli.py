"""The ``outbox`` command: migrate, inspect, replay, purge, and run a relay."""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError

from . import migrations, storage
from .db import create_engine, safe_url
from .errors import OutboxError
from .relay import Relay, RelayConfig
from .schema import utcnow
from .sql_transport import SqlTransport


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="outbox", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("--db", required=True, help="database URL, e.g. sqlite:///bank1.db")
        return c

    c = cmd("migrate", "create or upgrade the outbox tables (Alembic chain)")
    c.add_argument("--revision", default="head")
    c = cmd("downgrade", "take the outbox tables down to a revision ('base' drops them)")
    c.add_argument("--revision", required=True)
    cmd("status", "count outbox rows per status")
    c = cmd("dead", "list dead rows with their last error")
    c.add_argument("--limit", type=int, default=100)
    c = cmd("replay", "make dead rows pending again")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--all", action="store_true", help="replay every dead row")
    g.add_argument("--id", dest="ids", action="append", help="a message id (repeatable)")
    c = cmd("purge", "delete sent outbox rows and old inbox rows, in bounded batches")
    c.add_argument("--older-than-days", type=float, required=True)
    c.add_argument("--batch-size", type=int, default=1000)
    c = cmd("relay", "publish committed outbox rows to the embedded SQL transport")
    c.add_argument("--transport-db", required=True, help="database URL of the SQL transport")
    c.add_argument("--batch-size", type=int, default=100)
    c.add_argument("--poll-interval", type=float, default=0.5)
    c.add_argument("--max-attempts", type=int, default=10)
    return p


def _purge(engine: Any, days: float, batch: int) -> str:
    if days < 0 or batch < 1:
        raise OutboxError("--older-than-days must be >= 0 and --batch-size >= 1")
    cutoff = utcnow() - dt.timedelta(days=days)
    totals = {"outbox": 0, "inbox": 0, "transaction_log": 0}
    for name, fn, kw in (
        ("outbox", storage.purge, "sent_before"),
        ("inbox", storage.purge_inbox, "processed_before"),
        ("transaction_log", storage.purge_transaction_log, "created_before"),
    ):
        while True:
            with engine.begin() as conn:
                n = fn(conn, batch_size=batch, **{kw: cutoff})
            totals[name] += n
            print(f"purge {name}: {totals[name]} deleted", file=sys.stderr)
            if n < batch:
                break
    return " ".join(f"{k}={v}" for k, v in totals.items())


def _run_relay(engine: Any, args: argparse.Namespace) -> None:
    transport = SqlTransport(create_engine(args.transport_db))
    transport.create_tables()
    relay = Relay(engine, transport.publisher(), RelayConfig(
        batch_size=args.batch_size, poll_interval=args.poll_interval,
        max_attempts=args.max_attempts,
    ))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"relay: {safe_url(engine.url)} -> {safe_url(transport.engine.url)}", file=sys.stderr)
    relay.run(stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        engine = create_engine(args.db)
        if args.command == "migrate":
            migrations.upgrade(engine, args.revision)
            print(f"outbox tables at {migrations.current(engine)} in {safe_url(engine.url)}")
        elif args.command == "downgrade":
            migrations.downgrade(engine, args.revision)
            print(f"outbox tables at {migrations.current(engine) or 'base'}")
        elif args.command == "status":
            with engine.connect() as conn:
                counts = storage.counts(conn)
            print(" ".join(f"{k}={v}" for k, v in counts.items()))
        elif args.command == "dead":
            with engine.connect() as conn:
                for row in storage.list_dead(conn, args.limit):
                    print(f"{row.message_id}\t{row.topic}\t{row.key or '-'}\t"
                          f"attempts={row.attempts}\t{row.last_error}")
        elif args.command == "replay":
            with engine.begin() as conn:
                n = storage.replay_dead(conn, None if args.all else args.ids)
            print(f"replayed {n}")
        elif args.command == "purge":
            print(_purge(engine, args.older_than_days, args.batch_size))
        elif args.command == "relay":
            _run_relay(engine, args)
    except OutboxError as exc:
        print(f"outbox: error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        # The driver's message can quote the URL; name only the kind and the server.
        print(f"outbox: database error ({type(exc).__name__}) on {safe_url(args.db)}: "
              f"{str(getattr(exc, 'orig', exc)).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
