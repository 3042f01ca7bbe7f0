"""``python -m bank_transfer.chaos``: the bank-transfer services under faults.

Runs every chosen scenario on every chosen database with every chosen adapter,
prints one row per run and ends with exactly one line::

    CHAOS scenarios=S transfers=N faults=F lost=0 duplicated=0 wrong_balance=0 stuck=0

and exits 1 when lost, duplicated, wrong_balance or stuck is not zero. ``--seed``
replays a run's decisions (which transfers, which crash draws, when); the timing of
processes on a busy machine cannot be replayed exactly.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import URL

from .. import CONSUMER_GROUP
from ..transports import DEFAULT_ENDPOINTS
from . import hostile
from .matrix import (
    ADAPTERS,
    DATABASES,
    SCENARIOS,
    URL_ADAPTERS,
    broker,
    ensure_databases,
    place,
    server_url,
)
from .runner import Row, Settings, run_scenario

MARKER = ".bank-transfer-chaos"
#: Where scripts/rocketmq4 runs the 4.9 name server (OUTBOX_TEST_ROCKETMQ4_NAMESRV).
DEFAULT_NAMESRV = "127.0.0.1:19876"


def say(line: str = "") -> None:
    print(line, flush=True)


def _list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bank_transfer.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, help="replay a run (default: a random seed)")
    parser.add_argument("--transfers", type=int, default=40, help="per scenario (default 40)")
    parser.add_argument("--threads", type=int, default=4, help="HTTP client threads (default 4)")
    parser.add_argument("--databases", type=_list(DATABASES), default=list(DATABASES),
                        help=f"comma-separated, of {','.join(DATABASES)} (default all)")
    parser.add_argument("--adapters", type=_list(ADAPTERS), default=list(ADAPTERS),
                        help=f"comma-separated, of {','.join(ADAPTERS)} (default all)")
    parser.add_argument("--scenarios", type=_list(tuple(SCENARIOS)), default=list(SCENARIOS),
                        help=f"comma-separated, of {','.join(SCENARIOS)} (default all)")
    parser.add_argument("--matrix", choices=("rotate", "full"), default="rotate",
                        help="rotate (default): every scenario with every adapter once, the "
                             "database taking turns; full: every database x adapter x scenario")
    parser.add_argument("--settle-timeout", type=float, default=90.0,
                        help="seconds to wait for a scenario to settle (default 90)")
    parser.add_argument("--load-timeout", type=float, default=240.0,
                        help="seconds a transfer may go unanswered before it is left "
                             "undecided (default 240)")
    parser.add_argument("--outage-seconds", type=float, default=3.0,
                        help="how long the broker or database stays down (default 3)")
    parser.add_argument("--workdir", type=Path, default=Path(".chaos"),
                        help="run folder with the services' logs, wiped at start (default .chaos)")
    parser.add_argument("--rocketmq-endpoints", default=os.environ.get(
        "OUTBOX_TEST_ROCKETMQ_ENDPOINTS", DEFAULT_ENDPOINTS),
        help="the RocketMQ 5 gRPC proxy, for outbox-rocketmq and rocketmq (default "
             "$OUTBOX_TEST_ROCKETMQ_ENDPOINTS or %(default)s)")
    parser.add_argument("--rocketmq-namesrv", default=os.environ.get(
        "OUTBOX_TEST_ROCKETMQ4_NAMESRV", DEFAULT_NAMESRV),
        help="the RocketMQ 4.9 name server, for outbox-rocketmq4 and rocketmq4 (default "
             "$OUTBOX_TEST_ROCKETMQ4_NAMESRV or %(default)s, as scripts/rocketmq4 runs it)")
    args = parser.parse_args(argv)
    if args.transfers < 1 or args.threads < 1:
        parser.error("--transfers and --threads must be at least 1")
    return args


def prepare(path: Path) -> Path:
    path = path.resolve()
    if path.exists():
        if any(path.iterdir()) and not (path / MARKER).exists():
            raise SystemExit(f"refusing to wipe {path}: not empty and not a chaos run folder")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("run folder of python -m bank_transfer.chaos; wiped each run\n")
    return path


HEADER = (f"{'scenario':<14} {'database':<9} {'adapter':<16} {'transfers':>9} {'faults':>6} "
          f"{'lost':>4} {'dup':>4} {'wrong':>5} {'stuck':>5} {'settle':>7}  notes")


def format_row(row: Row) -> str:
    start = f"{row.scenario:<14} {row.database:<9} {row.adapter:<16}"
    if row.skipped:
        return f"{start} {'-':>9} {'-':>6} {'-':>4} {'-':>4} {'-':>5} {'-':>5} {'-':>7}  " \
               f"does not apply: {row.skipped}"
    v = row.verdict
    settle = f"{row.settle_seconds:.1f}s" if row.settle_seconds is not None else "never"
    return (f"{start} {row.transfers:>9} {row.faults:>6} {v.lost:>4} {v.duplicated:>4} "
            f"{v.wrong_balance:>5} {v.stuck:>5} {settle:>7}  {'; '.join(row.notes)}")


def runs(args: argparse.Namespace, servers: dict[str, URL],
         workdir: Path) -> list[tuple[str, str, str]]:
    """(database, adapter, scenario) to run, in order.

    ``full`` is the whole product. ``rotate`` runs each scenario once per adapter,
    on the databases in turn, skipping a database where the scenario cannot apply
    (no server to restart in SQLite): every scenario, adapter and database is
    covered in a third of the time.
    """
    if args.matrix == "full":
        return [(d, a, s) for d in args.databases for a in args.adapters for s in args.scenarios]
    out = []
    for i, name in enumerate(args.scenarios):
        for j, adapter in enumerate(args.adapters):
            turn = [args.databases[(i + j + k) % len(args.databases)]
                    for k in range(len(args.databases))]
            usable = [d for d in turn
                      if not isinstance(place(d, adapter, SCENARIOS[name], workdir, servers), str)]
            out.append(((usable or turn)[0], adapter, name))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)
    workdir = prepare(args.workdir)
    # Names on a shared broker: fresh per invocation, so a replay does not meet the
    # first run's messages (the seed decides what happens, not what things are called).
    token = secrets.token_hex(3)
    group = f"{CONSUMER_GROUP}-chaos{token}"
    os.environ["HOME"] = str(workdir)  # the RocketMQ client's own log goes there
    # The client's background heartbeats log a traceback each while the broker is
    # down on purpose; the outcome is judged from the databases, not from those.
    logging.getLogger("concurrent.futures").setLevel(logging.CRITICAL)
    say(f"chaos seed={seed} (replay with --seed {seed}); transfers per scenario "
        f"{args.transfers}; run folder {workdir}")
    servers: dict[str, URL] = {}
    for name in ("postgres", "mariadb"):
        url = server_url(name)
        if url is not None:
            ensure_databases(url)
            servers[name] = url
    settings = Settings(args.transfers, args.threads, args.settle_timeout, args.load_timeout,
                        args.outage_seconds, args.rocketmq_endpoints, args.rocketmq_namesrv)
    settings.urls = {a: os.environ[v] for a, v in URL_ADAPTERS.items() if os.environ.get(v)}
    # One dead-letter reader per broker in use, by broker (rocketmq, rocketmq4, ...).
    dlqs: dict[str, hostile.DeadLetters] = {}
    rows: list[Row] = []
    began = time.monotonic()
    try:
        for adapter in args.adapters:
            where = broker(adapter)
            if where is not None and where not in dlqs:
                dlqs[where] = (
                    hostile.BrokerDeadLetters(settings.url(adapter), group)
                    if adapter in URL_ADAPTERS else
                    hostile.DeadLetterReader(settings.broker_config(adapter),
                                             f"chaos-dlq-{token}"))
                dlqs[where].ready()
        for number, (database, adapter, name) in enumerate(
                runs(args, servers, workdir), start=1):
            scenario = SCENARIOS[name]
            run_seed = rng.randrange(2**31)
            folder = workdir / f"{number:03d}-{name}-{database}-{adapter}"
            folder.mkdir()
            row = Row(name, database, adapter)
            placement = place(database, adapter, scenario, folder, servers)
            if isinstance(placement, str):
                row.skipped = placement
            else:
                row.notes.extend(filter(None, [placement.note]))
                say(f"[{time.monotonic() - began:4.0f}s] {name} on {database} with {adapter}: "
                    f"{scenario.what}")
                try:
                    run_scenario(row, scenario, placement, folder, run_seed, settings,
                                 group, f"c{token}n{number}",
                                 dlqs.get(broker(adapter) or ""))
                except Exception as exc:  # the harness itself failed: count it as stuck
                    row.verdict.stuck += 1
                    row.notes.append(f"harness error {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:200]}")
            rows.append(row)
            say(format_row(row))
            for detail in row.verdict.details:
                say(f"    {detail}")
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        for reader in dlqs.values():
            reader.close()
    ran = [r for r in rows if not r.skipped]
    say("")
    say(HEADER)
    for row in rows:
        say(format_row(row))
    say(f"finished in {time.monotonic() - began:.0f} s; service logs under {workdir}")
    totals = {k: sum(getattr(r.verdict, k) for r in ran)
              for k in ("lost", "duplicated", "wrong_balance", "stuck")}
    say(f"CHAOS scenarios={len(ran)} transfers={sum(r.transfers for r in ran)} "
        f"faults={sum(r.faults for r in ran)} lost={totals['lost']} "
        f"duplicated={totals['duplicated']} wrong_balance={totals['wrong_balance']} "
        f"stuck={totals['stuck']}")
    return 1 if any(totals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
