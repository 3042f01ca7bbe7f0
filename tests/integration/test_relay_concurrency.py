"""Several relays at once: every row published exactly once, same-key rows in commit order."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import tenacity
from sqlalchemy import Engine

from outbox import Message, Relay, RelayConfig
from outbox.schema import PENDING, SENT
from outbox.storage import counts

from .helpers import RecordingPublisher, add_messages

ROWS = 500


def pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return counts(conn)[PENDING]


def run_relays(engine: Engine, relays: list[Relay], timeout: float = 60.0) -> None:
    """Run each relay in its own thread until no row is pending."""
    errors: list[BaseException] = []
    deadline = time.monotonic() + timeout

    def work(relay: Relay) -> None:
        try:
            while time.monotonic() < deadline:
                if relay.run_once().claimed == 0:
                    if pending(engine) == 0:
                        return
                    time.sleep(0.005)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert errors == []
    assert pending(engine) == 0


def keyed_messages(n: int, keys: int) -> list[Message]:
    return [
        Message(topic="t", id=f"m-{i:04d}", key=None if i % 7 == 0 else f"k{i % keys}",
                payload=str(i).encode())
        for i in range(n)
    ]


def test_two_relays_in_threads_publish_every_row_exactly_once(engine: Engine) -> None:
    messages = keyed_messages(ROWS, keys=50)
    add_messages(engine, messages)
    publisher = RecordingPublisher(delay=0.0002)
    config = RelayConfig(batch_size=20)
    relays = [Relay(engine, publisher, config), Relay(engine, publisher, config)]
    run_relays(engine, relays)

    published = publisher.counts()
    assert len(published) == ROWS
    assert set(published.values()) == {1}
    with engine.connect() as conn:
        assert counts(conn)[SENT] == ROWS


def test_same_key_order_survives_failures_and_two_relays(engine: Engine) -> None:
    rng = random.Random(1234)
    messages = keyed_messages(300, keys=4)
    # Commit in many small transactions: commit order is the order of the list.
    for start in range(0, len(messages), 25):
        add_messages(engine, messages[start:start + 25])
    flaky = {m.id: rng.choice([1, 2]) for m in rng.sample(messages, 40)}
    publisher = RecordingPublisher(failures=flaky, delay=0.0002)
    config = RelayConfig(batch_size=15, max_attempts=10, backoff=tenacity.wait_fixed(0))
    run_relays(engine, [Relay(engine, publisher, config), Relay(engine, publisher, config)])

    assert publisher.counts() == Counter({m.id: 1 for m in messages})
    assert all(publisher.attempts[i] == n + 1 for i, n in flaky.items())
    by_key: dict[str, list[str]] = defaultdict(list)
    for m in publisher.published:
        if m.key is not None:
            by_key[m.key].append(m.id)
    for key, ids in by_key.items():
        expected = [m.id for m in messages if m.key == key]
        assert ids == expected, f"key {key} published out of commit order"


def test_same_key_order_with_one_relay_and_backoff(engine: Engine) -> None:
    messages = keyed_messages(60, keys=3)
    add_messages(engine, messages)
    flaky = {"m-0001": 2, "m-0005": 1, "m-0030": 3}
    publisher = RecordingPublisher(failures=flaky)
    relay = Relay(engine, publisher, RelayConfig(batch_size=10, backoff=tenacity.wait_fixed(0.05)))
    run_relays(engine, [relay], timeout=30)
    for key in {m.key for m in messages if m.key}:
        assert [m.id for m in publisher.published if m.key == key] == [
            m.id for m in messages if m.key == key]


RELAY_PROCESS = textwrap.dedent("""
    import os, sys, time
    import outbox
    from outbox.storage import counts

    url, out_path, go_path = sys.argv[1:]
    engine = outbox.create_engine(url)
    # Start together, so that the two processes really compete.
    open(out_path + ".ready", "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(go_path) and time.monotonic() < deadline:
        time.sleep(0.005)

    class FilePublisher:
        def __init__(self, f):
            self.f = f
        def publish(self, message):
            time.sleep(0.0005)
            self.f.write(message.id + "\\n")
            self.f.flush()
        def close(self):
            pass

    with open(out_path, "w") as f:
        relay = outbox.Relay(engine, FilePublisher(f), outbox.RelayConfig(batch_size=20))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if relay.run_once().claimed == 0:
                with engine.connect() as conn:
                    if counts(conn)["pending"] == 0:
                        break
                time.sleep(0.005)
    engine.dispose()
""")


def test_two_relay_processes_publish_every_row_exactly_once(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    add_messages(engine, keyed_messages(ROWS, keys=50))
    outputs = [tmp_path / f"relay-{i}.txt" for i in range(2)]
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", RELAY_PROCESS, db_url, str(out), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for out in outputs
    ]
    try:
        deadline = time.monotonic() + 30
        while not all(Path(f"{out}.ready").exists() for out in outputs):
            assert time.monotonic() < deadline, "relay processes did not start"
            if any(p.poll() is not None for p in procs):
                break  # one died at start: its stderr is reported below
            time.sleep(0.01)
        go.touch()
        results = [proc.communicate(timeout=90) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err

    published = Counter(line for out in outputs for line in out.read_text().splitlines())
    assert len(published) == ROWS
    assert set(published.values()) == {1}
    assert pending(engine) == 0
    if engine.dialect.name != "sqlite":
        # Both processes did share the work (SQLite has one writer, so no promise there).
        assert all(out.read_text() for out in outputs), [len(o.read_text()) for o in outputs]


@pytest.mark.parametrize("delete_sent", [False, True])
def test_relay_thread_runs_and_stops(engine: Engine, delete_sent: bool) -> None:
    add_messages(engine, keyed_messages(30, keys=3))
    publisher = RecordingPublisher()
    relay = Relay(engine, publisher, RelayConfig(poll_interval=0.02, batch_size=7,
                                                 delete_sent=delete_sent)).start()
    try:
        deadline = time.monotonic() + 10
        while len(publisher.ids()) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        relay.stop()
    assert len(publisher.counts()) == 30
    assert set(publisher.counts().values()) == {1}
    add_messages(engine, keyed_messages(31, keys=3)[30:])
    time.sleep(0.1)
    assert len(publisher.ids()) == 30  # stopped means stopped
