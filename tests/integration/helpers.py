"""Small tools for the integration tests: recording publishers and row readers."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Engine, select, update

from outbox import BrokerUnavailableError, Message
from outbox.schema import outbox_messages, utcnow
from outbox.storage import add_message


class RecordingPublisher:
    """Records every message it publishes, in the order the publishes happened.

    ``failures`` maps a message id to how many publishes of it fail before one
    succeeds (use a large number for "always"). ``delay`` widens races.
    """

    def __init__(self, *, delay: float = 0.0, failures: dict[str, int] | None = None) -> None:
        self.delay = delay
        self.failures = dict(failures or {})
        self.lock = threading.Lock()
        self.published: list[Message] = []
        self.attempts: Counter[str] = Counter()

    def publish(self, message: Message) -> None:
        with self.lock:
            self.attempts[message.id] += 1
            if self.failures.get(message.id, 0) > 0:
                self.failures[message.id] -= 1
                raise BrokerUnavailableError(f"injected failure for {message.id}")
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.published.append(message)

    def close(self) -> None:
        pass

    def ids(self) -> list[str]:
        with self.lock:
            return [m.id for m in self.published]

    def counts(self) -> Counter[str]:
        return Counter(self.ids())


class BatchRecordingPublisher(RecordingPublisher):
    """Also a BatchPublisher: a batch holding a failing message fails as a whole."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batches: list[list[str]] = []

    def publish_batch(self, messages: Sequence[Message]) -> None:
        with self.lock:
            ids = [m.id for m in messages]
            self.batches.append(ids)
            if any(self.failures.get(i, 0) > 0 for i in ids):
                raise BrokerUnavailableError("injected batch failure")
            self.published.extend(messages)


def add_messages(engine: Engine, messages: Iterable[Message]) -> None:
    """Commit ``messages`` as pending outbox rows in one transaction."""
    with engine.begin() as conn:
        for m in messages:
            add_message(conn, m)


def outbox_row(engine: Engine, message_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(outbox_messages).where(outbox_messages.c.message_id == message_id)
        ).one()


def make_due(engine: Engine, message_id: str) -> None:
    """Pull a row's next attempt into the past instead of waiting out its backoff."""
    with engine.begin() as conn:
        conn.execute(
            update(outbox_messages).where(outbox_messages.c.message_id == message_id)
            .values(next_attempt_at=utcnow() - dt.timedelta(seconds=1))
        )


def free_port() -> int:
    """A loopback port nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_until(port: int, text: str, timeout: float = 20) -> str:
    """``/metrics`` on ``port``, read again until it holds ``text``."""
    deadline = time.monotonic() + timeout
    body = ""
    while text not in body:
        assert time.monotonic() < deadline, f"{text!r} not in /metrics within {timeout} s:\n{body}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                body = r.read().decode()
        except OSError:
            body = ""
        time.sleep(0.1)
    return body


def wait_relayed(relay: subprocess.Popen[str], engine: Engine, ids: Sequence[str],
                 timeout: float = 60) -> float:
    """Wait until an ``outbox relay`` child marked every row of ``ids`` sent (failing
    with its output if it exits first); returns the deadline, for what follows."""
    deadline = time.monotonic() + timeout
    while any(outbox_row(engine, i).status != "sent" for i in ids):
        assert relay.poll() is None, relay.communicate()[0]
        assert time.monotonic() < deadline, f"the relay did not publish within {timeout:.0f} s"
        time.sleep(0.2)
    return deadline


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@contextlib.contextmanager
def capture_events(name: str = "outbox") -> Iterator[list[dict[str, Any]]]:
    """The library's log events (``record.outbox``: the event name and its fields) while
    the block runs, from every thread, at every level."""
    events: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields = getattr(record, "outbox", None)
            if isinstance(fields, dict):
                events.append(fields)

    logger = logging.getLogger(name)
    handler, level = Collect(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
