"""``outbox dashboard``: refuses what it cannot serve with one line that says what to
do, and serves the pages of every --db it is given, read-only without a token."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import outbox
from integration.dashboard_support import dashboard_process, seed
from outbox.cli import main

TOKEN = "cli-dashboard-token"


def database(tmp_path: Path, name: str, rows: bool = True) -> str:
    url = f"sqlite:///{tmp_path / name}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    if rows:
        seed(engine, sent=3)
    engine.dispose()
    return url


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_it_serves_one_page_per_database_and_never_prints_the_token(tmp_path: Path) -> None:
    one, two = database(tmp_path, "bank1.db"), database(tmp_path, "bank2.db", rows=False)
    with dashboard_process("--db", one, "--db", two, token=TOKEN) as (url, lines):
        status, index = get(url + "/")
        assert status == 200 and "bank1.db" in index and "bank2.db" in index
        assert get(url + "/db/1")[0] == 200
        status, dead = get(url + "/db/0/messages?status=dead")
        assert status == 200 and "msg-0004" in dead
        assert "writes need the token" in lines[-1]
    assert not any(TOKEN in line for line in lines)


def test_without_a_token_it_says_it_is_read_only(tmp_path: Path) -> None:
    with dashboard_process("--db", database(tmp_path, "bank1.db")) as (url, lines):
        assert "read-only" in lines[-1]
        assert "read-only" in get(url + "/db/0")[1]


@pytest.mark.parametrize(("args", "expected"), [
    (["--port", "70000"], "a port is a whole number from 0 to 65535"),
    (["--redact", "no_such_module_here:hide"], "--redact no_such_module_here:hide"),
    (["--redact", "json"], "is not MODULE:FUNCTION"),
    (["--redact", "json:__doc__"], "is not a function"),
])
def test_bad_options_end_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str,
) -> None:
    assert main(["dashboard", "--db", database(tmp_path, "b.db", rows=False), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_a_missing_database_or_missing_tables_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["dashboard", "--db", f"sqlite:///{tmp_path / 'nope.db'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.db"
    outbox.create_engine(f"sqlite:///{empty}").connect().close()
    assert main(["dashboard", "--db", f"sqlite:///{empty}"]) == 2
    assert "outbox migrate --db" in capsys.readouterr().err


def test_a_busy_port_is_refused_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["dashboard", "--db", database(tmp_path, "b.db", rows=False),
                     "--port", str(port)])
    assert code == 2
    assert "choose another --port" in capsys.readouterr().err
