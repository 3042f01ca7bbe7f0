"""The ``outbox`` command: one-line errors that say what to do, exit status 2 for a
wrong command line, no file created by a read, no password shown, parked keys."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import Engine, make_url, update
from sqlalchemy.engine import URL

import outbox
from outbox import Message, Relay, RelayConfig, create_engine
from outbox.cli import main
from outbox.schema import DEAD, DISCARDED, PENDING, SENT, outbox_messages

from .helpers import RecordingPublisher, add_messages, outbox_row

SECRET = "Qry-S3cret-Pw"
ALWAYS = 10**9


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # only what this command prints, not what the test's setup did
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert err.startswith("outbox: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bank1.db'}"


@pytest.fixture
def migrated(sqlite_db: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert run(capsys, "migrate", "--db", sqlite_db)[0] == 0
    return sqlite_db


@pytest.mark.parametrize(("url", "words"), [
    ("notaurl", "does not parse"),
    ("postgresql://u:p@h:notaport/x", "port is not a number"),
    (f"postgresql://u:{SECRET}@h:notaport/x", "port is not a number"),
    (f"postgresql+nosuchdriver://u:{SECRET}@h/x?sslpassword={SECRET}&x=::", "no driver"),
])
@pytest.mark.parametrize("command", ["status", "migrate"])
def test_a_malformed_url_is_one_line_that_says_what_to_give(
    capsys: pytest.CaptureFixture[str], command: str, url: str, words: str
) -> None:
    code, out, err = run(capsys, command, "--db", url)
    assert_one_line_error(code, out, err, words)
    assert SECRET not in out + err


def test_a_malformed_transport_url_is_named(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "relay", "--db", migrated, "--transport-db", "h:x/y")
    assert_one_line_error(code, out, err, "--transport-db is not a database URL")


@pytest.mark.parametrize("argv", [
    ["purge", "--older-than-days", "1e9"],
    ["purge", "--older-than-days", "1e400"],
    ["purge", "--older-than-days", "-1"],
    ["purge", "--older-than-days", "nan"],
    ["purge", "--older-than-days", "inf"],
    ["purge", "--older-than-days", "-inf"],
    ["purge", "--older-than-days", "thirty"],
    ["purge", "--older-than-days", "1", "--batch-size", "0"],
    ["purge", "--older-than-days", "1", "--batch-size", "-5"],
    ["dead", "--limit", "-1"],
    ["dead", "--limit", "0"],
    ["dead", "--limit", "1.5"],
    ["relay", "--transport-db", "sqlite://", "--batch-size", "0"],
    ["relay", "--transport-db", "sqlite://", "--poll-interval", "0"],
    ["relay", "--transport-db", "sqlite://", "--poll-interval", "nan"],
    ["relay", "--transport-db", "sqlite://", "--max-attempts", "0"],
    ["relay"],
    ["relay", "--transport-db", "sqlite://", "--rocketmq-endpoints", "127.0.0.1:1"],
    ["status", "--log-level", "loud"],
    ["replay"],
    ["no-such-command"],
])
def test_bad_arguments_are_one_line_errors_with_status_2(
    migrated: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv[:1], "--db", migrated, *argv[1:])
    assert_one_line_error(code, out, err, "--help")
    assert out == ""


def test_an_overflowing_age_says_the_range(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "purge", "--db", migrated, "--older-than-days", "1e9")
    assert_one_line_error(code, out, err, "--older-than-days", "from 0 to 7")


def test_a_negative_limit_lists_nothing_and_a_limit_is_kept(
    engine: Engine, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    publisher = RecordingPublisher(failures={f"d{i}": ALWAYS for i in range(3)})
    add_messages(engine, [Message(topic="t", id=f"d{i}", payload=b"{}") for i in range(3)])
    assert Relay(engine, publisher, RelayConfig(max_attempts=1)).run_once().dead == 3
    assert run(capsys, "dead", "--db", db_url, "--limit", "-1")[:2] == (2, "")
    code, out, _ = run(capsys, "dead", "--db", db_url, "--limit", "2")
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == ["d0", "d1"]


@pytest.mark.parametrize("argv", [
    ["status"], ["dead"], ["replay", "--all"], ["replay", "--id", "x"],
    ["discard", "--id", "x"], ["purge", "--older-than-days", "30"],
    ["downgrade", "--revision", "base"], ["relay", "--transport-db", "sqlite://"],
])
def test_reading_a_missing_sqlite_file_does_not_create_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    path = tmp_path / "typo.db"
    code, out, err = run(capsys, *argv[:1], "--db", f"sqlite:///{path}", *argv[1:])
    assert_one_line_error(code, out, err, "does not exist", f"outbox migrate --db sqlite:///{path}")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_migrate_creates_the_file_then_status_reads_it(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "migrate", "--db", sqlite_db)
    assert code == 0
    assert out.startswith("outbox tables at outbox_0004 in sqlite:///")
    assert Path(make_url(sqlite_db).database or "").is_file()
    assert run(capsys, "status", "--db", sqlite_db)[:2] == (
        0, "pending=0 sent=0 dead=0 discarded=0\n")


def test_an_existing_file_without_the_tables_says_to_migrate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other.db"
    path.touch()
    code, out, err = run(capsys, "status", "--db", f"sqlite:///{path}")
    assert_one_line_error(code, out, err, "outbox tables are missing", "outbox migrate --db")


@pytest.mark.parametrize("command", ["migrate", "downgrade"])
def test_an_unknown_revision_names_the_known_ones(
    migrated: str, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out, err = run(capsys, command, "--db", migrated, "--revision", "nonexistent")
    assert_one_line_error(code, out, err, "nonexistent", "--revision head", "outbox_0001")
    assert run(capsys, "status", "--db", migrated)[0] == 0  # the tables are untouched


@pytest.mark.filterwarnings("ignore:Query string argument:sqlalchemy.exc.SAWarning")
def test_a_query_password_is_hidden_in_sqlite_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}?password={SECRET}"
    code, out, err = run(capsys, "migrate", "--db", url)
    assert code == 0
    assert out.endswith("q.db?password=***\n")
    missing = f"sqlite:///{tmp_path / 'missing.db'}?password={SECRET}"
    code, out, err = run(capsys, "status", "--db", missing)
    assert_one_line_error(code, out, err, "password=***")
    assert SECRET not in out + err


def with_query_password(base: URL, password: str) -> str:
    """``base`` with its password only in the query string (``?password=...``)."""
    url = URL.create(base.drivername, username=base.username, host=base.host, port=base.port,
                     database=base.database, query={"password": password})
    assert url.password is None
    return url.render_as_string(hide_password=False)


SERVERS = [
    pytest.param("postgres_url", marks=pytest.mark.postgres, id="postgres"),
    pytest.param("mariadb_url", marks=pytest.mark.mariadb, id="mariadb"),
]


@pytest.mark.parametrize("server", SERVERS)
def test_a_wrong_query_password_is_never_printed(
    server: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    base = make_url(request.getfixturevalue(server))
    code, out, err = run(capsys, "status", "--db", with_query_password(base, SECRET))
    assert code == 1
    assert err.startswith("outbox: database error (OperationalError) on ")
    assert "password=***" in err
    assert SECRET not in out + err


@pytest.mark.parametrize("server", SERVERS)
def test_a_right_query_password_works_and_is_hidden(
    server: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    base = make_url(request.getfixturevalue(server))
    password = base.password
    assert password
    admin = create_engine(base)
    try:
        outbox.metadata.drop_all(admin)  # the chain creates them itself
    finally:
        admin.dispose()
    text = with_query_password(base, password)
    code, out, _ = run(capsys, "migrate", "--db", text)
    assert code == 0
    assert out.startswith("outbox tables at outbox_0004 in ") and "password=***" in out
    code, out, _ = run(capsys, "downgrade", "--db", text, "--revision", "base")
    assert (code, out.startswith("outbox tables at base in ")) == (0, True)
    assert "password=***" in out
    assert f"password={password}" not in out


def park(engine: Engine) -> RecordingPublisher:
    """A1 dead with a hostile error text; A2 and A3 wait behind it; B1 sent."""
    publisher = RecordingPublisher(failures={"A1": ALWAYS})
    add_messages(engine, [Message(topic="t", id=i, key=i[0], payload=b"{}")
                          for i in ("A1", "A2", "B1", "A3")])
    relay = Relay(engine, publisher, RelayConfig(max_attempts=1))
    relay.drain(timeout=10)
    with engine.begin() as conn:
        conn.execute(update(outbox_messages).where(outbox_messages.c.message_id == "A1")
                     .values(last_error="boom\nINFO forged line\x1b[2J"))
    return publisher


def test_dead_lists_parked_keys_and_discard_releases_them(
    engine: Engine, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    publisher = park(engine)
    code, out, err = run(capsys, "dead", "--db", db_url)
    assert code == 0
    assert out.splitlines() == [
        "A1\tt\tA\tattempts=1\tboom\\nINFO forged line\\x1b[2J",
        "parked key A: 2 rows waiting behind dead A1",
    ]
    assert "outbox discard" in err

    code, out, err = run(capsys, "discard", "--db", db_url, "--all")
    assert_one_line_error(code, out, err, "no --all", "--id")
    assert outbox_row(engine, "A1").status == DEAD

    code, out, err = run(capsys, "discard", "--db", db_url, "--id", "A1", "--id", "B1")
    assert (code, out) == (0, "discarded 1\n")
    assert "1 of the ids named no dead row" in err
    assert outbox_row(engine, "A1").status == DISCARDED
    assert run(capsys, "status", "--db", db_url)[1] == (
        f"{PENDING}=2 {SENT}=1 {DEAD}=0 {DISCARDED}=1\n")

    Relay(engine, publisher).drain(timeout=10)
    assert publisher.ids() == ["B1", "A2", "A3"]
    assert run(capsys, "dead", "--db", db_url)[1:] == ("", "no dead rows\n")


def test_replay_releases_a_parked_key_in_order(
    engine: Engine, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    publisher = park(engine)
    publisher.failures.clear()
    assert run(capsys, "replay", "--db", db_url, "--id", "A1")[:2] == (0, "replayed 1\n")
    Relay(engine, publisher).drain(timeout=10)
    assert publisher.ids() == ["B1", "A1", "A2", "A3"]


def test_the_library_log_goes_to_stderr_at_the_chosen_level(
    migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = logging.getLogger("outbox")
    before = (list(logger.handlers), logger.level)
    code, out, err = run(capsys, "purge", "--db", migrated, "--older-than-days", "30")
    assert (code, out) == (0, "outbox=0 inbox=0 transaction_log=0 consumer_attempts=0\n")
    assert "INFO outbox.cli: purge_progress table=outbox deleted=0" in err
    code, _, err = run(capsys, "purge", "--db", migrated, "--older-than-days", "30",
                       "--log-level", "WARNING")
    assert (code, err) == (0, "")
    assert (list(logger.handlers), logger.level) == before  # put back after the run


@pytest.mark.parametrize(("argv", "words"), [
    (["--rocketmq-endpoints", "127.0.0.1:1"], ("--topic",)),
    (["--transport-db", "sqlite://", "--topic", "t"], ("--topic", "--rocketmq-endpoints")),
])
def test_a_relay_is_told_where_its_topics_go(
    migrated: str, capsys: pytest.CaptureFixture[str], argv: list[str], words: tuple[str, ...]
) -> None:
    code, out, err = run(capsys, "relay", "--db", migrated, *argv)
    assert_one_line_error(code, out, err, *words)


@pytest.mark.parametrize(("broker", "words"), [
    (f"mqtt://u:{SECRET}@127.0.0.1:1883", ("no broker adapter for URLs starting mqtt://",
                                            "redis")),
    ("127.0.0.1:6379", ("has no scheme", "redis://HOST:PORT/DB")),
    ("env", ("--broker env reads OUTBOX_BROKER_URL",)),
])
def test_a_bad_broker_url_is_one_line_without_the_password(
    migrated: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    broker: str, words: tuple[str, ...],
) -> None:
    monkeypatch.delenv("OUTBOX_BROKER_URL", raising=False)
    code, out, err = run(capsys, "relay", "--db", migrated, "--broker", broker)
    assert_one_line_error(code, out, err, *words)
    assert SECRET not in out + err


def test_a_broker_takes_no_topic_list(migrated: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "relay", "--db", migrated, "--broker", "redis://127.0.0.1:1",
                         "--topic", "t")
    assert_one_line_error(code, out, err, "--topic is for RocketMQ")
