"""One relay process for many databases: a RelayGroup serves every database fairly
(a big backlog in one never holds up the others), publishes every row of every
database exactly once, goes on when one database fails, and ``outbox relay`` takes
several ``--db``."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, make_url, select, text
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

import outbox
from outbox import ConfigurationError, Message, RelayConfig, RelayGroup
from outbox.aio import create_async_engine
from outbox.cli import main
from outbox.db import safe_url
from outbox.relay_group import database_key, refuse_duplicates
from outbox.schema import PENDING, SENT
from outbox.sql_transport import SqlTransport
from outbox.sql_transport import messages as transport_messages
from outbox.storage import counts, insert_message

from .helpers import RecordingPublisher, capture_events, wait_until

BATCH = 100
BIG = 5000
SMALL = 10
PG_TENANTS = 4

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


# -- databases -------------------------------------------------------------------


def _admin(url: URL) -> Engine:
    return sa_create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool,
                            connect_args={"connect_timeout": 5})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def pg_tenant_urls(postgres_url: URL) -> Iterator[list[str]]:
    """PostgreSQL databases of their own for this session's groups (the session's
    private database is one; a group needs several), dropped at the end."""
    admin = _admin(postgres_url)
    prefix = "outbox_test_rg_"
    names = [f"{prefix}{os.getpid()}_{i}" for i in range(PG_TENANTS)]
    try:
        with admin.connect() as conn:
            existing = [r[0] for r in conn.execute(text("SELECT datname FROM pg_database"))]
            for name in existing:  # leftovers of killed runs on this machine
                m = re.fullmatch(re.escape(prefix) + r"(\d+)_\d+", name)
                if m and not _pid_alive(int(m.group(1))):
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        admin.dispose()
        pytest.fail(f"cannot create the tenant databases: {type(exc).__name__}: {exc}")
    try:
        yield [postgres_url.set(database=n).render_as_string(hide_password=False)
               for n in names]
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def reset(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL lock_timeout = '10s'"))
        outbox.metadata.drop_all(conn)
        outbox.metadata.create_all(conn)


Tenants = Callable[[int], list[Engine]]


@pytest.fixture(params=BACKENDS)
def tenants(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tenants]:
    """``tenants(n)``: ``n`` databases with clean outbox tables, SQLite files or
    PostgreSQL databases."""
    if request.param == "sqlite":
        urls = [f"sqlite:///{tmp_path / f'tenant{i}.db'}" for i in range(PG_TENANTS)]
    else:
        urls = request.getfixturevalue("pg_tenant_urls")
    made: list[Engine] = []

    def make(n: int) -> list[Engine]:
        assert n <= len(urls)
        engines = [outbox.create_engine(u) for u in urls[:n]]
        for e in engines:
            reset(e)
        made.extend(engines)
        return engines

    yield make
    for e in made:
        e.dispose()


def fill(engine: Engine, prefix: str, n: int, start: int = 0) -> list[str]:
    """Commit ``n`` pending rows (ids ``prefix-00000``...) in one transaction."""
    ids = [f"{prefix}-{i:05d}" for i in range(start, start + n)]
    rows = [insert_message(Message(topic="t", id=i, payload=b"{}"))[1] for i in ids]
    statement = insert_message(Message(topic="t", id="x", payload=b"{}"))[0]
    with engine.begin() as conn:
        conn.execute(statement, rows)
    return ids


def status(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return counts(conn)


def all_sent(*engines: Engine) -> Callable[[], bool]:
    return lambda: all(status(e)[PENDING] == 0 for e in engines)


class HookPublisher(RecordingPublisher):
    """Runs a hook right after the message of that id is published."""

    def __init__(self, hooks: dict[str, Callable[[], None]]) -> None:
        super().__init__()
        self.hooks = hooks

    def publish(self, message: Message) -> None:
        super().publish(message)
        hook = self.hooks.pop(message.id, None)
        if hook is not None:
            hook()


@pytest.fixture
def running() -> Iterator[Callable[[RelayGroup], RelayGroup]]:
    """Start a group now, stop it at the end of the test whatever happens."""
    started: list[RelayGroup] = []

    def start(group: RelayGroup) -> RelayGroup:
        started.append(group.start())
        return group

    yield start
    for group in started:
        group.stop()


# -- fairness --------------------------------------------------------------------


def test_a_big_backlog_does_not_starve_the_small_databases(
    tenants: Tenants, running: Callable[[RelayGroup], RelayGroup]
) -> None:
    big, *small = tenants(4)
    big_ids = fill(big, "big", BIG)
    small_ids = [fill(e, f"s{n}", SMALL) for n, e in enumerate(small)]
    publisher = RecordingPublisher()
    # The big one first: the worst case for the small ones.
    running(RelayGroup([big, *small], publisher, RelayConfig(batch_size=BATCH)))
    assert wait_until(all_sent(big, *small), timeout=120)

    order = publisher.ids()
    everything = big_ids + [i for ids in small_ids for i in ids]
    assert sorted(order) == sorted(everything)  # every row once, nothing else
    assert publisher.counts().most_common(1)[0][1] == 1
    last_small = max(order.index(i) for ids in small_ids for i in ids)
    big_before = sum(1 for i in order[:last_small] if i.startswith("big-"))
    # Round-robin: the big database had one turn (one batch) before every row of
    # every small one was out, not 50.
    assert big_before <= BATCH
    assert [i for i in order if i.startswith("big-")] == big_ids  # in order
    assert [status(e)[SENT] for e in (big, *small)] == [BIG] + [SMALL] * len(small)


def test_an_idle_database_waits_for_its_nudge_then_gets_the_next_turn(
    tenants: Tenants, running: Callable[[RelayGroup], RelayGroup]
) -> None:
    nudged, big, forgotten = tenants(3)
    fill(big, "big", 1000)
    late: list[str] = []

    def commit_elsewhere() -> None:  # while the big database's 3rd batch is published
        late.extend(fill(nudged, "late", SMALL))
        fill(forgotten, "forgotten", SMALL)
        group.relays[0].wakeup.set()  # what Outbox.subscribe_commits does; not for the last

    publisher = HookPublisher({"big-00250": commit_elsewhere})
    group = RelayGroup([nudged, big, forgotten], publisher,
                       RelayConfig(batch_size=BATCH, poll_interval=3600, listen=False))
    running(group)
    assert wait_until(all_sent(nudged, big), timeout=60)

    order = publisher.ids()
    last_late = max(order.index(i) for i in late)
    big_before = sum(1 for i in order[:last_late] if i.startswith("big-"))
    assert big_before <= 4 * BATCH  # the round after the nudge, not after the backlog
    # Idle and never nudged: skipped until its poll interval (an hour) is up.
    assert status(forgotten)[PENDING] == SMALL
    assert not any(i.startswith("forgotten-") for i in order)
    group.relays[2].wakeup.set()
    assert wait_until(all_sent(forgotten), timeout=60)
    assert sorted(publisher.ids()) == sorted(set(publisher.ids()))


@pytest.mark.postgres
def test_a_notify_wakes_an_idle_postgres_database(
    pg_tenant_urls: list[str], running: Callable[[RelayGroup], RelayGroup]
) -> None:
    engines = [outbox.create_engine(u) for u in pg_tenant_urls[:3]]
    group: RelayGroup | None = None
    try:
        for e in engines:
            reset(e)
        publisher = RecordingPublisher()
        group = running(RelayGroup(engines, publisher, RelayConfig(poll_interval=3600)))
        def listening(engine: Engine) -> bool:
            with engine.connect() as conn:
                return bool(conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query LIKE 'LISTEN %'")).scalar_one())

        assert wait_until(lambda: all(listening(e) for e in engines), timeout=30)
        listeners = [t for t in threading.enumerate()
                     if re.fullmatch(r"outbox-relay-listen-\d+", t.name)]
        assert len(listeners) == len(engines)  # one LISTEN thread per database, no more
        ids = fill(engines[1], "woken", SMALL)  # its commit sends the NOTIFY
        assert wait_until(lambda: sorted(publisher.ids()) == ids, timeout=30)
        # the count goes up once the batch is marked sent, a moment after the publish
        assert wait_until(lambda: group.published()[group.names[1]] == SMALL, timeout=10)
        assert sum(group.published().values()) == SMALL
    finally:
        if group is not None:
            group.stop()  # its LISTEN connections closed before their engines go, pass or fail
        for e in engines:
            e.dispose()


# -- exactly once, failures ----------------------------------------------------------


def test_two_groups_on_the_same_databases_publish_every_row_once(
    tenants: Tenants, running: Callable[[RelayGroup], RelayGroup]
) -> None:
    engines = tenants(3)
    ids = [i for n, e in enumerate(engines) for i in fill(e, f"d{n}", 300)]
    publisher = RecordingPublisher()
    config = RelayConfig(batch_size=20, poll_interval=0.05)
    running(RelayGroup(engines, publisher, config))
    running(RelayGroup(list(reversed(engines)), publisher, config))
    assert wait_until(all_sent(*engines), timeout=120)
    assert sorted(publisher.ids()) == sorted(ids)


def test_a_failing_database_is_logged_and_retried_while_the_others_go_on(
    tenants: Tenants, running: Callable[[RelayGroup], RelayGroup]
) -> None:
    good1, bad, good2 = tenants(3)
    ids = fill(good1, "g1", 50) + fill(bad, "bad", 5) + fill(good2, "g2", 50)
    outbox.metadata.drop_all(bad)  # its rows (and tables) are gone
    publisher = RecordingPublisher()
    with capture_events() as events:
        group = running(RelayGroup([good1, bad, good2], publisher,
                                   RelayConfig(batch_size=10, poll_interval=0.05)))
        assert wait_until(all_sent(good1, good2), timeout=60)
        failed = [e for e in events if e["event"] == "relay_group_batch_failed"]
        assert failed
        assert {e["db"] for e in failed} == {safe_url(bad.url)}
        if bad.url.password:
            assert "***" in failed[0]["db"]
            assert f":{bad.url.password}@" not in failed[0]["db"]

        # Back (migrated again): retried after the poll interval.
        outbox.metadata.create_all(bad)
        back = fill(bad, "back", 5)
        assert wait_until(all_sent(bad), timeout=60)
    group.stop()
    expected = [i for i in ids if not i.startswith("bad-")] + back
    assert sorted(publisher.ids()) == sorted(expected)
    assert status(bad)[SENT] == 5


def test_drain_leaves_a_failing_database_out_and_drains_the_others(tmp_path: Path) -> None:
    engines = [outbox.create_engine(f"sqlite:///{tmp_path / f'd{i}.db'}") for i in range(3)]
    try:
        for e in engines:
            reset(e)
        ids = fill(engines[0], "a", 250) + fill(engines[2], "c", 30)
        fill(engines[1], "b", 5)
        outbox.metadata.drop_all(engines[1])
        publisher = RecordingPublisher()
        group = RelayGroup(engines, publisher, RelayConfig(batch_size=BATCH))
        with capture_events() as events:
            assert group.drain(timeout=60) == len(ids)
        assert sorted(publisher.ids()) == sorted(ids)
        assert [e["db"] for e in events if e["event"] == "relay_group_batch_failed"] == [
            safe_url(engines[1].url)]
        # The first round took one batch of "a", then all of "c", before the second of "a".
        assert publisher.ids()[BATCH:BATCH + 30] == [f"c-{i:05d}" for i in range(30)]
    finally:
        for e in engines:
            e.dispose()


def test_sent_rows_are_purged_a_bounded_batch_per_turn(
    tmp_path: Path, running: Callable[[RelayGroup], RelayGroup]
) -> None:
    engines = [outbox.create_engine(f"sqlite:///{tmp_path / f'p{i}.db'}") for i in range(2)]
    try:
        for e in engines:
            reset(e)
        ids = fill(engines[0], "a", 10) + fill(engines[1], "b", 4)
        publisher = RecordingPublisher()
        config = RelayConfig(poll_interval=0.05, retention=dt.timedelta(0), purge_interval=0.01,
                             purge_batch_size=3)
        with capture_events() as events:
            group = running(RelayGroup(engines, publisher, config))
            assert wait_until(lambda: all(sum(status(e).values()) == 0 for e in engines),
                              timeout=60)
            group.stop()  # the turn that deleted the last rows has logged
        assert sorted(publisher.ids()) == sorted(ids)
        purged = [e for e in events if e["event"] == "relay_purged"]
        assert {e["db"] for e in purged} == {safe_url(e.url) for e in engines}
        assert sum(e["count"] for e in purged) == len(ids)
    finally:
        for e in engines:
            e.dispose()


def test_counts_and_run_once_name_every_database(tmp_path: Path) -> None:
    engines = [outbox.create_engine(f"sqlite:///{tmp_path / f'n{i}.db'}") for i in range(2)]
    try:
        for e in engines:
            reset(e)
        fill(engines[0], "a", 3)
        group = RelayGroup(engines, RecordingPublisher())
        names = [safe_url(e.url) for e in engines]
        assert list(group.names) == names
        assert [c[PENDING] for c in group.counts().values()] == [3, 0]
        results = group.run_once()
        assert list(results) == names
        assert [r.published for r in results.values()] == [3, 0]
        assert group.published() == dict(zip(names, [3, 0], strict=True))
    finally:
        for e in engines:
            e.dispose()


# -- refusals ----------------------------------------------------------------------


def test_a_group_refuses_no_database_a_database_twice_and_async_engines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = RecordingPublisher()
    with pytest.raises(ConfigurationError, match="at least one engine"):
        RelayGroup([], publisher)
    a = outbox.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    monkeypatch.chdir(tmp_path)
    same_a = outbox.create_engine("sqlite:///a.db")  # the same file, relative
    aio = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    try:
        with pytest.raises(ConfigurationError, match="use Relay"):
            RelayGroup(a, publisher)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="is given twice; give each database once"):
            RelayGroup([a, a], publisher)
        with pytest.raises(ConfigurationError, match=r"given twice \(as sqlite:///.*a\.db and "
                                                     r"sqlite:///a\.db\)"):
            RelayGroup([a, same_a], publisher)
        with pytest.raises(ConfigurationError, match="AsyncEngine"):
            RelayGroup([a, aio], publisher)  # type: ignore[list-item]
    finally:
        a.dispose()
        same_a.dispose()


def test_the_same_server_database_is_recognised_whatever_the_spelling() -> None:
    secret = "S3cret-pw"
    a = f"postgresql+psycopg://app:{secret}@127.0.0.1:5432/tenant1"
    for other in (
        "postgresql://other:pw@localhost/tenant1",          # user, driver, default port
        "postgresql+psycopg://app:x@LOCALHOST:5432/tenant1?sslmode=require",
    ):
        assert database_key(a) == database_key(other)
        with pytest.raises(ConfigurationError, match="given twice") as caught:
            refuse_duplicates([a, other])
        assert secret not in str(caught.value)
    for different in (
        "postgresql+psycopg://app:x@127.0.0.1:5432/tenant2",
        "postgresql+psycopg://app:x@127.0.0.1:5433/tenant1",
        "postgresql+psycopg://app:x@db.example:5432/tenant1",
        "mysql+pymysql://app:x@127.0.0.1/tenant1",
    ):
        assert database_key(a) != database_key(different)
    refuse_duplicates([a, "sqlite:///a.db", "sqlite:///b.db"])
    with pytest.raises(ConfigurationError, match="not a database URL") as bad:
        refuse_duplicates([a, f"postgresql://u:{secret}@h:port/x"])
    assert secret not in str(bad.value)
    assert database_key(make_url("mariadb+pymysql://u@h/x")) == database_key("mysql://h:3306/x")


# -- the command -------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_runs_one_relay_for_several_databases(
    tenants: Tenants, tmp_path: Path
) -> None:
    engines = tenants(2)
    ids = fill(engines[0], "a", 120) + fill(engines[1], "b", 7)
    transport_url = f"sqlite:///{tmp_path / 'broker.db'}"
    argv = [sys.executable, "-m", "outbox.cli", "relay"]
    for e in engines:
        argv += ["--db", e.url.render_as_string(hide_password=False)]
    argv += ["--transport-db", transport_url, "--poll-interval", "0.1"]
    relay = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: relay.poll() is not None or all_sent(*engines)(), timeout=60)
        assert relay.poll() is None, relay.communicate()[0]
        # Rows committed while it runs are published too.
        later = fill(engines[1], "later", 3)
        assert wait_until(all_sent(*engines), timeout=60)
    finally:
        relay.send_signal(signal.SIGTERM)
        output, _ = relay.communicate(timeout=30)
    assert relay.returncode == 0, output
    assert "relay_started" in output
    for e in engines:
        assert safe_url(e.url) in output
        if e.url.password:
            assert f":{e.url.password}@" not in output
    transport = SqlTransport(outbox.create_engine(transport_url))
    try:
        with transport.engine.connect() as conn:
            published = [r[0] for r in conn.execute(select(transport_messages.c.message_id))]
    finally:
        transport.engine.dispose()
    assert sorted(published) == sorted(ids + later)


@pytest.fixture
def two_migrated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    urls = [f"sqlite:///{tmp_path / f'm{i}.db'}" for i in range(2)]
    for url in urls:
        assert run_cli(capsys, "migrate", "--db", url)[0] == 0
    return urls


def assert_one_line_error(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, (out, err)
    assert out == "" and "Traceback" not in err
    assert err.startswith("outbox: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("argv", [
    ["status"], ["dead"], ["replay", "--all"], ["purge", "--older-than-days", "1"],
    ["migrate"], ["downgrade", "--revision", "base"],
])
def test_other_commands_take_exactly_one_db(
    two_migrated: list[str], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    a, b = two_migrated
    code, out, err = run_cli(capsys, argv[0], "--db", a, "--db", b, *argv[1:])
    assert_one_line_error(code, out, err, "--db", "more than once", "only `outbox relay`",
                          f"outbox {argv[0]} --help")


def test_the_command_checks_every_database_before_it_starts(
    two_migrated: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = two_migrated
    transport = tmp_path / "broker.db"
    to = ["--transport-db", f"sqlite:///{transport}"]
    bare = tmp_path / "bare.db"
    bare.touch()
    code, out, err = run_cli(capsys, "relay", "--db", a, "--db", f"sqlite:///{bare}", *to)
    assert_one_line_error(code, out, err, "outbox tables are missing in",
                          f"sqlite:///{bare}", f"outbox migrate --db sqlite:///{bare}")
    missing = tmp_path / "typo.db"
    code, out, err = run_cli(capsys, "relay", "--db", a, "--db", f"sqlite:///{missing}", *to)
    assert_one_line_error(code, out, err, "does not exist", f"sqlite:///{missing}")
    assert not missing.exists()
    code, out, err = run_cli(capsys, "relay", "--db", a, "--db", b, "--db", a, *to)
    assert_one_line_error(code, out, err, "given twice", "give each database once")
    code, out, err = run_cli(capsys, "relay", "--db", a, "--db", "notaurl", *to)
    assert_one_line_error(code, out, err, "--db is not a database URL")
    assert not transport.exists()  # refused before anything was opened


@pytest.mark.postgres
def test_a_database_error_names_the_database_without_its_password(
    two_migrated: list[str], postgres_url: URL, tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "Wr0ng-S3cret"
    wrong = postgres_url.set(password=secret).render_as_string(hide_password=False)
    code, out, err = run_cli(capsys, "relay", "--db", two_migrated[0], "--db", wrong,
                             "--transport-db", f"sqlite:///{tmp_path / 'broker.db'}")
    assert code == 1, err
    assert err.startswith(f"outbox: database error (OperationalError) on {safe_url(wrong)}: ")
    assert secret not in out + err
