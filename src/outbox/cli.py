"""The ``outbox`` command: migrate, inspect, replay, discard, purge, run a relay (of
one database, or of several databases in one process: ``relay --db A --db B``), and
recover the messages of committed transactions that never reached RocketMQ.

Every mistake in the command line or the database URL ends with one line
``outbox: error: ...`` that says what to do, and exit status 2; a database error
ends with ``outbox: database error ...`` and exit status 1. Neither shows a password.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NoReturn

from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import Engine, inspect, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from . import console, migrations, storage
from .brokers import masked, open_broker
from .db import create_engine, hide_secrets, safe_url
from .errors import ConfigurationError, OutboxError
from .log import clean, get_logger
from .relay import Relay, RelayConfig
from .relay_group import RelayGroup, refuse_duplicates
from .schema import DEAD, outbox_messages, utcnow
from .sql_transport import SqlTransport
from .typing import Publisher

log = get_logger("outbox.cli")

LOG_LEVELS = ("debug", "info", "warning", "error")
#: Commands that read or change an existing database; only ``migrate`` creates one.
NEEDS_EXISTING = frozenset({"downgrade", "status", "dead", "replay", "discard", "purge", "relay",
                            "rocketmq-recover", "dashboard"})
#: Commands that show a progress bar, and commands that print tables.
LONG_COMMANDS = frozenset({"migrate", "replay", "purge", "rocketmq-recover"})
TABLE_COMMANDS = frozenset({"status", "dead"})
#: Rows a ``replay --all`` makes pending per transaction.
REPLAY_BATCH = 1000
#: Where ``--broker env`` reads the broker's URL (with its password) from.
BROKER_URL_ENV = "OUTBOX_BROKER_URL"
#: Where ``outbox dashboard`` reads its write token from, unless ``--token`` gives it.
DASHBOARD_TOKEN_ENV = "OUTBOX_DASHBOARD_TOKEN"
#: ``rocketmq-recover``'s exit status when it found messages it could not send again
#: (no outbox row) or could not check (a broker did not answer).
NEEDS_ATTENTION = 3


class UsageError(Exception):
    """A command line argparse refuses; main() turns it into one error line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see `{self.prog} --help`")


class _Once(argparse.Action):
    """``--db`` of a command that works on one database: given twice is a mistake,
    not "the last one wins"."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(
                self, f"given more than once; {parser.prog} works on one database "
                      "(only `outbox relay` takes several --db)")
        setattr(namespace, self.dest, values)


def _port(text: str, lowest: int = 1) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not lowest <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"a port is a whole number from {lowest} to 65535, not {text!r}")
    return port


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not allowed; give a whole number of at least {minimum}"
            )
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give seconds above 0, e.g. 0.5")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _age(text: str) -> dt.timedelta:
    """A time back from now: a number and a unit, e.g. 90s, 30m, 24h, 7d."""
    unit = _UNITS.get(text[-1:].lower())
    try:
        value = float(text[:-1]) if unit else math.nan
    except ValueError:
        value = math.nan
    if unit is None or not math.isfinite(value) or not 0 <= value * unit <= max_days() * 86400:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed; give a time back from now with its unit, e.g. 30m, "
            "24h or 7d")
    return dt.timedelta(seconds=value * unit)


def max_days() -> int:
    """The largest age in days a cutoff can reach back (to the year 1)."""
    return (utcnow() - dt.datetime(1, 1, 1)).days - 1


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= max_days()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed; give a number of days from 0 to {max_days()}, e.g. 30"
        )
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="outbox", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str, *, many: bool = False) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        if many:
            c.add_argument("--db", dest="dbs", action="append", required=True, metavar="URL",
                           help="database URL of an outbox, e.g. sqlite:///bank1.db; repeat it "
                                "for several databases (tenants): one process serves them "
                                "all, round-robin, one batch per database per turn")
        else:
            c.add_argument("--db", action=_Once, required=True, metavar="URL",
                           help="database URL, e.g. sqlite:///bank1.db (exactly one)")
        c.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info",
                       help="what the library logs to stderr (default: info)")
        if name in LONG_COMMANDS:
            c.add_argument("--progress", choices=console.CHOICES, default="auto",
                           help="a progress bar on stderr: auto (on a terminal, the "
                                "default), always or never")
        if name in TABLE_COMMANDS:
            c.add_argument("--format", choices=console.FORMATS, default="auto",
                           help="table (the default on a terminal) or plain lines (the "
                                "default when piped)")
        return c

    c = cmd("migrate", "create or upgrade the outbox tables (Alembic chain)")
    c.add_argument("--revision", default="head")
    c = cmd("downgrade", "take the outbox tables down to a revision ('base' drops them)")
    c.add_argument("--revision", required=True)
    cmd("status", "count outbox rows per status")
    c = cmd("dead", "list dead rows with their last error, and the keys they park")
    c.add_argument("--limit", type=_whole(1), default=100, help="at most this many (>= 1)")
    c = cmd("replay", "make dead rows pending again; their keys flow on in order")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--all", action="store_true", help="replay every dead row")
    g.add_argument("--id", dest="ids", action="append", help="a message id (repeatable)")
    c = cmd("discard", "give up on dead rows (kept for audit, never sent); their keys flow on")
    c.add_argument("--id", dest="ids", action="append", help="a message id (repeatable)")
    c.add_argument("--all", action="store_true", help=argparse.SUPPRESS)
    c = cmd("purge", "delete sent outbox rows and old inbox rows, in bounded batches")
    c.add_argument("--older-than-days", type=_days, required=True)
    c.add_argument("--batch-size", type=_whole(1), default=1000)
    c = cmd("relay", "publish committed outbox rows of one database, or of several "
                     "(--db repeated), to the embedded SQL transport or to RocketMQ",
            many=True)
    c.epilog = (
        "With several --db (e.g. one database per tenant), one process serves them all "
        "fairly: round-robin, one batch per database per turn, so a large backlog in one "
        "database never holds up the others, and an idle database is polled every "
        "--poll-interval (on PostgreSQL also woken by NOTIFY). Every database must have the "
        "outbox tables (outbox migrate --db URL). A database error is logged with that "
        "database's URL and retried after --poll-interval while the others go on. Threads: "
        "one for the batches, plus one LISTEN thread per PostgreSQL database.")
    to = c.add_mutually_exclusive_group(required=True)
    to.add_argument("--transport-db", help="database URL of the SQL transport")
    to.add_argument("--broker", metavar="URL",
                    help="a broker by URL: redis://[:PASSWORD@]HOST:PORT/DB (Redis Streams, "
                         "pip install 'outbox[redis]'), or the scheme of an adapter registered "
                         "under the outbox.brokers entry points. A URL with a password is "
                         "better given "
                         "as --broker env (read from OUTBOX_BROKER_URL), out of the process "
                         "list")
    to.add_argument("--rocketmq-endpoints", metavar="HOST:PORT",
                    help="a RocketMQ 5 proxy's gRPC address; name the topics with --topic, "
                         "give ACL credentials as OUTBOX_ROCKETMQ_ACCESS_KEY and "
                         "OUTBOX_ROCKETMQ_SECRET_KEY in the environment")
    to.add_argument("--rocketmq-namesrv", metavar="HOST:PORT",
                    help="a RocketMQ name server (4.x, or 5.x without the proxy): the relay "
                         "talks to the brokers over the remoting protocol; name the topics "
                         "with --topic")
    c.add_argument("--topic", dest="topics", action="append", default=[],
                   help="with --rocketmq-endpoints or --rocketmq-namesrv: a topic the rows "
                        "go to (repeatable)")
    c.add_argument("--batch-size", type=_whole(1), default=100)
    c.add_argument("--poll-interval", type=_seconds, default=0.5)
    c.add_argument("--max-attempts", type=_whole(1), default=10)
    c.add_argument("--metrics-port", type=_port, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics: the relay's "
                        "counters and histograms, and the pending rows, their oldest's age, "
                        "dead rows and parked keys of each --db (pip install "
                        "'outbox[prometheus]')")
    c.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="the address --metrics-port listens on (default 127.0.0.1; 0.0.0.0 "
                        "for every interface)")
    c = cmd("dashboard", "a web dashboard over one or more outbox databases: messages, "
                         "dead rows and parked keys (replay, release, discard), inbox and "
                         "check-back lookups, live counts and lag", many=True)
    c.epilog = (
        "Read-only unless a token is set: give it in OUTBOX_DASHBOARD_TOKEN (or --token, "
        "which other users of the machine can see in the process list); an operator signs "
        "in with it to replay or discard, and every change is logged. Listens on "
        "127.0.0.1 unless --host says otherwise: put it behind your usual TLS proxy "
        "before opening it wider. Needs pip install 'outbox[dashboard]'.")
    c.add_argument("--port", type=lambda t: _port(t, 0), default=8500,
                   help="the port to listen on (default 8500; 0 picks a free one)")
    c.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1)")
    c.add_argument("--token", default=None,
                   help=f"the token that allows writes (default: {DASHBOARD_TOKEN_ENV})")
    c.add_argument("--redact", metavar="MODULE:FUNCTION",
                   help="a function that gets each message (outbox.Message) before its "
                        "details are shown and returns what to show")
    c.add_argument("--local-transaction-timeout", type=_seconds, default=60.0,
                   metavar="SECONDS",
                   help="the producers' local-transaction timeout, for the check-back "
                        "lookup's answer (default 60)")
    c = cmd("rocketmq-recover",
            "find committed transactions whose messages never reached their RocketMQ "
            "topic, and send them again through their outbox rows")
    c.epilog = (
        "Reads the transaction log (every row is a committed transaction) between --since "
        "and --until, asks the topic's brokers whether each message is there (their index "
        "of message keys: every message sent through outbox has its id among its keys), "
        "and makes the outbox row of each missing one pending and due now; a relay then "
        "publishes it, and the consumer's inbox drops a copy should the original turn up. "
        "Prints one line per message it could not send again (no outbox row: the guard "
        "row was off or purged) and a RECOVER line; exit status 3 when any message needs "
        "attention. Leave --until well past the broker's check-back window "
        "(transactionTimeOut + transactionCheckMax x transactionCheckInterval, about 15 "
        "minutes by default): younger half messages may still be waiting for a check-back.")
    c.add_argument("--rocketmq-namesrv", metavar="HOST:PORT", required=True,
                   help="the name server of the brokers (4.x and 5.x alike)")
    c.add_argument("--topic", dest="topics", action="append", default=[],
                   help="only these topics (repeatable; default: every topic in the log)")
    c.add_argument("--since", type=_age, default=dt.timedelta(hours=24), metavar="AGE",
                   help="how far back to look, e.g. 24h (the default) or 3d")
    c.add_argument("--until", type=_age, default=dt.timedelta(minutes=30), metavar="AGE",
                   help="skip transactions younger than this, e.g. 30m (the default)")
    c.add_argument("--dry-run", action="store_true",
                   help="report what is missing, change nothing")
    return p


def _sqlite_file(url: URL) -> Path | None:
    """The file an SQLite URL names, or None for an in-memory database."""
    database = url.database or ""
    if str(url.query.get("uri", "")).lower() in ("true", "1"):
        database = database.removeprefix("file:").split("?")[0]
        if url.query.get("mode") == "memory":
            return None
    if database in ("", ":memory:"):
        return None
    return Path(database)


def open_engine(url: str, option: str = "--db", *, must_exist: bool = False) -> Engine:
    """An engine for a URL given on the command line, refusing what is malformed
    and, with ``must_exist``, an SQLite file that is not there (instead of creating
    an empty one)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        reason = "its port is not a number" if isinstance(exc, ValueError) else "it does not parse"
        raise ConfigurationError(
            f"{option} is not a database URL ({reason}); give e.g. sqlite:///bank1.db or "
            "postgresql+psycopg://user:password@127.0.0.1:5432/bank1"
        ) from None  # the parser's message may quote the password
    if must_exist and parsed.get_backend_name() == "sqlite":
        path = _sqlite_file(parsed)
        if path is not None and not path.is_file():
            shown = safe_url(parsed)
            raise ConfigurationError(
                f"database {shown} does not exist (no file {path}); create it and the "
                f"outbox tables with `outbox migrate --db {shown}`"
            )
    return create_engine(parsed)


def _require_tables(engine: Engine) -> None:
    if not inspect(engine).has_table(outbox_messages.name):
        shown = safe_url(engine.url)
        raise ConfigurationError(
            f"the outbox tables are missing in {shown}; create them with "
            f"`outbox migrate --db {shown}`"
        )


def _alembic(action: Callable[[Engine, str], None], engine: Engine, revision: str) -> None:
    try:
        action(engine, revision)
    except CommandError as exc:
        script = ScriptDirectory(str(migrations.script_location()))
        known = ", ".join(r.revision for r in script.walk_revisions())
        raise ConfigurationError(
            f"{exc}; give --revision head, base or one of the outbox revisions: {known}"
        ) from None


def _purge(engine: Engine, days: float, batch: int, shown: str = "never") -> str:
    try:
        cutoff = utcnow() - dt.timedelta(days=days)
    except (OverflowError, ValueError):
        raise ConfigurationError(
            f"--older-than-days {days} is out of range; give 0 to {max_days()}"
        ) from None
    totals = {"outbox": 0, "inbox": 0, "transaction_log": 0, "consumer_attempts": 0}
    steps = (
        ("outbox", storage.purge, "sent_before"),
        ("inbox", storage.purge_inbox, "processed_before"),
        ("transaction_log", storage.purge_transaction_log, "created_before"),
        ("consumer_attempts", storage.purge_consumer_attempts, "updated_before"),
    )
    with console.progress(shown) as bar:
        for name, _fn, _kw in steps:
            bar.task(name, f"purge {name}")
        for name, fn, kw in steps:
            while True:
                with engine.begin() as conn:
                    n = fn(conn, batch_size=batch, **{kw: cutoff})
                totals[name] += n
                bar.update(name, advance=n)
                log.info("purge_progress", table=name, deleted=totals[name])
                if n < batch:
                    break
            bar.finish(name)
    return " ".join(f"{k}={v}" for k, v in totals.items())


def _replay(engine: Engine, args: argparse.Namespace) -> str:
    """``replay --id ...`` in one transaction; ``replay --all`` oldest first, in batches
    of :data:`REPLAY_BATCH` rows (each its own transaction), with progress."""
    if not args.all:
        with engine.begin() as conn:
            return f"replayed {storage.replay_dead(conn, args.ids)}"
    with engine.connect() as conn:
        total = storage.counts(conn)[DEAD]
    done = 0
    with console.progress(args.progress) as bar:
        bar.task("replay", "replay dead rows", total)
        while True:
            with engine.begin() as conn:
                ids = storage.oldest_dead_ids(conn, REPLAY_BATCH)
                n = storage.replay_dead(conn, ids) if ids else 0
            done += n
            bar.update("replay", advance=n)
            if n:
                log.info("replay_progress", replayed=done, of=total)
            if len(ids) < REPLAY_BATCH:
                break
    return f"replayed {done}"


def _migrate(engine: Engine, args: argparse.Namespace) -> None:
    """``migrate``: the outbox chain's revisions, one step of the progress bar each."""
    script = ScriptDirectory(str(migrations.script_location()))
    before = migrations.current(engine)
    try:
        steps = len(list(script.iterate_revisions(args.revision, before or "base")))
    except (CommandError, RevisionError):
        steps = 0  # an unknown revision: _alembic says what to do
    with console.progress(args.progress) as bar:
        bar.task("migrate", "migrate", steps)

        def applied(*_: object, **step: Any) -> None:
            bar.update("migrate", advance=1)
            log.info("migrate_step", revision=step.get("step_revision", ""))

        _alembic(lambda e, rev: migrations.upgrade(e, rev, on_step=applied), engine,
                 args.revision)


def _status(engine: Engine, shown: str) -> None:
    with engine.connect() as conn:
        counts = storage.counts(conn)
        backlog = storage.topic_backlog(conn)
    if not console.tables_wanted(shown):
        print(" ".join(f"{k}={v}" for k, v in counts.items()))
        return
    console.print_table("outbox rows", ["status", "rows"], list(counts.items()),
                        justify=["left", "right"])
    if backlog:
        now = utcnow()
        console.print_table("still to go, by topic",
                            ["topic", "pending", "oldest pending", "dead", "parked keys"],
                            [(t.topic, t.pending,
                              console.age((now - t.oldest_pending).total_seconds()) + " ago"
                              if t.oldest_pending else "-",
                              t.dead, t.parked_keys) for t in backlog],
                            justify=["left", "right", "right", "right", "right"])


def _dead(engine: Engine, limit: int, shown: str = "plain") -> None:
    with engine.connect() as conn:
        dead = storage.list_dead(conn, limit)
        parked = storage.list_parked_keys(conn, limit)
    if console.tables_wanted(shown):
        if dead:
            console.print_table("dead rows", ["id", "topic", "key", "attempts", "last error"],
                                [(clean(r.message_id), clean(r.topic), clean(r.key or "-"),
                                  r.attempts, clean(r.last_error or "")) for r in dead],
                                justify=["left", "left", "left", "right"])
        if parked:
            console.print_table("parked keys", ["key", "rows waiting", "behind dead rows"],
                                [(clean(p.key), p.waiting,
                                  ", ".join(clean(i) for i in p.dead_ids)) for p in parked],
                                justify=["left", "right"])
    else:
        for row in dead:
            print(f"{clean(row.message_id)}\t{clean(row.topic)}\t{clean(row.key or '-')}\t"
                  f"attempts={row.attempts}\t{clean(row.last_error or '')}")
        for p in parked:
            print(f"parked key {clean(p.key)}: {p.waiting} rows waiting behind dead "
                  f"{', '.join(clean(i) for i in p.dead_ids)}")
    if not dead:
        print("no dead rows", file=sys.stderr)
    elif parked:
        print("replay the dead rows (outbox replay) or discard them (outbox discard) "
              "to release their keys", file=sys.stderr)


def _discard(engine: Engine, args: argparse.Namespace) -> str:
    if args.all or not args.ids:
        raise ConfigurationError(
            "discard takes the ids of the dead rows to give up on, one --id each; there is "
            "no --all: list them with `outbox dead`"
        )
    ids = list(dict.fromkeys(args.ids))
    with engine.begin() as conn:
        n = storage.discard_dead(conn, ids)
    if n < len(ids):
        print(f"{len(ids) - n} of the ids named no dead row (see `outbox dead`)",
              file=sys.stderr)
    return f"discarded {n}"


def _publisher(args: argparse.Namespace, stack: ExitStack) -> tuple[Publisher, str]:
    """The relay's publisher and, for the log, where it publishes to; ``stack`` closes
    them."""
    publisher, where = _open_publisher(args, stack)
    stack.callback(publisher.close)
    return publisher, where


def _open_publisher(args: argparse.Namespace, stack: ExitStack) -> tuple[Publisher, str]:
    if args.broker is not None:
        if args.topics:
            raise ConfigurationError("--topic is for RocketMQ; a --broker takes every topic")
        url = os.environ.get(BROKER_URL_ENV, "") if args.broker == "env" else args.broker
        if not url:
            raise ConfigurationError(f"--broker env reads {BROKER_URL_ENV}, which is not set")
        broker = open_broker(url)
        stack.callback(broker.close)
        return broker.publisher(), masked(url)
    if args.rocketmq_namesrv is not None:
        if not args.topics:
            raise ConfigurationError(
                "--rocketmq-namesrv needs the topics the rows go to: --topic NAME (repeatable)")
        RocketMQConfig, RocketMQPublisher = _rocketmq("the RocketMQ relay")
        return (RocketMQPublisher(RocketMQConfig(namesrv=args.rocketmq_namesrv), args.topics),
                f"rocketmq name server {args.rocketmq_namesrv}")
    if args.rocketmq_endpoints is None:
        if args.topics:
            raise ConfigurationError("--topic is for --rocketmq-endpoints and "
                                     "--rocketmq-namesrv; the SQL transport takes every topic")
        transport = SqlTransport(open_engine(args.transport_db, "--transport-db"))
        transport.create_tables()
        return transport.publisher(), safe_url(transport.engine.url)
    if not args.topics:
        raise ConfigurationError(
            "--rocketmq-endpoints needs the topics the rows go to: --topic NAME "
            "(repeatable; the proxy learns a publisher's topics at its start)")
    RocketMQConfig, RocketMQPublisher = _rocketmq("the RocketMQ relay")
    config = RocketMQConfig(args.rocketmq_endpoints,
                            access_key=os.environ.get("OUTBOX_ROCKETMQ_ACCESS_KEY"),
                            secret_key=os.environ.get("OUTBOX_ROCKETMQ_SECRET_KEY"))
    return RocketMQPublisher(config, args.topics), f"rocketmq {args.rocketmq_endpoints}"


def _rocketmq(what: str) -> Any:
    """The RocketMQ adapter's config and publisher classes, or an error naming the extra."""
    try:
        from outbox_rocketmq import RocketMQConfig, RocketMQPublisher
    except ImportError:
        raise ConfigurationError(
            f'{what} needs its extra: pip install "outbox[rocketmq]"') from None
    return RocketMQConfig, RocketMQPublisher


def _recover(engine: Engine, args: argparse.Namespace) -> int:
    _rocketmq("rocketmq-recover")
    from outbox_rocketmq.config import RocketMQConfig
    from outbox_rocketmq.recover import RecoveryReport, count_committed, recover

    RocketMQConfig(namesrv=args.rocketmq_namesrv)  # the address checks, one error style
    now = utcnow()
    since, until = now - args.since, now - args.until

    with console.progress(args.progress) as bar:
        bar.task("recover", "check the transaction log",
                 count_committed(engine, since=since, until=until, topics=args.topics))

        def progress(report: RecoveryReport) -> None:
            bar.update("recover", completed=report.checked)
            if not bar.enabled:
                print(f"checked {report.checked}: {report.on_topic} on their topic, "
                      f"{report.missing} missing", file=sys.stderr, flush=True)

        report = recover(engine, args.rocketmq_namesrv, since=since, until=until,
                         topics=args.topics, dry_run=args.dry_run, progress=progress)
        bar.update("recover", completed=report.checked)
    for message_id in report.no_local_copy:
        print(f"LOST {message_id}: committed, not on its topic, no outbox row to send "
              "again: re-issue it")
    for message_id in report.unanswered:
        print(f"UNCHECKED {message_id}: a broker did not answer; run again")
    what = "would send again" if args.dry_run else "sent again"
    for message_id in report.resent:
        print(f"RESENT {message_id}: {what} through its outbox row")
    print(report.line() + (" dry_run=yes" if args.dry_run else ""))
    return NEEDS_ATTENTION if report.no_local_copy or report.unanswered else 0


def _relay_config(args: argparse.Namespace) -> RelayConfig:
    return RelayConfig(batch_size=args.batch_size, poll_interval=args.poll_interval,
                       max_attempts=args.max_attempts)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@contextlib.contextmanager
def _metrics(args: argparse.Namespace, engines: Sequence[Engine]) -> Iterator[None]:
    """``--metrics-port``: serve ``/metrics`` while the relay runs."""
    if args.metrics_port is None:
        yield
        return
    try:
        from . import metrics
    except ImportError as exc:
        raise ConfigurationError(
            "--metrics-port needs prometheus-client: pip install 'outbox[prometheus]'"
        ) from exc
    with metrics.serving(args.metrics_port, host=args.metrics_host,
                         engines={safe_url(e.url): e for e in engines},
                         option="--metrics-port"):
        print(f"metrics at http://{args.metrics_host}:{args.metrics_port}/metrics",
              file=sys.stderr, flush=True)
        yield


def _run_relay(engine: Engine, args: argparse.Namespace) -> None:
    with ExitStack() as stack:
        stack.enter_context(_metrics(args, [engine]))
        publisher, where = _publisher(args, stack)
        relay = Relay(engine, publisher, _relay_config(args))
        stop = _stop_on_signals()
        log.info("relay_started", db=engine.url, transport=where)
        relay.run(stop)


def _run_relay_group(args: argparse.Namespace) -> None:
    """``outbox relay`` with several ``--db``: one :class:`RelayGroup` for them all.
    Every database must exist and have the outbox tables before anything starts."""
    engines = _open_all(args)
    try:
        with ExitStack() as stack:
            stack.enter_context(_metrics(args, engines))
            publisher, where = _publisher(args, stack)
            group = RelayGroup(engines, publisher, _relay_config(args))
            stop = _stop_on_signals()
            log.info("relay_started", dbs=", ".join(group.names), transport=where)
            group.run(stop)
    finally:
        for engine in engines:
            engine.dispose()


def _redactor(spec: str | None) -> Callable[[Any], Any] | None:
    if not spec:
        return None
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigurationError(f"--redact {spec!r} is not MODULE:FUNCTION, e.g. "
                                 "myapp.ops:hide_card_numbers")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"--redact {spec}: {exc}; give an importable "
                                 "MODULE:FUNCTION") from None
    if not callable(fn):
        raise ConfigurationError(f"--redact {spec} is not a function")
    return fn  # type: ignore[no-any-return]


def _open_all(args: argparse.Namespace) -> list[Engine]:
    """Engines for ``--db`` repeated: each must exist and have the outbox tables
    (checked before anything starts; a database error names its database)."""
    engines: list[Engine] = []
    try:
        for url in args.dbs:
            engines.append(open_engine(url, must_exist=True))  # connects to none yet
        refuse_duplicates(e.url for e in engines)
        for engine, url in zip(engines, args.dbs, strict=True):
            args.db = url
            _require_tables(engine)
        args.db = None
    except BaseException:
        for engine in engines:
            engine.dispose()
        raise
    return engines


def _run_dashboard(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .dashboard import create_app
    except ImportError:
        raise ConfigurationError(
            "outbox dashboard needs its extra: pip install 'outbox[dashboard]'") from None
    token = args.token or os.environ.get(DASHBOARD_TOKEN_ENV) or None
    redact = _redactor(args.redact)
    engines = _open_all(args)
    try:
        app = create_app(engines, token=token, redact=redact,
                         local_transaction_timeout=dt.timedelta(
                             seconds=args.local_transaction_timeout))
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
            sock.listen(128)  # connections wait from here on, while uvicorn starts
        except OSError as exc:
            sock.close()
            raise ConfigurationError(
                f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
                "choose another --port") from None
        port = sock.getsockname()[1]
        mode = "writes need the token" if token else f"read-only: no {DASHBOARD_TOKEN_ENV}"
        print(f"dashboard at http://{args.host}:{port}/ ({mode}) over "
              f"{', '.join(safe_url(e.url) for e in engines)}", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               lifespan="off"))
        server.run(sockets=[sock])
    finally:
        for engine in engines:
            engine.dispose()


def _run(args: argparse.Namespace) -> int:
    args.db = getattr(args, "db", None)
    if args.command == "dashboard":
        _run_dashboard(args)
        return 0
    if args.command == "relay":
        if len(args.dbs) > 1:
            _run_relay_group(args)
            return 0
        args.db = args.dbs[0]
    engine = open_engine(args.db, must_exist=args.command in NEEDS_EXISTING)
    try:
        if args.command == "migrate":
            _migrate(engine, args)
            print(f"outbox tables at {migrations.current(engine)} in {safe_url(engine.url)}")
            return 0
        if args.command == "downgrade":
            _alembic(migrations.downgrade, engine, args.revision)
            print(f"outbox tables at {migrations.current(engine) or 'base'} "
                  f"in {safe_url(engine.url)}")
            return 0
        _require_tables(engine)
        if args.command == "status":
            _status(engine, args.format)
        elif args.command == "dead":
            _dead(engine, args.limit, args.format)
        elif args.command == "replay":
            print(_replay(engine, args))
        elif args.command == "discard":
            print(_discard(engine, args))
        elif args.command == "purge":
            print(_purge(engine, args.older_than_days, args.batch_size, args.progress))
        elif args.command == "relay":
            _run_relay(engine, args)
        elif args.command == "rocketmq-recover":
            return _recover(engine, args)
    finally:
        engine.dispose()
    return 0


@contextlib.contextmanager
def _logging_to_stderr(level: str) -> Iterator[None]:
    """The library's log on stderr for the command's run, then as it was before."""
    logger = logging.getLogger("outbox")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _database_error(exc: SQLAlchemyError, args: argparse.Namespace) -> str:
    # The driver's message can quote the URL; name only the kind, the server and
    # the first line, with every secret of the URLs given scrubbed out.
    text = str(getattr(exc, "orig", None) or exc).splitlines()
    first = text[0][:300] if text else type(exc).__name__
    dbs = getattr(args, "dbs", None) or []
    for url in (args.db, *dbs, getattr(args, "transport_db", None)):
        if url:
            first = hide_secrets(first, url)
    where = args.db or getattr(args, "transport_db", None) or ""
    return f"database error ({type(exc).__name__}) on {safe_url(where)}: {clean(first)}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        print(f"outbox: error: {clean(exc)}", file=sys.stderr)
        return 2
    with _logging_to_stderr(args.log_level):
        try:
            status = _run(args)
        except OutboxError as exc:
            print(f"outbox: error: {clean(exc)}", file=sys.stderr)
            return 2
        except SQLAlchemyError as exc:
            print(f"outbox: {_database_error(exc, args)}", file=sys.stderr)
            return 1
    return status


__all__ = ["UsageError", "main", "max_days", "open_engine"]

if __name__ == "__main__":
    raise SystemExit(main())
