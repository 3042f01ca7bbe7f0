"""One scenario on one database with one adapter: set up, load with faults, settle, audit."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import Engine

from outbox import SqlTransport, create_engine
from outbox_rocketmq import RocketMQConfig

from .. import REFUND_GROUP
from ..bank2 import read_report
from ..children import free_port
from ..runs import run_transfer_no
from ..setup import setup, setup_transport
from ..transports import rocketmq_config
from . import hostile
from .driver import Outcome, drive, plan
from .matrix import (
    BROKER_OUTAGE,
    BROKER_SCRIPTS,
    DB_RESTART,
    HALF_MESSAGES,
    URL_ADAPTERS,
    Placement,
    Scenario,
    broker,
)
from .supervisor import Service, Supervisor
from .verify import Verdict, audit, in_flight

REPO = Path(__file__).resolve().parents[3]
#: bank1's local-transaction timeout in chaos runs: short, so that an orphan half
#: message of a transfer that never committed is rolled back by the check-back
#: within the settle time rather than after the default minute.
LOCAL_TX_TIMEOUT = 10.0


@dataclass
class Settings:
    transfers: int
    threads: int
    settle_timeout: float
    load_timeout: float
    outage_seconds: float
    endpoints: str  # the RocketMQ 5 gRPC proxy
    namesrv: str  # the RocketMQ 4.9 name server
    urls: dict[str, str] = field(default_factory=dict)  # adapter -> URL (URL_ADAPTERS)

    def url(self, adapter: str) -> str:
        if adapter not in self.urls:
            raise RuntimeError(f"no URL for the {adapter} broker: set "
                               f"{URL_ADAPTERS[adapter]} (scripts/{broker(adapter)} env)")
        return self.urls[adapter]

    def broker_args(self, adapter: str) -> list[str]:
        """The services' options to reach the broker of ``adapter``."""
        if adapter in URL_ADAPTERS:
            return ["--transport", "broker", "--broker", self.url(adapter)]
        args = ["--transport", "rocketmq", "--rocketmq-endpoints", self.endpoints]
        if broker(adapter) == "rocketmq4":
            args += ["--rocketmq-namesrv", self.namesrv]
        return args

    def broker_config(self, adapter: str) -> RocketMQConfig:
        """The adapter's configuration for the broker of ``adapter``, as the services'."""
        return rocketmq_config(self.endpoints,
                               self.namesrv if broker(adapter) == "rocketmq4" else None)


@dataclass
class Row:
    scenario: str
    database: str
    adapter: str
    transfers: int = 0
    faults: int = 0
    verdict: Verdict = field(default_factory=Verdict)
    settle_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the scenario does not apply


def run_script(*args: str) -> None:
    """scripts/services, scripts/rocketmq or scripts/rocketmq4, failing loudly."""
    done = subprocess.run([str(REPO / "scripts" / args[0]), *args[1:]], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/{' '.join(args)} failed: {done.stderr.strip()[-300:]}")


class Disruption:
    """Stop the broker or a database server; ``restore`` always starts it again."""

    def __init__(self, kind: str, target: str) -> None:
        # target: rocketmq (5.x), rocketmq4 (4.9), kafka, redis, postgres or mariadb
        self.kind, self.target = kind, target
        self.stopped = False
        self.took: dict[str, float] = {}  # "down"/"up" -> seconds the script took

    def _run(self, action: str) -> None:
        began = time.monotonic()
        if self.broker:
            # 4.9: name server and broker, the store (topics, offsets, messages) kept.
            run_script(self.target, action)
        else:
            run_script("services", action, self.target)
        self.took[action] = time.monotonic() - began

    @property
    def note(self) -> str:
        return f"{self.target} " + ", ".join(f"{a} {s:.1f}s" for a, s in self.took.items())

    @property
    def broker(self) -> bool:
        return self.target in BROKER_SCRIPTS

    def stop(self) -> None:
        self.stopped = True
        self._run("down")

    def restore(self) -> None:
        if not self.stopped:
            return
        self._run("up")
        self.stopped = False


def _services(scenario: Scenario, adapter: str, placement: Placement, port: int,
              settings: Settings, group: str, run_id: str, report: Path) -> list[Service]:
    urls = placement.urls
    rmq = settings.broker_args(adapter)
    bank1_args = ["--port", str(port), "--local-transaction-timeout", str(LOCAL_TX_TIMEOUT)]
    relay_args = ["--max-attempts", "100000", "--max-backoff", "1"]
    # Enough attempts that a random handler failure never dead-letters a real
    # transfer (0.3 ** 12 per message), under RocketMQ's own limit of 16 deliveries.
    bank2_args = ["--max-attempts", "12", "--max-backoff", "0.5",
                  "--relay-max-attempts", "100000"]  # bank2's refunds: never dead on an outage
    if adapter == "sql":
        transport_urls = {"--transport-db": urls["transport"]}
        bank2_args += ["--redelivery-seconds", "5"]
    else:
        transport_urls = {}
        bank1_args += rmq + (["--outbox-only"] if adapter not in HALF_MESSAGES else [])
        # bank1's refunds: a consumer group of this run's own, this run's refunds only.
        bank1_args += ["--run-id", run_id, "--refund-group", f"{REFUND_GROUP}-{run_id}"]
        relay_args += rmq
        bank2_args += [*rmq, "--group", group, "--run-id", run_id, "--report", str(report),
                       "--redelivery-seconds", "10"]
    services = [Service("bank1", "bank_transfer.bank1", bank1_args,
                        {"--db": urls["bank1"], **transport_urls}, scenario.bank1_points(adapter))]
    for i in range(scenario.relays):
        services.append(Service(f"relay{i + 1}", "bank_transfer.relay", relay_args,
                                {"--db": urls["bank1"], **transport_urls}, dict(scenario.relay)))
    services.append(Service("bank2", "bank_transfer.bank2", bank2_args,
                            {"--db": urls["bank2"], **transport_urls}, dict(scenario.bank2)))
    return services


def _wait_ready(supervisor: Supervisor, base: str, report: Path | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            try:
                healthy = client.get(f"{base}/health").status_code == 200
            except httpx.HTTPError:
                healthy = False
            consumer = report is None or ((r := read_report(report)) is not None and r.ready)
            if healthy and consumer:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"services not ready within {timeout:.0f} s; see "
                                   f"{supervisor.folder}/*.log")
            time.sleep(0.1)


def run_scenario(row: Row, scenario: Scenario, placement: Placement, folder: Path, seed: int,
                 settings: Settings, group: str, run_id: str,
                 dlq: hostile.DeadLetters | None) -> None:
    """Run it and fill in ``row``. Services and disruptions are undone on the way out."""
    rng = random.Random(seed)
    bank1, bank2 = create_engine(placement.urls["bank1"]), create_engine(placement.urls["bank2"])
    transport = (SqlTransport(create_engine(placement.urls["transport"]))
                 if row.adapter == "sql" else None)
    report = folder / "bank2-report.json"
    disruption: Disruption | None = None
    if scenario.disruption == BROKER_OUTAGE:
        target = placement.transport_server or broker(row.adapter)
        assert target is not None  # the SQL adapter's transport is always on a server here
        disruption = Disruption(BROKER_OUTAGE, target)
    elif scenario.disruption == DB_RESTART:
        disruption = Disruption(DB_RESTART, row.database)
    supervisor: Supervisor | None = None
    try:
        setup(bank1, "bank1", reset=True)
        setup(bank2, "bank2", reset=True)
        if transport is not None:
            setup_transport(transport.engine, reset=True)
        port = free_port()
        supervisor = Supervisor(_services(scenario, row.adapter, placement, port,
                                          settings, group, run_id, report),
                                folder, rng.randrange(2**31)).start()
        base = f"http://127.0.0.1:{port}"
        _wait_ready(supervisor, base, None if transport else report, 90.0)
        prefix = run_transfer_no(run_id, "T")
        load = plan(prefix, settings.transfers, rng)
        outcome = Outcome()
        # Somewhere in the first half of the load the fault starts; the rest of the
        # load waits for it, so that transfers keep coming while the broker or the
        # database is away.
        mark, gate = int(len(load) * rng.uniform(0.1, 0.5)), threading.Event()
        driver = threading.Thread(target=drive, name="load", args=(base, load, outcome),
                                  kwargs={"threads": settings.threads, "gate_at": mark,
                                          "gate": gate, "timeout": settings.load_timeout})
        driver.start()
        cases = hostile.cases(run_id) if scenario.hostile else []
        if transport is None:
            cases = [c for c in cases if c.name not in hostile.NOT_ON_ROCKETMQ]
        refused: dict[str, str] = {}
        extra_faults = 0
        try:
            while driver.is_alive() and outcome.answered() < mark:
                time.sleep(0.02)
            if cases:
                if transport is not None:
                    refused = hostile.put_sql(transport, cases, run_id)
                elif row.adapter in URL_ADAPTERS:
                    refused = hostile.put_native(settings.url(row.adapter), cases, run_id)
                else:
                    refused = hostile.put_rocketmq(settings.broker_config(row.adapter),
                                                   cases, run_id)
                extra_faults += len(cases)
            if disruption is not None:
                disruption.stop()
                extra_faults += 1
            gate.set()
            if disruption is not None:
                time.sleep(settings.outage_seconds)
                disruption.restore()
        finally:
            gate.set()
            if disruption is not None:
                disruption.restore()
            driver.join()
        supervisor.quiet()
        for case, why in refused.items():
            row.notes.append(f"{case} refused at the door ({why.split(':')[0]})")
        if outcome.undecided:
            row.notes.append(f"{len(outcome.undecided)} transfers without an answer")
        row.notes.extend(outcome.problems[:3])
        expected = {c.name: c.reason for c in cases}
        dead = _settle(row, bank1, bank2, transport, settings, cases, expected, refused,
                       group, run_id, dlq, kills_bank1=supervisor.services["bank1"].kills)
        row.transfers = len(load)
        row.verdict = audit(bank1, bank2, transport, outcome, expected, dead, refused)
        row.faults = sum(supervisor.faults().values()) + extra_faults
        row.notes.extend(f"{p}x{n}" for p, n in sorted(supervisor.faults().items()))
    finally:
        if disruption is not None:
            disruption.restore()
            if disruption.took:
                row.notes.append(disruption.note)
        if supervisor is not None:
            row.notes.extend(supervisor.stop())
        for engine in (bank1, bank2, *([transport.engine] if transport else [])):
            engine.dispose()


def _settle(row: Row, bank1: Engine, bank2: Engine, transport: SqlTransport | None,
            settings: Settings, cases: list[hostile.Case], expected: dict[str, str],
            refused: dict[str, str], group: str, run_id: str,
            dlq: hostile.DeadLetters | None, kills_bank1: int) -> dict[str, str]:
    """Wait (bounded) until nothing is in flight; returns the hostile cases' reasons."""
    began = time.monotonic()
    # An orphan half message of a transfer that never committed resolves only after
    # bank1's local-transaction timeout: give it that long before calling it settled.
    quiet_until = began + (LOCAL_TX_TIMEOUT + 5
                           if kills_bank1 and row.adapter in HALF_MESSAGES else 0)
    dead: dict[str, str] = {}
    while True:
        try:
            pending, unsettled, uncredited = in_flight(bank1, bank2, transport)
            if transport is not None:
                dead = hostile.sql_dead_letters(transport, "bank2", cases)
            elif dlq is not None and cases:
                dlq.poll()
                dead = dlq.reasons(run_id, group)
            missing = [c for c in expected if c not in dead and c not in refused]
            if not (pending or unsettled or uncredited or missing) \
                    and time.monotonic() >= quiet_until:
                row.settle_seconds = time.monotonic() - began
                return dead
        except Exception as exc:  # a database just restarted: look again
            note = f"settle check failed: {type(exc).__name__}"
            if note not in row.notes:
                row.notes.append(note)
        if time.monotonic() - began >= settings.settle_timeout:
            return dead
        time.sleep(0.25)
