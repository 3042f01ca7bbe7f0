"""Rows for the dashboard's tests, and the dashboard served on loopback."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import Engine, update

from outbox import Message
from outbox.cli import DASHBOARD_TOKEN_ENV
from outbox.envelope import CREATED_AT_HEADER, format_utc
from outbox.schema import inbox, outbox_messages, transaction_log, utcnow
from outbox.storage import add_message

T = outbox_messages


@dataclass(frozen=True)
class Seeded:
    """What :func:`seed` wrote: ids by what they are."""

    sent: list[str]
    pending: list[str]
    dead_timeout: list[str]  #: dead with "timeout" in the error, topic bank-transfer
    dead_refused: list[str]  #: dead with "refused", topic bank-refund
    parked_key: str  #: the key of dead_refused[0], with rows waiting behind it
    waiting: list[str]
    logged: str  #: a sent message with its transaction-log row and an inbox row


def message(i: int, topic: str, key: str | None, created: dt.datetime) -> Message:
    payload = json.dumps({"transfer": i, "amount": "10.00", "card": f"4111-0000-{i:04d}"})
    return Message(topic=topic, payload=payload.encode(), id=f"msg-{i:04d}", key=key,
                   tag="transfer", headers={CREATED_AT_HEADER: format_utc(created),
                                            "traceparent": f"00-{i:032x}-{i:016x}-01"})


def seed(engine: Engine, sent: int = 30) -> Seeded:
    """``sent`` sent rows, 3 pending, 4 dead (timeout) on bank-transfer, 2 dead (refused)
    on bank-refund, one of them parking a key with 2 rows behind it."""
    now = utcnow()
    old = now - dt.timedelta(hours=2)
    ids: dict[str, list[str]] = {k: [] for k in ("sent", "pending", "timeout", "refused",
                                                 "waiting")}
    i = 0

    def add(kind: str, topic: str, key: str | None, created: dt.datetime) -> str:
        nonlocal i
        i += 1
        m = message(i, topic, key, created)
        with engine.begin() as conn:
            add_message(conn, m)
        ids[kind].append(m.id)
        return m.id

    for n in range(sent):
        add("sent", "bank-transfer", f"acct-{n % 5}", old)
    for n in range(4):
        add("timeout", "bank-transfer", f"acct-t{n}", old)
    add("refused", "bank-refund", "acct-parked", old)
    add("refused", "bank-refund", None, old)
    for _ in range(2):
        add("waiting", "bank-refund", "acct-parked", now)
    for n in range(3):
        add("pending", "bank-transfer", f"acct-p{n}", now)
    with engine.begin() as conn:
        conn.execute(update(T).where(T.c.message_id.in_(ids["sent"]))
                     .values(status="sent", attempts=1, sent_at=now))
        conn.execute(update(T).where(T.c.message_id.in_(ids["timeout"])).values(
            status="dead", attempts=10,
            last_error="BrokerUnavailableError: publish timeout after 5.0 s"))
        conn.execute(update(T).where(T.c.message_id.in_(ids["refused"])).values(
            status="dead", attempts=10, last_error="PublishRefused: topic not allowed"))
        logged = ids["sent"][0]
        conn.execute(transaction_log.insert().values(
            transaction_id=logged, message_id=logged, topic="bank-transfer", created_at=old))
        conn.execute(inbox.insert().values(consumer_group="bank2", message_id=logged,
                                           processed_at=now))
    return Seeded(ids["sent"], ids["pending"] + ids["waiting"], ids["timeout"],
                  ids["refused"], "acct-parked", ids["waiting"], logged)


@contextlib.contextmanager
def dashboard_process(*args: str, token: str | None = None,
                      timeout: float = 60) -> Iterator[tuple[str, list[str]]]:
    """``outbox dashboard ARGS --port 0`` in a child process; yields its URL and the
    lines it printed, and stops it (SIGTERM) on the way out."""
    env = {k: v for k, v in os.environ.items() if k != DASHBOARD_TOKEN_ENV}
    if token is not None:
        env[DASHBOARD_TOKEN_ENV] = token
    proc = subprocess.Popen([sys.executable, "-m", "outbox.cli", "dashboard", *args,
                             "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            found = re.search(r"dashboard at (http://\S+)/ ", line)
            if found:
                break
            assert time.monotonic() < deadline, "\n".join(lines)
        assert found, "the dashboard ended before it listened:\n" + "\n".join(lines)
        yield found.group(1), lines
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=30)
        lines += rest.splitlines()


@contextlib.contextmanager
def served(app: object) -> Iterator[str]:
    """``app`` served by uvicorn on a loopback port from a thread; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the dashboard did not start in 10 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
