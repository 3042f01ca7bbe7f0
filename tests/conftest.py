"""Shared fixtures: one ``engine`` per database with clean tables for every test.

The database servers come from two environment variables (``scripts/services env``
prints them)::

    OUTBOX_TEST_POSTGRES_URL=postgresql+psycopg://outbox:outbox@127.0.0.1:54329/outbox_test
    OUTBOX_TEST_MARIADB_URL=mysql+pymysql://outbox:outbox@127.0.0.1:33069/outbox_test

A missing variable or an unreachable server skips the test on a laptop and fails it
when ``CI`` is set, so a broken CI service can never pass as "all skipped".

Each test session works in a private database created next to the configured one
(``<name>_pytest_<pid>``) and dropped at the end, so runs of other tiers or of other
people against the same server do not trample each other's tables. Without the
right to create databases the configured database itself is used.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from types import SimpleNamespace
from typing import NoReturn

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    make_url,
    text,
)
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

import outbox
from outbox.aio import create_async_engine
from outbox.sql_transport import transport_metadata

ENV_VARS = {"postgres": "OUTBOX_TEST_POSTGRES_URL", "mariadb": "OUTBOX_TEST_MARIADB_URL"}

#: Every engine-backed test runs once per database; server ones carry a marker.
BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
]

# Business tables of the tests themselves (money is Numeric, never float).
test_metadata = MetaData()
ledger = Table(
    "test_ledger",
    test_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account", String(50), nullable=False),
    Column("amount", Numeric(18, 2), nullable=False),
)
applied = Table(
    "test_applied",
    test_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False),
    Column("body", Text, nullable=False),
)

ALL_METADATA = (outbox.metadata, transport_metadata, test_metadata)


#: ``make test`` runs two lanes side by side (scripts/test-lanes, one pytest process
#: each, ``--lane``): the tests on the RocketMQ brokers (and what loads them: the bench's
#: half messages, the Java neighbours), one after another as they share the brokers'
#: topics and groups and one of them restarts the 5.x broker; and every other test.
#: Tests marked ``exclusive`` (they stop a shared server, or take both cores) run alone
#: afterwards.
ROCKETMQ_LANE_MARKS = ("rocketmq", "rocketmq4")
ROCKETMQ_LANE_FILES = ("rocketmq", "remoting", "java_interop")
LANES = ("rocketmq", "rest")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--lane", choices=LANES, default=None,
                     help="run only this lane's tests (make test runs both side by side)")


def lane_of(item: pytest.Item) -> str:
    path = item.nodeid.split("::")[0]
    if (any(item.get_closest_marker(m) for m in ROCKETMQ_LANE_MARKS)
            or any(part in path for part in ROCKETMQ_LANE_FILES)):
        return "rocketmq"
    return "rest"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lane = config.getoption("--lane")
    if lane is None:
        return
    kept = [item for item in items if lane_of(item) == lane]
    dropped = [item for item in items if lane_of(item) != lane]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def unavailable(reason: str) -> NoReturn:
    """Skip on a laptop, fail in CI: a missing service must not pass silently there."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def _admin_engine(url: URL) -> Engine:
    return sa_create_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )


def _quote(engine: Engine, name: str) -> str:
    return engine.dialect.identifier_preparer.quote(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_database(admin: Engine, backend: str, name: str) -> None:
    with admin.connect() as conn:
        force = " WITH (FORCE)" if backend == "postgres" else ""
        conn.execute(text(f"DROP DATABASE IF EXISTS {_quote(admin, name)}{force}"))


def _list_databases(admin: Engine, backend: str) -> list[str]:
    sql = "SELECT datname FROM pg_database" if backend == "postgres" else "SHOW DATABASES"
    with admin.connect() as conn:
        return [r[0] for r in conn.execute(text(sql))]


@contextlib.contextmanager
def _private_database(backend: str) -> Iterator[URL]:
    var = ENV_VARS[backend]
    raw = os.environ.get(var)
    if not raw:
        unavailable(f"{var} is not set; run `eval \"$(scripts/services env)\"`")
    base = make_url(raw)
    admin = _admin_engine(base)
    try:
        try:
            with admin.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            unavailable(f"{backend} at {outbox.db.safe_url(base)} is unreachable: "
                        f"{type(exc).__name__}; run `scripts/services up`")
        prefix = f"{base.database}_pytest_"
        # Leftovers of killed runs on this machine (the servers listen on loopback only).
        for name in _list_databases(admin, backend):
            m = re.fullmatch(re.escape(prefix) + r"(\d+)", name)
            if m and not _pid_alive(int(m.group(1))):
                _drop_database(admin, backend, name)
        name = f"{prefix}{os.getpid()}"
        try:
            _drop_database(admin, backend, name)
            with admin.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {_quote(admin, name)}"))
        except SQLAlchemyError:
            yield base  # no right to create databases: share the configured one
            return
        try:
            yield base.set(database=name)
        finally:
            _drop_database(admin, backend, name)
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[URL]:
    """URL of a private PostgreSQL database for this session (skip/fail if none)."""
    with _private_database("postgres") as url:
        yield url


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[URL]:
    """URL of a private MariaDB database for this session (skip/fail if none)."""
    with _private_database("mariadb") as url:
        yield url


def _listening(variable: str, what: str, how: str) -> str:
    """The address in ``variable`` once something accepts connections there; else a
    failure in CI (a skip elsewhere) saying ``how`` to start it."""
    import socket

    address = os.environ.get(variable)
    if not address:
        unavailable(f"{variable} is not set; {how}")
    host, _, port = address.split(";")[0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        unavailable(f"{what} {address} is not reachable ({exc}); {how}")
    return address


@pytest.fixture(scope="session")
def rocketmq_endpoints() -> str:
    """The RocketMQ proxy (``scripts/rocketmq up``), from OUTBOX_TEST_ROCKETMQ_ENDPOINTS."""
    return _listening("OUTBOX_TEST_ROCKETMQ_ENDPOINTS", "RocketMQ proxy",
                      "run scripts/rocketmq up")


@pytest.fixture(scope="session")
def rocketmq5_namesrv() -> str:
    """The name server of the RocketMQ 5 broker (``scripts/rocketmq up``), for what
    goes over the remoting protocol to a 5.x broker, from OUTBOX_TEST_ROCKETMQ_NAMESRV."""
    return _listening("OUTBOX_TEST_ROCKETMQ_NAMESRV", "RocketMQ 5 name server",
                      "run scripts/rocketmq up and set OUTBOX_TEST_ROCKETMQ_NAMESRV="
                      "127.0.0.1:9876")


@pytest.fixture(scope="session")
def rocketmq4_namesrv() -> str:
    """The RocketMQ 4.9 name server (``scripts/rocketmq4 up``), from
    OUTBOX_TEST_ROCKETMQ4_NAMESRV."""
    return _listening("OUTBOX_TEST_ROCKETMQ4_NAMESRV", "RocketMQ 4 name server",
                      'run scripts/rocketmq4 up and eval "$(scripts/rocketmq4 env)"')


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis test server (``scripts/services up redis``), from OUTBOX_TEST_REDIS_URL."""
    import socket

    url = os.environ.get("OUTBOX_TEST_REDIS_URL")
    if not url:
        unavailable("OUTBOX_TEST_REDIS_URL is not set; run scripts/services up redis")
    parsed = make_url(url)
    try:
        socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 6379),
                                 timeout=5).close()
    except OSError as exc:
        unavailable(f"Redis {parsed.host}:{parsed.port} is not reachable ({exc}); "
                    "run scripts/services up redis")
    return url


def _broker_url(variable: str, what: str, how: str) -> str:
    """The broker URL in ``variable`` once its host:port accepts connections; else a
    failure in CI (a skip elsewhere) saying ``how`` to start it."""
    import socket
    from urllib.parse import urlsplit

    url = os.environ.get(variable)
    if not url:
        unavailable(f"{variable} is not set; {how}")
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0),
                                 timeout=5).close()
    except OSError as exc:
        unavailable(f"{what} at {parts.hostname}:{parts.port} is not reachable ({exc}); {how}")
    return url


@pytest.fixture(scope="session")
def kafka_url() -> str:
    """The Kafka test broker (``scripts/kafka up``), from OUTBOX_TEST_KAFKA_URL."""
    return _broker_url("OUTBOX_TEST_KAFKA_URL", "Kafka",
                       'run scripts/kafka up and eval "$(scripts/kafka env)"')


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The RabbitMQ test server (``scripts/rabbitmq up``), from OUTBOX_TEST_RABBITMQ_URL."""
    return _broker_url("OUTBOX_TEST_RABBITMQ_URL", "RabbitMQ",
                       'run scripts/rabbitmq up and eval "$(scripts/rabbitmq env)"')


@pytest.fixture(scope="session")
def nats_url() -> str:
    """The NATS JetStream test server (``scripts/nats up``), from OUTBOX_TEST_NATS_URL."""
    return _broker_url("OUTBOX_TEST_NATS_URL", "NATS",
                       'run scripts/nats up and eval "$(scripts/nats env)"')


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's rule checker (Debian's prometheus package, which scripts/services
    installs; no Prometheus server is started)."""
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool is missing: scripts/services up installs it (Debian's "
                    "prometheus package), or apt-get install prometheus")
    return found


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's chromium and its chromium-driver (scripts/services installs both), for
    the browser tests; Selenium drives them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        unavailable("chromium and chromium-driver are missing: scripts/services up "
                    "installs them, or apt-get install chromium chromium-driver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        unavailable("selenium is missing: pip install -e '.[dev]'")
    return browser, driver


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which database a test runs on: sqlite, postgres or mariadb."""
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> str:
    """The test database's URL as text (with password), e.g. for a second process."""
    if backend == "sqlite":
        path = tmp_path_factory.mktemp("db") / "test.db"
        return f"sqlite:///{path}"
    url: URL = request.getfixturevalue(f"{backend}_url")
    return url.render_as_string(hide_password=False)


def reset_tables(engine: Engine) -> None:
    """Drop and create every table the tests use."""
    with engine.begin() as conn:
        # A connection leaked by a broken test must not hang the whole run.
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL lock_timeout = '10s'"))
        elif conn.dialect.name in ("mysql", "mariadb"):
            conn.execute(text("SET SESSION lock_wait_timeout = 10"))
        for md in reversed(ALL_METADATA):
            md.drop_all(conn)
        for md in ALL_METADATA:
            md.create_all(conn)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine (from ``outbox.create_engine``) on clean tables: the outbox tables,
    the SQL transport's tables and the tests' own business tables."""
    eng = outbox.create_engine(db_url)
    reset_tables(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def async_engine(engine: Engine, db_url: str) -> AsyncEngine:
    """An :class:`AsyncEngine` (asyncio driver) on the same clean database as ``engine``.

    Without a pool: each test runs its own event loop (``asyncio.run``), and pooled
    connections must not outlive the loop they were made in.
    """
    return create_async_engine(db_url, poolclass=NullPool)


@pytest.fixture
def tables() -> SimpleNamespace:
    """The tests' business tables: ``ledger`` (producer side), ``applied`` (consumer)."""
    return SimpleNamespace(ledger=ledger, applied=applied)
