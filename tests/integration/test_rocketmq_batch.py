"""Batch publishing to the real broker (scripts/rocketmq up): ``publish_batch`` of
RocketMQPublisher and AsyncRocketMQPublisher, alone and under a relay.

A batch's sends go concurrently, a key's messages one after the other; the relay
uses it for every claimed batch and falls back to one by one when it raises. What
must hold: a batch that returns is on the broker in full, each key in its order; a
row marked sent is on the broker; a row not yet sent was never delivered ahead of
an earlier row of its key.

Each test publishes with a tag of its own and receives with a tag filter, so a
fresh consumer group does not wade through the topic's history.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.pool import NullPool

import outbox
from outbox import Message
from outbox.aio import create_async_engine
from outbox.schema import outbox_messages
from outbox.typing import AsyncBatchPublisher, BatchPublisher
from outbox_rocketmq import AsyncRocketMQPublisher, RocketMQConfig, RocketMQPublisher
from outbox_rocketmq._client import client_configuration, rocketmq
from outbox_rocketmq.mapping import MESSAGE_ID_PROPERTY

from .helpers import capture_events
from .rocketmq_support import MIXED_TOPIC, TX_TOPIC_A, group_name, unique

pytestmark = [pytest.mark.rocketmq]

KEYS = ("acct-1", "acct-2", "acct-3", "acct-4", "acct-5")


@pytest.fixture
def config(rocketmq_endpoints: str) -> RocketMQConfig:
    return RocketMQConfig(rocketmq_endpoints)


def batch_of(n: int, tag: str, *, topic: str = MIXED_TOPIC) -> list[Message]:
    """``n`` messages over KEYS in turn; every seventh has no key."""
    return [
        Message(topic=topic, payload=b'{"n": %d}' % i, id=unique(f"b{i}"), tag=tag,
                key=None if i % 7 == 3 else KEYS[i % len(KEYS)])
        for i in range(n)
    ]


def commit_log_offset(received: Any) -> int:
    """Where the broker stored a received message in its commit log: the broker's own
    order of everything it took (the last field of a 5.x receipt handle)."""
    return int(str(received.receipt_handle).split()[-1])


def receive_tagged(config: RocketMQConfig, tag: str, wanted: set[str], *,
                   topic: str = MIXED_TOPIC, timeout: float = 20.0,
                   settle: float = 1.5) -> dict[str, list[int]]:
    """Every delivery with ``tag`` to a fresh group: outbox id -> the commit-log offsets
    of its copies. Waits until each ``wanted`` id came (or ``timeout``), then
    ``settle`` seconds more for late copies and for ids that must not come."""
    rmq = rocketmq()
    consumer = rmq.SimpleConsumer(client_configuration(config), group_name("batch"),
                                  {topic: rmq.FilterExpression(tag)}, 1)
    consumer.startup()
    seen: dict[str, list[int]] = defaultdict(list)
    try:
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < (settle_until or deadline):
            try:
                received = consumer.receive(32, 15)
            except Exception:  # a young client's "settings null": not yet
                time.sleep(0.2)
                continue
            for r in received or ():
                seen[dict(r.properties or {}).get(MESSAGE_ID_PROPERTY, "")].append(
                    commit_log_offset(r))
                consumer.ack(r)
            if settle_until is None and wanted <= set(seen):
                settle_until = time.monotonic() + settle
    finally:
        consumer.shutdown()
    return dict(seen)


def assert_each_key_in_order(messages: Sequence[Message], seen: dict[str, list[int]]) -> None:
    """The first copy of each delivered message of a key was stored after the first
    copy of the key's message before it (what an inbox that drops copies applies)."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        if m.key is not None and m.id in seen:
            by_key[m.key].append(min(seen[m.id]))
    for key, offsets in by_key.items():
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), key


class Recording:
    """The client's producer, with each ``send_async`` and its receipt timed; when
    ``lose_receipt_of`` names a message, its send really goes out but its future
    reports a failure (a receipt lost on the way back)."""

    def __init__(self, producer: Any, lose_receipt_of: str | None = None) -> None:
        self._producer = producer
        self.lose_receipt_of = lose_receipt_of
        self.events: list[tuple[str, str, float]] = []
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_in_flight = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def _note(self, what: str, message_id: str) -> None:
        with self._lock:
            self.events.append((what, message_id, time.perf_counter()))
            self._in_flight += 1 if what == "send" else -1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def send_async(self, out: Any) -> concurrent.futures.Future[Any]:
        message_id = dict(out.properties)[MESSAGE_ID_PROPERTY]
        self._note("send", message_id)
        real = self._producer.send_async(out)
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def done(f: concurrent.futures.Future[Any]) -> None:
            self._note("receipt", message_id)
            error = f.exception()
            if error is None and message_id == self.lose_receipt_of:
                self.lose_receipt_of = None  # once: the relay's retry gets its receipt
                error = ConnectionResetError("receipt lost on the way back")
            if error is None:
                result.set_result(f.result())
            else:
                result.set_exception(error)

        real.add_done_callback(done)
        return result

    def assert_a_key_waits_for_its_receipts(self, messages: Sequence[Message]) -> None:
        """Each send of a key started after the receipt of the key's send before it."""
        at = {(what, mid): t for what, mid, t in self.events}
        last: dict[str, str] = {}
        for m in messages:
            if m.key is None or ("send", m.id) not in at:
                continue
            before = last.get(m.key)
            if before is not None:
                assert at[("receipt", before)] <= at[("send", m.id)], (m.key, before, m.id)
            last[m.key] = m.id


class RecordingPublisher(RocketMQPublisher):
    def __init__(self, *args: Any, lose_receipt_of: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recording: Recording | None = None
        self._lose = lose_receipt_of

    def _started(self) -> Any:
        producer = super()._started()
        if self.recording is None:
            self.recording = Recording(producer, self._lose)
        return self.recording


def recording_async(config: RocketMQConfig, topics: Sequence[str],
                    lose_receipt_of: str | None = None) -> tuple[AsyncRocketMQPublisher,
                                                                 RecordingPublisher]:
    publisher = AsyncRocketMQPublisher(config, topics)
    sync = RecordingPublisher(config, topics, lose_receipt_of=lose_receipt_of)
    publisher._sync = sync
    return publisher, sync


def rows(engine: Engine) -> dict[str, tuple[str, int, str | None]]:
    """message id -> (status, attempts, last error) of every outbox row."""
    t = outbox_messages
    with engine.connect() as conn:
        return {r.message_id: (r.status, r.attempts, r.last_error) for r in conn.execute(
            select(t.c.message_id, t.c.status, t.c.attempts, t.c.last_error))}


@pytest.fixture
def outbox_db(tmp_path: Path) -> Iterator[tuple[Engine, str]]:
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    yield engine, url
    engine.dispose()


def fill(engine: Engine, messages: Sequence[Message]) -> None:
    with engine.begin() as conn:
        for m in messages:
            outbox.storage.add_message(conn, m)


def assert_marks_match_the_broker(
    engine: Engine, messages: Sequence[Message], seen: dict[str, list[int]],
    held_back: set[str],
) -> None:
    """Every row marked sent is on the broker; the ``held_back`` rows (behind a failed
    row of their key, or failed themselves) are neither marked nor delivered; all
    others are marked sent."""
    status = rows(engine)
    for m in messages:
        if m.id in held_back:
            assert status[m.id][0] == "pending", m.id
            assert m.id not in seen, f"{m.id} reached the broker ahead of its key's order"
        else:
            assert status[m.id][0] == "sent", (m.id, status[m.id])
            assert m.id in seen, f"{m.id} is marked sent but is not on the broker"


# -- RocketMQPublisher.publish_batch ---------------------------------------------------


def test_the_relay_takes_the_publishers_batch_path(config: RocketMQConfig) -> None:
    assert isinstance(RocketMQPublisher(config, [MIXED_TOPIC]), BatchPublisher)
    assert isinstance(AsyncRocketMQPublisher(config, [MIXED_TOPIC]), AsyncBatchPublisher)


def test_a_batch_arrives_complete_with_each_keys_messages_in_order(
    config: RocketMQConfig,
) -> None:
    tag = unique("batch")
    messages = batch_of(200, tag)
    publisher = RecordingPublisher(config, [MIXED_TOPIC])
    try:
        started = time.perf_counter()
        publisher.publish_batch(messages)
        took = time.perf_counter() - started
    finally:
        publisher.close()
    recording = publisher.recording
    assert recording is not None
    # Every receipt was in before publish_batch returned.
    assert sum(1 for e in recording.events if e[0] == "receipt") == len(messages)
    recording.assert_a_key_waits_for_its_receipts(messages)
    assert recording.max_in_flight > len(KEYS)  # keys (and keyless ones) went concurrently
    seen = receive_tagged(config, tag, {m.id for m in messages})
    assert {m.id: len(seen.get(m.id, ())) for m in messages} == {m.id: 1 for m in messages}
    assert_each_key_in_order(messages, seen)
    print(f"publish_batch of {len(messages)}: {took * 1000:.0f} ms")


def test_a_failed_message_fails_the_batch_and_the_relay_sends_the_rest_one_by_one(
    config: RocketMQConfig, outbox_db: tuple[Engine, str],
) -> None:
    """One row goes to a TRANSACTION topic (the broker's route refuses a normal send
    there) in the middle of a key; in the same round another key's row gets out but
    its receipt is lost. The batch raises; one by one, the relay sends every row it
    may: the refused row backs off and holds back the rest of its key."""
    engine, _ = outbox_db
    tag = unique("fail")
    messages = batch_of(60, tag)
    bad = Message(topic=TX_TOPIC_A, payload=b'{"bad": 1}', id=unique("refused"),
                  key=KEYS[1], tag=tag)
    messages.insert(21, bad)  # KEYS[1]'s fifth message
    lost = [m for m in messages if m.key == KEYS[3]][4]  # in the same round
    fill(engine, messages)
    publisher = RecordingPublisher(config, [MIXED_TOPIC, TX_TOPIC_A], lose_receipt_of=lost.id)
    try:
        with capture_events() as events:
            result = outbox.Relay(engine, publisher).run_once()
    finally:
        publisher.close()
    [batch_error] = [e["error"] for e in events if e["event"] == "relay_batch_publish_failed"]
    assert batch_error.startswith("ConfigurationError: publishing a batch: 2 of 61 messages")
    assert "more not sent" in batch_error and "message type" in batch_error
    held_back = {bad.id} | {m.id for m in messages[messages.index(bad):] if m.key == bad.key}
    assert result.claimed == len(messages)
    assert (result.published, result.failed) == (len(messages) - len(held_back), 1)
    status = rows(engine)
    assert status[bad.id][1] == 1 and "message type" in (status[bad.id][2] or "")
    seen = receive_tagged(config, tag, {m.id for m in messages} - held_back)
    assert_marks_match_the_broker(engine, messages, seen, held_back)
    assert len(seen[lost.id]) == 2  # sent in the batch and again one by one
    assert_each_key_in_order(messages, seen)


def test_a_topic_the_publisher_was_not_started_with_fails_the_batch_before_any_send(
    config: RocketMQConfig, outbox_db: tuple[Engine, str],
) -> None:
    engine, _ = outbox_db
    tag = unique("topic")
    messages = batch_of(20, tag)
    stray = Message(topic="outbox-test-normal", payload=b"{}", id=unique("stray"), tag=tag)
    messages.insert(5, stray)
    fill(engine, messages)
    publisher = RecordingPublisher(config, [MIXED_TOPIC])
    try:
        with pytest.raises(outbox.ConfigurationError, match="not among this publisher"):
            publisher.publish_batch(messages)
        assert publisher.recording is None or not publisher.recording.events
        result = outbox.Relay(engine, publisher).run_once()
    finally:
        publisher.close()
    assert (result.published, result.failed) == (len(messages) - 1, 1)
    seen = receive_tagged(config, tag, {m.id for m in messages} - {stray.id})
    assert_marks_match_the_broker(engine, messages, seen, {stray.id})
    assert all(len(seen[m.id]) == 1 for m in messages if m is not stray)


# -- a broker that does not answer (the client faked: no broker needed) ---------------


class Hung:
    """A producer whose sends never get a receipt."""

    def __init__(self) -> None:
        self.sent = 0

    def send_async(self, out: Any) -> concurrent.futures.Future[Any]:
        self.sent += 1
        return concurrent.futures.Future()

    def shutdown(self) -> None:
        pass


def test_a_broker_that_never_answers_fails_the_batch_within_its_timeout() -> None:
    config = RocketMQConfig("127.0.0.1:1", access_key="ak", secret_key="s3cret-key")
    publisher = RocketMQPublisher(config, [MIXED_TOPIC], batch_timeout=0.5)
    publisher._producer = hung = Hung()
    messages = batch_of(12, "hung")
    started = time.monotonic()
    with pytest.raises(outbox.BrokerUnavailableError) as caught:
        publisher.publish_batch(messages)
    assert time.monotonic() - started < 3
    text = str(caught.value)
    first_wave = len({m.key for m in messages if m.key}) + sum(1 for m in messages if not m.key)
    assert hung.sent == first_wave  # nothing after the first round that got no receipt
    assert f"{first_wave} of 12 messages failed" in text and "no receipt within 0.5 s" in text
    assert "s3cret" not in text and "127.0.0.1:1" in text

    async def in_loop() -> None:
        apub = AsyncRocketMQPublisher(config, [MIXED_TOPIC], batch_timeout=0.5)
        apub._sync._producer = ahung = Hung()
        with pytest.raises(outbox.BrokerUnavailableError, match=r"of 12 messages failed"):
            await apub.publish_batch(messages)
        assert ahung.sent == first_wave
        await apub.close()

    asyncio.run(in_loop())


# -- AsyncRocketMQPublisher.publish_batch and AsyncRelay -------------------------------


def test_an_async_batch_arrives_complete_with_each_keys_messages_in_order(
    config: RocketMQConfig,
) -> None:
    tag = unique("abatch")
    messages = batch_of(200, tag)

    async def scenario() -> RecordingPublisher:
        publisher, sync = recording_async(config, [MIXED_TOPIC])
        try:
            await publisher.publish_batch(messages)
        finally:
            await publisher.close()
        return sync

    sync = asyncio.run(scenario())
    assert sync.recording is not None
    assert sum(1 for e in sync.recording.events if e[0] == "receipt") == len(messages)
    sync.recording.assert_a_key_waits_for_its_receipts(messages)
    assert sync.recording.max_in_flight > len(KEYS)
    seen = receive_tagged(config, tag, {m.id for m in messages})
    assert {m.id: len(seen.get(m.id, ())) for m in messages} == {m.id: 1 for m in messages}
    assert_each_key_in_order(messages, seen)


def test_the_async_relay_falls_back_one_by_one_after_a_failed_batch(
    config: RocketMQConfig, outbox_db: tuple[Engine, str],
) -> None:
    engine, url = outbox_db
    tag = unique("afail")
    messages = batch_of(40, tag)
    bad = Message(topic=TX_TOPIC_A, payload=b'{"bad": 1}', id=unique("refused"),
                  key=KEYS[2], tag=tag)
    messages.insert(14, bad)
    lost = messages[0]  # its key's first: out before any chain can stop
    fill(engine, messages)

    async def scenario() -> outbox.BatchResult:
        aengine = create_async_engine(url, poolclass=NullPool)
        publisher, _ = recording_async(config, [MIXED_TOPIC, TX_TOPIC_A], lost.id)
        try:
            return await outbox.AsyncRelay(aengine, publisher).run_once()
        finally:
            await publisher.close()
            await aengine.dispose()

    result = asyncio.run(scenario())
    held_back = {bad.id} | {m.id for m in messages[messages.index(bad):] if m.key == bad.key}
    assert (result.published, result.failed) == (len(messages) - len(held_back), 1)
    seen = receive_tagged(config, tag, {m.id for m in messages} - held_back)
    assert_marks_match_the_broker(engine, messages, seen, held_back)
    assert len(seen[lost.id]) >= 2
    assert_each_key_in_order(messages, seen)
