"""The ``outbox`` command for a person at a terminal: tables for ``status`` and
``dead``, progress bars for ``purge``, ``replay --all`` and ``migrate``; and the plain
lines scripts read when the output is piped (the default off a terminal)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import update

import outbox
from integration.dashboard_support import seed
from outbox import Message
from outbox.cli import REPLAY_BATCH, main
from outbox.schema import outbox_messages

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def text(raw: str) -> str:
    return ANSI.sub("", raw)


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'bank1.db'}"
    assert main(["migrate", "--db", url, "--progress", "never"]) == 0
    return url


def test_status_and_dead_print_tables_on_request_and_plain_lines_by_default(
    db: str, capsys: pytest.CaptureFixture[str],
) -> None:
    engine = outbox.create_engine(db)
    seeded = seed(engine, sent=3)
    capsys.readouterr()
    assert main(["status", "--db", db]) == 0  # not a terminal: the plain line
    assert capsys.readouterr().out == "pending=5 sent=3 dead=6 discarded=0\n"
    assert main(["status", "--db", db, "--format", "table"]) == 0
    out = text(capsys.readouterr().out)
    assert re.search(r"│ dead\s+│\s+6 │", out), out
    assert re.search(r"│ bank-refund\s+│\s+2 │ .* ago │\s+2 │\s+1 │", out), out
    assert main(["dead", "--db", db, "--format", "table"]) == 0
    out = text(capsys.readouterr().out)
    assert "dead rows" in out and "parked keys" in out
    assert all(i in out for i in seeded.dead_timeout + seeded.dead_refused)
    assert re.search(r"│ acct-parked\s+│\s+2 │ " + seeded.dead_refused[0], out), out
    assert main(["dead", "--db", db]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert plain[0].startswith(seeded.dead_timeout[0] + "\tbank-transfer\t")


def test_purge_shows_each_tables_progress(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    engine = outbox.create_engine(db)
    seed(engine, sent=25)
    capsys.readouterr()
    assert main(["purge", "--db", db, "--older-than-days", "0", "--batch-size", "10",
                 "--progress", "always"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("outbox=25 inbox=1 ")
    err = text(captured.err)
    assert re.search(r"purge outbox .* 25/25", err), err
    assert re.search(r"purge inbox .* 1/1", err), err
    assert main(["purge", "--db", db, "--older-than-days", "0", "--progress", "never"]) == 0
    assert "purge outbox" not in text(capsys.readouterr().err)


def test_replay_all_goes_in_batches_with_progress(
    db: str, capsys: pytest.CaptureFixture[str],
) -> None:
    engine = outbox.create_engine(db)
    n = 2 * REPLAY_BATCH + 7
    with engine.begin() as conn:
        for i in range(n):
            outbox.storage.add_message(conn, Message(topic="t", id=f"d-{i:05d}", payload=b"{}"))
        conn.execute(update(outbox_messages).values(status="dead"))
    capsys.readouterr()
    assert main(["replay", "--db", db, "--all", "--progress", "always"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"replayed {n}\n"
    assert f"{n}/{n}" in text(captured.err)
    with engine.connect() as conn:
        assert outbox.storage.counts(conn)["pending"] == n


def test_migrate_counts_its_revisions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    assert main(["migrate", "--db", url, "--progress", "always"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"migrate .* (\d+)/\1", text(captured.err)), captured.err
    assert "outbox tables at" in captured.out
