"""The demo: bank1, the relay and bank2 as processes, 12 transfers, an audit.

Run ``PYTHONPATH=examples python -m bank_transfer.demo``. It resets the databases
(SQLite files in a fresh run folder by default), sends transfers over HTTP,
publishes one message a second time, waits until everything has settled, then
reads both banks and prints one line saying whether money was conserved. The
services' logs go to files in the run folder, not to this output.

``--transport rocketmq`` runs the same over a RocketMQ 5 broker (``scripts/rocketmq
up`` starts one): bank1 sends transactional half messages, bank2 consumes with a
consumer group of this run's own, and only this run's transfers count.
``--transport broker --broker URL`` does the same over Kafka, RabbitMQ, Redis Streams
or NATS JetStream (``make demo-kafka`` and the like start one): every transfer's
message is an outbox row that the relay publishes.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from types import FrameType

import httpx
from sqlalchemy import Engine, make_url, select
from sqlalchemy.exc import SQLAlchemyError

from outbox import JsonCodec, Message, OutboxError, SqlTransport, create_engine
from outbox.brokers import masked, open_broker, scheme_of
from outbox.cli import DASHBOARD_TOKEN_ENV
from outbox.db import safe_url
from outbox.schema import SENT
from outbox.storage import read_messages
from outbox.typing import Publisher
from outbox_rocketmq import RocketMQPublisher

from . import CONSUMER_GROUP, REFUND_GROUP, TOPIC
from .audit import Books, backlog, balances, find_problems, progress, read_books
from .bank1 import transfer_message
from .bank2 import ConsumerReport, read_report
from .children import Child, ServiceFailed, free_port, start, stop_all, wait_healthy
from .models import transfers
from .observability import METRICS_PORT_VAR
from .runs import run_transfer_no
from .setup import setup, setup_transport
from .transports import BROKER, DEFAULT_ENDPOINTS, ROCKETMQ, SQL, TRANSPORTS, rocketmq_config

#: (transfer number, amount as sent, to account, should it commit?). Account 1 starts
#: with 10000.00; TX-0006 and TX-0011 ask for more than is left (TX-0011 by one cent).
#: Account 3 at bank2 is frozen: TX-0013 and TX-0014 commit at bank1, bank2 sends them
#: back, and bank1 refunds them (they come last, so no refund can change whether an
#: earlier transfer has the funds).
SCRIPT: list[tuple[str, str | int, str, bool]] = [
    ("TX-0001", 1000, "2", True), ("TX-0002", "250.50", "2", True),
    ("TX-0003", "999.99", "2", True), ("TX-0004", "1200.00", "2", True),
    ("TX-0005", "500.25", "2", True), ("TX-0006", "8000.00", "2", False),
    ("TX-0007", "1500.00", "2", True), ("TX-0008", "750.75", "2", True),
    ("TX-0009", 300, "2", True), ("TX-0010", "2000.00", "2", True),
    ("TX-0011", "1498.52", "2", False), ("TX-0012", "1000.00", "2", True),
    ("TX-0013", "200.00", "3", True), ("TX-0014", "98.51", "3", True),
]
REPEATED = "TX-0003"  # sent a second time, identically: answered 200, not debited again
MARKER = ".bank-transfer-demo"
REPORT_FILE = "bank2-report.json"


@dataclass(frozen=True)
class Broker:
    """A run over RocketMQ: where the proxy is, and what sets this run apart there.

    The broker keeps the topic's messages from earlier runs (and sees those of runs
    going on at the same time). So every run numbers its transfers
    ``<run id>-TX-0001`` and so on, and bank2 consumes with a group of its own,
    ``bank2-<run id>``, taking only this run's transfers (see ``bank2.OnlyRun``).
    """

    endpoints: str
    namesrv: str | None = None
    #: Any other broker, by its URL (``--transport broker``); then the two above
    #: are unused.
    url: str | None = None
    run_id: str = field(default_factory=lambda: "r" + secrets.token_hex(4))

    @property
    def where(self) -> str:
        if self.url:
            return masked(self.url)
        return f"name server {self.namesrv}" if self.namesrv else f"proxy {self.endpoints}"

    @property
    def args(self) -> list[str]:
        """The services' options to reach this broker."""
        if self.url:
            return ["--transport", BROKER, "--broker", self.url]
        extra = ["--rocketmq-namesrv", self.namesrv] if self.namesrv else []
        return ["--transport", ROCKETMQ, "--rocketmq-endpoints", self.endpoints, *extra]

    def publisher(self) -> Publisher:
        if self.url:
            return open_broker(self.url).publisher()
        return RocketMQPublisher(rocketmq_config(self.endpoints, self.namesrv), [TOPIC])

    @property
    def group(self) -> str:
        return f"{CONSUMER_GROUP}-{self.run_id}"

    @property
    def refund_group(self) -> str:
        return f"{REFUND_GROUP}-{self.run_id}"

    def transfer_no(self, number: str) -> str:
        return run_transfer_no(self.run_id, number)


@dataclass
class Run:
    """What the demo saw, filled in as it goes."""

    attempted: int = 0
    refused: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    before: tuple[Decimal, Decimal] | None = None
    settled: bool = False
    books: Books | None = None


def say(line: str = "") -> None:
    print(line, flush=True)


def prepare_workdir(path: Path) -> Path:
    """Empty the run folder, refusing one that the demo did not create."""
    path = path.resolve()
    if path.exists():
        if any(path.iterdir()) and not (path / MARKER).exists():
            raise SystemExit(f"refusing to wipe {path}: it is not empty and not a demo run folder")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("run folder of python -m bank_transfer.demo; wiped each run\n")
    return path


def send_transfers(
    client: httpx.Client, run: Run, number: Callable[[str], str] = str
) -> None:
    """The script's transfers, numbered by ``number`` (the run's prefix, if any)."""
    say(f"sending {len(SCRIPT)} transfers from account 1 (bank1) to accounts 2 and 3 "
        "(bank2; account 3 is frozen):")
    for script_no, amount, to_account, should_commit in SCRIPT:
        transfer_no = number(script_no)
        response = post(client, transfer_no, amount, to_account)
        run.attempted += 1
        expected = 201 if should_commit else 409
        if response.status_code == 409:
            run.refused.add(transfer_no)
        if response.status_code != expected:
            run.problems.append(f"{transfer_no}: expected HTTP {expected}, "
                                f"got {response.status_code} {response.text}")
    amount = next(a for no, a, _, _ in SCRIPT if no == REPEATED)
    response = post(client, number(REPEATED), amount, "2", note="(the same transfer again)")
    if response.status_code != 200:
        run.problems.append(f"repeated {number(REPEATED)}: expected HTTP 200, "
                            f"got {response.status_code}")


def post(
    client: httpx.Client, transfer_no: str, amount: str | int, to_account: str, note: str = ""
) -> httpx.Response:
    response = client.post("/transfers", json={
        "transfer_no": transfer_no, "amount": amount, "from_account": "1",
        "to_account": to_account,
    })
    try:
        body = response.json()
        outcome = body.get("status") or body.get("error")
    except (ValueError, AttributeError):
        outcome = response.text[:200]
    line = (f"  {transfer_no}  {Decimal(amount):>9.2f} to {to_account}  -> "
            f"{response.status_code} {outcome} {note}")
    say(line.rstrip())
    return response


def publish_again(bank1: Engine, transport: SqlTransport, timeout: float = 30.0) -> str:
    """Put the first message the relay sent onto the transport once more, same id."""
    deadline = time.monotonic() + timeout
    while True:
        with bank1.connect() as conn:
            sent = read_messages(conn, status=SENT, limit=1)
        if sent:
            break
        if time.monotonic() >= deadline:
            raise ServiceFailed(f"the relay sent nothing within {timeout:.0f} s; see relay.log")
        time.sleep(0.05)
    transport.publisher().publish(sent[0])
    say(f"published message {sent[0].id} onto the transport a second time (same id)")
    return sent[0].id


def publish_again_rocketmq(bank1: Engine, broker: Broker) -> bool:
    """Publish bank1's first committed transfer onto the broker once more, same id;
    True when the broker itself dropped it as a duplicate (NATS JetStream within its
    duplicate window), so bank2 will never see it.

    With half messages bank1's outbox table stays empty (unless the broker was
    unreachable), so the message is built again from the ``transfers`` row, exactly
    as bank1 built it: the id is the transfer number, the body is ``transfer_message``.
    """
    with bank1.connect() as conn:
        row = conn.execute(
            select(transfers).order_by(transfers.c.created_at, transfers.c.transfer_no).limit(1)
        ).first()
    if row is None:
        raise ServiceFailed("bank1 committed no transfer; see bank1.log")
    message = Message(
        id=row.transfer_no, topic=TOPIC, key=row.from_account,
        payload=JsonCodec().encode(
            transfer_message(row.transfer_no, row.from_account, row.to_account, row.amount)),
    )
    publisher = broker.publisher()
    try:
        publisher.publish(message)
        dropped = bool(getattr(publisher, "duplicates", 0))
    finally:
        publisher.close()
    say(f"published message {message.id} onto the broker a second time (same id)"
        + ("; the broker stored it once (its duplicate window)" if dropped else ""))
    return dropped


def wait_consumer_ready(child: Child, report_path: Path, timeout: float = 60.0) -> None:
    """Wait until bank2 has received from the broker once.

    A consumer group that does not exist yet may start at the end of the topic's
    queues, so a transfer sent before bank2's first receive could be missed.
    """
    deadline = time.monotonic() + timeout
    while True:
        child.check_running()
        report = read_report(report_path)
        if report is not None and report.ready:
            return
        if time.monotonic() >= deadline:
            raise ServiceFailed(f"{child.name} did not receive from the broker within "
                                f"{timeout:.0f} s; see {child.log_path}")
        time.sleep(0.1)


def wait_settled_rocketmq(bank1: Engine, bank2: Engine, report_path: Path,
                          children: list[Child], timeout: float,
                          duplicate_dropped: bool = False) -> bool:
    """Wait until both outboxes are drained, every committed transfer is credited or
    sent back and refunded, and bank2 has seen the duplicate delivery (unless the
    broker dropped it already)."""
    started = time.monotonic()
    last_report = float("-inf")
    while True:
        for child in children:
            child.check_running()
        outbox_pending, committed, credited = progress(bank1, bank2)
        report = read_report(report_path)
        duplicates = (report.duplicates if report is not None else 0) + duplicate_dropped
        elapsed = time.monotonic() - started
        if outbox_pending == 0 and credited >= committed and duplicates >= 1:
            say(f"settled after {elapsed:.1f} s")
            return True
        if elapsed - last_report >= 1.0:
            last_report = elapsed
            say(f"  waiting: {outbox_pending} in the outboxes, {credited} of {committed} "
                f"transfers credited or refunded, duplicate "
                f"{'seen' if duplicates else 'not yet seen'} ({elapsed:.0f} s)")
        if elapsed >= timeout:
            say(f"did not settle within {timeout:.0f} s")
            return False
        time.sleep(0.1)


def wait_settled(bank1: Engine, bank2: Engine, transport: SqlTransport,
                 children: list[Child], timeout: float) -> bool:
    """Wait until both outboxes are drained and every message is settled (bank2's
    transfers, bank1's refunds)."""
    started = time.monotonic()
    last_report = float("-inf")
    while True:
        for child in children:
            child.check_running()
        outbox_pending, unconsumed = backlog(bank1, bank2, transport)
        elapsed = time.monotonic() - started
        if outbox_pending == 0 and unconsumed == 0:
            say(f"settled after {elapsed:.1f} s")
            return True
        if elapsed - last_report >= 1.0:
            last_report = elapsed
            say(f"  waiting: {outbox_pending} in the outboxes, "
                f"{unconsumed} not yet consumed ({elapsed:.0f} s)")
        if elapsed >= timeout:
            say(f"did not settle within {timeout:.0f} s")
            return False
        time.sleep(0.1)


def print_balances(books: Books, before: tuple[Decimal, Decimal]) -> None:
    rows = [("bank1", "1", "Zhang San", before[0], books.balance1),
            ("bank2", "2+3", "Li Si, Wang Wu", before[1], books.balance2 + books.balance3),
            ("total", "", "", sum(before, Decimal("0.00")), books.total)]
    say(f"{'bank':<6} {'account':<8} {'holder':<15} {'before':>10} {'after':>10}")
    for bank, account, holder, was, now in rows:
        say(f"{bank:<6} {account:<8} {holder:<15} {was:>10.2f} {now:>10.2f}")
    say(f"bank1 refunded {len(books.refunds)} transfer(s) that bank2 sent back "
        f"(frozen account): {', '.join(sorted(books.refunds)) or '-'}")


def print_consumer(report: ConsumerReport) -> None:
    say(f"bank2's consumer: {report.processed} processed, {report.duplicates} duplicate(s) "
        f"ignored, {report.dead_lettered} dead-lettered; {report.other_runs_ignored} "
        "message(s) of other runs acknowledged unprocessed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bank_transfer.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path(".demo"),
                        help="run folder, wiped at start (default: .demo)")
    parser.add_argument("--bank1-db", help="bank1's database URL (default: run folder/bank1.db)")
    parser.add_argument("--bank2-db", help="bank2's database URL (default: run folder/bank2.db)")
    parser.add_argument("--transport", choices=TRANSPORTS, default=SQL,
                        help="sql (default): the embedded SQL transport; rocketmq: a RocketMQ "
                             "broker; broker: any broker by --broker URL")
    parser.add_argument("--transport-db", help="SQL transport URL (default: run folder/broker.db)")
    parser.add_argument("--rocketmq-endpoints", default=DEFAULT_ENDPOINTS,
                        help=f"the RocketMQ gRPC proxy (default {DEFAULT_ENDPOINTS})")
    parser.add_argument("--rocketmq-namesrv", default=None,
                        help="a RocketMQ 4.x name server: the services reach its brokers over "
                             "the remoting protocol instead of the proxy")
    parser.add_argument("--broker", metavar="URL",
                        help="with --transport broker: the broker's URL (kafka://, amqp://, "
                             "redis://, nats://; see outbox.brokers)")
    parser.add_argument("--port", type=int, default=0, help="bank1's port (default: a free one)")
    parser.add_argument("--settle-timeout", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the services up after the run, for a look at bank1's API "
                             "and the metrics, until Ctrl-C")
    args = parser.parse_args(argv)
    if args.transport != SQL and args.transport_db:
        parser.error("--transport-db is for --transport sql")
    if (args.transport == BROKER) != bool(args.broker):
        parser.error("--transport broker goes with --broker URL, and --broker with it")
    return args


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same way out as Ctrl-C


def metrics_ports() -> dict[str, int]:
    """A free port for each service's Prometheus metrics."""
    return {name: free_port() for name in ("bank1", "relay", "bank2")}


def metrics_env(ports: dict[str, int], name: str) -> dict[str, str]:
    return {METRICS_PORT_VAR: str(ports[name])}


def say_metrics(ports: dict[str, int]) -> None:
    say("metrics (Prometheus text, while the services run): " + ", ".join(
        f"{name} http://127.0.0.1:{port}/metrics" for name, port in ports.items()))


def start_dashboard(children: list[Child], workdir: Path, urls: dict[str, str],
                    keep_running: bool) -> None:
    """``outbox dashboard`` over both banks' databases, for a look while the services
    run. Read-only, unless ``--keep-running``: then it takes writes from whoever signs in
    with the token in ``WORKDIR/dashboard-token`` (readable by this user only)."""
    port = free_port()
    env = {}
    where = "read-only"
    if keep_running:
        token_file = workdir / "dashboard-token"
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(18) + "\n")
        env[DASHBOARD_TOKEN_ENV] = token_file.read_text().strip()
        where = f"sign in with the token in {token_file} to replay or discard"
    child = start("dashboard", ["--port", str(port)], workdir,
                  {"--bank1-db": urls["bank1"], "--bank2-db": urls["bank2"]}, env)
    children.append(child)
    url = f"http://127.0.0.1:{port}/"
    wait_healthy(child, url)
    say(f"dashboard (while the services run): {url} ({where})")


def wait_until_interrupted(children: list[Child]) -> None:
    """``--keep-running``: leave the services up until Ctrl-C (or SIGTERM)."""
    say("--keep-running: the services stay up; press Ctrl-C to stop them")
    try:
        while True:
            for child in children:
                child.check_running()
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("stopping the services")


def run_services(urls: dict[str, str], workdir: Path, port: int, settle_timeout: float,
                 run: Run, keep_running: bool = False) -> None:
    """Set up, start the services, drive the transfers, wait, and read the books.

    The services are stopped on the way out whatever happens.
    """
    bank1, bank2 = create_engine(urls["bank1"]), create_engine(urls["bank2"])
    transport = SqlTransport(create_engine(urls["transport"]))
    children: list[Child] = []
    try:
        setup_transport(transport.engine, reset=True)
        setup(bank1, "bank1", reset=True)
        setup(bank2, "bank2", reset=True)
        run.before = balances(bank1, bank2)
        say(f"setup done: balance(1) = {run.before[0]}, balance(2) = {run.before[1]}")
        metrics = metrics_ports()
        for name, db in (("bank1", urls["bank1"]), ("relay", urls["bank1"]),
                         ("bank2", urls["bank2"])):
            args = ["--port", str(port)] if name == "bank1" else []
            children.append(start(name, args, workdir,
                                  {"--db": db, "--transport-db": urls["transport"]},
                                  metrics_env(metrics, name)))
        base = f"http://127.0.0.1:{port}"
        wait_healthy(children[0], f"{base}/health")
        say(f"services started: bank1 on {base}, relay, bank2")
        say_metrics(metrics)
        start_dashboard(children, workdir, urls, keep_running)
        with httpx.Client(base_url=base, timeout=30.0) as client:
            send_transfers(client, run)
        publish_again(bank1, transport)
        run.settled = wait_settled(bank1, bank2, transport, children, settle_timeout)
        run.books = read_books(bank1, bank2, transport)
        print_balances(run.books, run.before)
        if keep_running:
            wait_until_interrupted(children)
    finally:
        for line in stop_all(children):
            say(line)
        for engine in (bank1, bank2, transport.engine):
            engine.dispose()


def check_proxy(broker: Broker) -> None:
    """Fail with what to do when nothing listens at the broker's (first) address."""
    if broker.url:
        address = broker.url.partition("://")[2].rpartition("@")[2]
        address = address.split("/")[0].split("?")[0].split(",")[0]
        how = "start it (scripts/kafka, scripts/rabbitmq, scripts/nats up, or " \
              "scripts/services up redis)"
    else:
        address = (broker.namesrv or broker.endpoints).split(";")[0]
        how = "start one with scripts/rocketmq up (5.x) or scripts/rocketmq4 up (4.x)"
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3.0).close()
    except (OSError, ValueError) as exc:
        raise ServiceFailed(f"no broker answers at {broker.where} ({exc}); {how}") from None


def run_services_rocketmq(urls: dict[str, str], workdir: Path, port: int,
                          settle_timeout: float, run: Run, broker: Broker,
                          keep_running: bool = False) -> None:
    """``run_services`` over RocketMQ: half messages from bank1, this run's consumer
    group for bank2, and bank2's report file instead of the SQL transport's tables."""
    bank1, bank2 = create_engine(urls["bank1"]), create_engine(urls["bank2"])
    report_path = workdir / REPORT_FILE
    transport_args = broker.args
    children: list[Child] = []
    try:
        check_proxy(broker)
        setup(bank1, "bank1", reset=True)
        setup(bank2, "bank2", reset=True)
        run.before = balances(bank1, bank2)
        say(f"setup done: balance(1) = {run.before[0]}, balance(2) = {run.before[1]}")
        metrics = metrics_ports()
        children.append(start("bank1", [
            "--port", str(port), *transport_args, "--run-id", broker.run_id,
            "--refund-group", broker.refund_group], workdir, {"--db": urls["bank1"]},
            metrics_env(metrics, "bank1")))
        children.append(start("relay", transport_args, workdir, {"--db": urls["bank1"]},
                              metrics_env(metrics, "relay")))
        children.append(start("bank2", [
            *transport_args, "--group", broker.group, "--run-id", broker.run_id,
            "--report", str(report_path)], workdir, {"--db": urls["bank2"]},
            metrics_env(metrics, "bank2")))
        base = f"http://127.0.0.1:{port}"
        wait_healthy(children[0], f"{base}/health")
        wait_consumer_ready(children[2], report_path)
        say(f"services started: bank1 on {base}, relay, bank2 (consumer group {broker.group})")
        say_metrics(metrics)
        start_dashboard(children, workdir, urls, keep_running)
        with httpx.Client(base_url=base, timeout=30.0) as client:
            send_transfers(client, run, broker.transfer_no)
        dropped = publish_again_rocketmq(bank1, broker)
        run.settled = wait_settled_rocketmq(bank1, bank2, report_path, children, settle_timeout,
                                            duplicate_dropped=dropped)
        report = read_report(report_path)
        if report is None:
            raise ServiceFailed(f"bank2 wrote no report to {report_path}")
        run.books = read_books(bank1, bank2, None, report)
        if dropped:  # ignored too: by the broker, before bank2's inbox
            run.books = replace(run.books,
                                duplicates_ignored=run.books.duplicates_ignored + 1)
        print_balances(run.books, run.before)
        print_consumer(report)
        if keep_running:
            wait_until_interrupted(children)
    finally:
        for line in stop_all(children):
            say(line)
        for engine in (bank1, bank2):
            engine.dispose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    workdir = prepare_workdir(args.workdir)
    urls = {name: getattr(args, f"{name}_db") or f"sqlite:///{workdir / (name + '.db')}"
            for name in ("bank1", "bank2")}
    if args.transport == SQL:
        urls["transport"] = args.transport_db or f"sqlite:///{workdir / 'broker.db'}"
    if make_url(urls["bank1"]) == make_url(urls["bank2"]):
        raise SystemExit("bank1 and bank2 need databases of their own")
    say(f"run folder: {workdir}")
    for name, url in urls.items():
        say(f"{name + ' database:':<20}{safe_url(url)}")
    broker = (Broker(args.rocketmq_endpoints, args.rocketmq_namesrv, args.broker)
              if args.transport != SQL else None)
    if broker is not None:
        kind = f"{scheme_of(broker.url)}:// broker" if broker.url else "RocketMQ"
        say(f"transport:          {kind} at {broker.where}, topic {TOPIC}, "
            f"consumer group {broker.group}")
        say(f"run id:             {broker.run_id} (transfer numbers "
            f"{broker.transfer_no('TX-0001')} ...)")
        # The RocketMQ client writes its own log to ~/logs/rocketmq_python: keep that
        # (the demo's and its services') in the run folder too.
        os.environ["HOME"] = str(workdir)
    say(f"service logs:       {workdir}/bank1.log, relay.log, bank2.log")
    # SIGINT too: a background job of a script starts with SIGINT ignored, and Python
    # then leaves it ignored; --keep-running must stop on Ctrl-C all the same.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    run = Run()
    port = args.port or free_port()
    try:
        if broker is not None:
            run_services_rocketmq(urls, workdir, port, args.settle_timeout, run, broker,
                                  args.keep_running)
        else:
            run_services(urls, workdir, port, args.settle_timeout, run, args.keep_running)
    except ServiceFailed as exc:
        say(f"error: {exc}")
        return 1
    except (httpx.HTTPError, SQLAlchemyError, OutboxError) as exc:
        # Only the first line: later ones may quote SQL parameters.
        say(f"error: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    books, before = run.books, run.before
    if books is None or before is None:  # run_services reads both or raises
        return 1
    # "conserved" is about the money and the credits; an unexpected HTTP answer
    # still fails the run, through the exit code.
    broken = find_problems(books, before, run.refused)
    if not run.settled:
        broken.insert(0, f"did not settle within {args.settle_timeout:.0f} s")
    for problem in [*run.problems, *broken]:
        say(f"problem: {problem}")
    say(f"finished in {time.monotonic() - began:.1f} s")
    say(f"{'SETTLED' if run.settled else 'NOT SETTLED'} transfers={run.attempted} "
        f"committed={len(books.transfers)} rolled_back={len(run.refused)} "
        f"credited={len(books.credits)} refunded={len(books.refunds)} "
        f"duplicates_ignored={books.duplicates_ignored} "
        f"total_before={sum(before, Decimal('0.00')):.2f} total_after={books.total:.2f} "
        f"conserved={'no' if broken else 'yes'}")
    return 1 if broken or run.problems else 0


if __name__ == "__main__":
    sys.exit(main())
