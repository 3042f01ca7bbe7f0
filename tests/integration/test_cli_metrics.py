"""``outbox relay --metrics-port N`` serves Prometheus metrics while it relays: the
counters of what it published, and the table gauges of its database."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import update

import outbox
from outbox import Message
from outbox.cli import main
from outbox.schema import outbox_messages

from .helpers import add_messages, free_port, wait_relayed


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_the_relay_serves_its_counters_and_the_backlog(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bank1.db'}"
    transport = f"sqlite:///{tmp_path / 'broker.db'}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    outbox.SqlTransport(outbox.create_engine(transport)).create_tables()
    ids = ["m-1", "m-2", "m-3"]
    add_messages(engine, [Message(topic="transfers", id=i, key="k", payload=b"{}")
                          for i in ids])
    add_messages(engine, [Message(topic="later", id="l-1", payload=b"{}")])
    with engine.begin() as conn:  # one row not due for a long time: the backlog
        conn.execute(update(outbox_messages).where(outbox_messages.c.message_id == "l-1")
                     .values(next_attempt_at=dt.datetime(2100, 1, 1)))
    port = free_port()
    relay = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "relay", "--db", url, "--transport-db", transport,
         "--poll-interval", "0.2", "--metrics-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = wait_relayed(relay, engine, ids)
        body = ""
        while 'outbox_messages_published_total{topic="transfers"} 3.0' not in body:
            assert time.monotonic() < deadline, body
            try:
                body = scrape(port)
            except OSError:
                time.sleep(0.2)
    finally:
        relay.send_signal(signal.SIGTERM)
        output, _ = relay.communicate(timeout=30)
        engine.dispose()
    assert relay.returncode == 0, output
    assert f"metrics at http://127.0.0.1:{port}/metrics" in output
    db = f"sqlite:///{tmp_path / 'bank1.db'}"
    assert f'outbox_pending_messages{{db="{db}",topic="later"}} 1.0' in body
    assert f'outbox_oldest_pending_seconds{{db="{db}",topic="later"}}' in body
    assert 'outbox_pending_messages{db="' + db + '",topic="transfers"}' not in body
    assert "outbox_publish_seconds_bucket" in body


def test_a_port_in_use_or_out_of_range_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'bank1.db'}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    engine.dispose()
    transport = f"sqlite:///{tmp_path / 'broker.db'}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["relay", "--db", url, "--transport-db", transport,
                     "--metrics-port", str(port)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("outbox: error: cannot serve metrics on 127.0.0.1:") and (
        "choose another --metrics-port" in err and err.count("\n") == 1), err
    for bad in ("0", "70000", "http"):
        assert main(["relay", "--db", url, "--transport-db", transport,
                     "--metrics-port", bad]) == 2
        assert "a port is a whole number from 1 to 65535" in capsys.readouterr().err
