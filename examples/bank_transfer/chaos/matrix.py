"""What a chaos run is made of: databases, adapters, scenarios, and where each lives."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import make_url, text
from sqlalchemy.engine import URL

from outbox import create_engine

DATABASES = ("sqlite", "postgres", "mariadb")
#: sql: local outbox + relay -> SQL transport; outbox-rocketmq: local outbox + relay ->
#: RocketMQ 5 (normal sends, through the gRPC proxy); rocketmq: half messages (outbox
#: fallback + relay) on RocketMQ 5; outbox-rocketmq4 and rocketmq4: the same two on a
#: RocketMQ 4.9 broker, over the remoting protocol (name server, no proxy).
#: kafka, redis, nats, rabbitmq: local outbox + relay -> that broker, reached by its URL
#: (--transport broker; the URL from OUTBOX_TEST_<BROKER>_URL, as the broker's script
#: prints it).
ADAPTERS = ("sql", "outbox-rocketmq", "rocketmq", "outbox-rocketmq4", "rocketmq4",
            "kafka", "redis", "nats", "rabbitmq")
#: The adapters reached by URL, and the variable that holds it.
URL_ADAPTERS = {"kafka": "OUTBOX_TEST_KAFKA_URL", "redis": "OUTBOX_TEST_REDIS_URL",
                "nats": "OUTBOX_TEST_NATS_URL", "rabbitmq": "OUTBOX_TEST_RABBITMQ_URL"}
#: The broker each adapter runs on, named as its script (scripts/rocketmq,
#: scripts/rocketmq4, scripts/kafka; Redis is scripts/services' redis), which also
#: stops and starts it for the outage.
BROKERS = {"outbox-rocketmq": "rocketmq", "rocketmq": "rocketmq",
           "outbox-rocketmq4": "rocketmq4", "rocketmq4": "rocketmq4",
           "kafka": "kafka", "redis": "redis", "nats": "nats",
           "rabbitmq": "rabbitmq"}
#: The brokers with a script of their own (the others are targets of scripts/services).
BROKER_SCRIPTS = ("rocketmq", "rocketmq4", "kafka", "nats", "rabbitmq")
#: The adapters sending transactional half messages.
HALF_MESSAGES = ("rocketmq", "rocketmq4")
SERVER_ENV = {"postgres": "OUTBOX_TEST_POSTGRES_URL", "mariadb": "OUTBOX_TEST_MARIADB_URL"}
#: The databases a chaos run owns on a server (never the demo's bank1 and bank2).
CHAOS_DATABASES = {"bank1": "chaos_bank1", "bank2": "chaos_bank2", "transport": "chaos_transport"}
#: The server that holds the SQL transport when the broker is to be stopped: another
#: one than the banks', so that "broker down" is not also "bank databases down".
OTHER_SERVER = {"sqlite": "postgres", "postgres": "mariadb", "mariadb": "postgres"}

#: Disruptions: stop something for a while in the middle of the load, start it again.
BROKER_OUTAGE, DB_RESTART = "broker", "database"


@dataclass(frozen=True)
class Scenario:
    """One fault scenario: crash points per service, relays, and a disruption."""

    name: str
    what: str
    bank1: dict[str, float] = field(default_factory=dict)
    relay: dict[str, float] = field(default_factory=dict)
    bank2: dict[str, float] = field(default_factory=dict)
    relays: int = 1
    disruption: str | None = None
    hostile: bool = False

    def bank1_points(self, adapter: str) -> dict[str, float]:
        """Half-message points apply to the half-message adapter only."""
        if adapter in HALF_MESSAGES:
            return dict(self.bank1)
        return {p: q for p, q in self.bank1.items() if p in ("before_commit", "after_commit")}


#: Probabilities per occurrence: small enough that each process lives through a
#: handful of transfers or batches, large enough that every point fires in a run.
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("bank1-kill", "SIGKILL bank1 around the half send, the local commit and "
             "the end-transaction call",
             bank1={"before_half_send": 0.04, "after_half_send": 0.06, "before_commit": 0.06,
                    "after_commit": 0.06, "before_end": 0.06, "after_end": 0.04}),
    Scenario("relay-kill", "SIGKILL the relay in the middle of a batch",
             relay={"relay_mid_batch": 0.2}),
    Scenario("two-relays", "two relays at once, both killed mid-batch now and then",
             relay={"relay_mid_batch": 0.1}, relays=2),
    Scenario("bank2-kill", "SIGKILL bank2 after its business commit, before the ack",
             bank2={"before_ack": 0.08}),
    Scenario("handler-fail", "bank2's handler fails at random (retried with backoff)",
             bank2={"handler_fail": 0.3}),
    Scenario("broker-outage", "the broker stopped for a while, then started again",
             disruption=BROKER_OUTAGE),
    Scenario("db-restart", "the database server restarted in the middle of the load",
             disruption=DB_RESTART),
    Scenario("hostile", "malformed and hostile messages put straight onto the topic",
             hostile=True),
)}


def broker(adapter: str) -> str | None:
    """rocketmq (5.x), rocketmq4 (4.9), kafka, redis, or None for the SQL transport."""
    return BROKERS.get(adapter)


def server_url(database: str) -> URL | None:
    raw = os.environ.get(SERVER_ENV[database])
    return make_url(raw) if raw else None


def ensure_databases(server: URL) -> None:
    """Create the chaos databases on ``server`` if they are missing."""
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for name in CHAOS_DATABASES.values():
                if admin.dialect.name == "postgresql":
                    if not conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                       {"n": name}):
                        conn.execute(text(f'CREATE DATABASE "{name}"'))
                else:
                    conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{name}`"))
    finally:
        admin.dispose()


@dataclass(frozen=True)
class Placement:
    """Where one scenario's banks and (SQL) transport live, and what to restart."""

    urls: dict[str, str]  # bank1, bank2, and transport for the sql adapter
    transport_server: str | None  # postgres/mariadb when the transport is on a server
    note: str = ""


def _on(server: URL, role: str) -> str:
    return server.set(database=CHAOS_DATABASES[role]).render_as_string(hide_password=False)


def place(database: str, adapter: str, scenario: Scenario, folder: Path,
          servers: dict[str, URL]) -> Placement | str:
    """The databases of one run, or the reason it does not apply."""
    if database != "sqlite" and database not in servers:
        return f"no {database} server (set {SERVER_ENV[database]})"
    if database == "sqlite":
        if scenario.disruption == DB_RESTART:
            return "SQLite is a file, there is no server to restart"
        urls = {role: f"sqlite:///{folder / (role + '.db')}" for role in ("bank1", "bank2")}
    else:
        urls = {role: _on(servers[database], role) for role in ("bank1", "bank2")}
    if adapter != "sql":
        return Placement(urls, None)
    transport_server = None if database == "sqlite" else database
    note = ""
    if scenario.disruption == BROKER_OUTAGE:
        transport_server = OTHER_SERVER[database]
        if transport_server not in servers:
            return f"the SQL transport's outage needs a {transport_server} server"
        note = f"transport on {transport_server}"
    if transport_server is None:
        urls["transport"] = f"sqlite:///{folder / 'broker.db'}"
    else:
        urls["transport"] = _on(servers[transport_server], "transport")
    return Placement(urls, transport_server, note)
