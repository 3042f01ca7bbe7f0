"""The idempotent consumer on a real database with the SQL transport as its broker, in
both models (``IdempotentConsumer`` and ``AsyncIdempotentConsumer`` on the sync and the
async SQL transport)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import tenacity
from sqlalchemy import Engine, func, select

from outbox import (
    ConsumerConfig,
    Delivery,
    JsonCodec,
    Message,
    ReceivedMessage,
    Reject,
    SqlTransport,
)
from outbox.aio import AsyncSqlTransport
from outbox.schema import inbox, utcnow
from outbox.sql_transport import deliveries
from outbox.sql_transport import messages as queue
from outbox.testing import InMemoryBroker

from .models import Model, SyncOps

TOPIC = "transfers"
GROUP = "bank2"


class SpySubscriber:
    """Passes everything to the real subscriber and remembers every retry delay."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.retries: list[tuple[float, str]] = []

    def fetch(self, max_messages: int, wait_seconds: float) -> Any:
        return self.inner.fetch(max_messages, wait_seconds)

    def ack(self, delivery: Delivery) -> None:
        self.inner.ack(delivery)

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        self.retries.append((delay_seconds, error))
        self.inner.retry(delivery, delay_seconds, error)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.inner.dead_letter(delivery, reason)


class AsyncSpySubscriber(SpySubscriber):
    """The same for an asyncio subscriber."""

    async def fetch(self, max_messages: int, wait_seconds: float) -> Any:  # type: ignore[override]
        return await self.inner.fetch(max_messages, wait_seconds)

    async def ack(self, delivery: Delivery) -> None:  # type: ignore[override]
        await self.inner.ack(delivery)

    async def retry(self, delivery: Delivery, delay_seconds: float,  # type: ignore[override]
                    error: str) -> None:
        self.retries.append((delay_seconds, error))
        await self.inner.retry(delivery, delay_seconds, error)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:  # type: ignore[override]
        await self.inner.dead_letter(delivery, reason)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
def transport(engine: Engine) -> Iterator[SqlTransport]:
    """The sync transport, to publish and to look at the queue (in both models)."""
    yield SqlTransport(engine, poll_interval=0.01)


def queue_subscriber(model: Model, group: str = GROUP, visibility_timeout: float = 30) -> Any:
    """The model's own subscriber of the SQL transport on the test database."""
    if model.is_async:
        return AsyncSqlTransport(model.async_engine, poll_interval=0.01).subscriber(
            TOPIC, group, visibility_timeout=visibility_timeout)
    return SqlTransport(model.engine, poll_interval=0.01).subscriber(
        TOPIC, group, visibility_timeout=visibility_timeout)


@pytest.fixture
def subscriber(model: Model) -> SpySubscriber:
    spy = AsyncSpySubscriber if model.is_async else SpySubscriber
    return spy(queue_subscriber(model))


class Recorder:
    """A handler that writes the business row first, then may fail as told."""

    def __init__(self, tables: SimpleNamespace, fail: Any = None) -> None:
        self.tables = tables
        self.fail = fail
        self.calls: list[ReceivedMessage] = []

    async def __call__(self, ops: SyncOps, message: ReceivedMessage) -> None:
        self.calls.append(message)
        await ops.execute(self.tables.applied.insert().values(
            message_id=message.id, body=json.dumps(message.body, default=str)))
        if self.fail is not None:
            self.fail(message)


def run(model: Model, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a consumer method of either model to its end."""
    return model.run(lambda: model.call(fn, *args, **kwargs))


def publish(transport: SqlTransport, message_id: str, body: Any) -> Message:
    m = Message(topic=TOPIC, id=message_id, payload=JsonCodec().encode(body))
    transport.publisher().publish(m)
    return m


def applied(engine: Engine, tables: SimpleNamespace) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(tables.applied.c.message_id).order_by(tables.applied.c.id)))


def inbox_ids(engine: Engine, group: str = GROUP) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(inbox.c.message_id).where(inbox.c.consumer_group == group)
                                 .order_by(inbox.c.message_id)))


def consume_until_settled(model: Model, consumer: Any, transport: SqlTransport,
                          group: str = GROUP, timeout: float = 10.0) -> None:
    async def loop() -> None:
        deadline = time.monotonic() + timeout
        while transport.pending_count(TOPIC, group) and time.monotonic() < deadline:
            await model.call(consumer.run_once, wait_seconds=0.05)

    model.run(loop)
    assert transport.pending_count(TOPIC, group) == 0


def test_message_is_applied_once_with_its_body(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    handler = Recorder(tables)
    consumer = model.consumer(subscriber, GROUP, handler)
    publish(transport, "tx-1", {"to": 2, "amount": decimal.Decimal("10.50")})
    stats = run(model, consumer.run_once, wait_seconds=1)
    assert (stats.processed, stats.duplicates, stats.retried, stats.dead_lettered) == (1, 0, 0, 0)
    [received] = handler.calls
    assert received.body == {"to": 2, "amount": "10.50"}
    assert (received.id, received.topic, received.attempt) == ("tx-1", TOPIC, 1)
    assert applied(engine, tables) == ["tx-1"]
    assert inbox_ids(engine) == ["tx-1"]
    assert transport.pending_count(TOPIC, GROUP) == 0


def test_duplicate_delivery_is_acknowledged_without_running_the_handler(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    handler = Recorder(tables)
    consumer = model.consumer(subscriber, GROUP, handler)
    publish(transport, "tx-1", {"n": 1})
    publish(transport, "tx-1", {"n": 1})  # the broker delivers the same message twice
    publish(transport, "tx-2", {"n": 2})
    consume_until_settled(model, consumer, transport)
    assert [m.id for m in handler.calls] == ["tx-1", "tx-2"]
    assert (consumer.stats.processed, consumer.stats.duplicates) == (2, 1)
    assert applied(engine, tables) == ["tx-1", "tx-2"]
    assert inbox_ids(engine) == ["tx-1", "tx-2"]

    # A later redelivery, after the first was committed, is still ignored.
    publish(transport, "tx-2", {"n": 2})
    consume_until_settled(model, consumer, transport)
    assert len(handler.calls) == 2 and consumer.stats.duplicates == 2


def test_each_group_applies_the_message_once(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
) -> None:
    publish(transport, "tx-1", {"n": 1})
    for group in ("bank2", "audit"):
        sub = queue_subscriber(model, group)
        consume_until_settled(model, model.consumer(sub, group, Recorder(tables)),
                              transport, group)
    assert applied(engine, tables) == ["tx-1", "tx-1"]
    assert inbox_ids(engine, "bank2") == ["tx-1"] and inbox_ids(engine, "audit") == ["tx-1"]


def test_handler_failure_rolls_back_retries_with_backoff_then_dead_letters(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    def boom(message: ReceivedMessage) -> None:
        raise ValueError(f"boom on attempt {message.attempt}")

    handler = Recorder(tables, fail=boom)
    config = ConsumerConfig(max_attempts=3, backoff=tenacity.wait_exponential(multiplier=0.1))
    consumer = model.consumer(subscriber, GROUP, handler, config=config)
    publish(transport, "tx-1", {"n": 1})

    before = utcnow()
    assert run(model, consumer.run_once, wait_seconds=1).retried == 1
    # Rolled back: neither the business row nor the inbox row exists.
    assert applied(engine, tables) == [] and inbox_ids(engine) == []
    with engine.connect() as conn:
        state = conn.execute(select(deliveries.c.status, deliveries.c.attempts,
                                    deliveries.c.last_error, deliveries.c.visible_at)).one()
    assert tuple(state)[:3] == ("ready", 1, "ValueError: boom on attempt 1")
    assert state.visible_at >= before + dt.timedelta(seconds=0.1)  # hidden for the backoff

    consume_until_settled(model, consumer, transport)
    assert [m.attempt for m in handler.calls] == [1, 2, 3]
    assert [round(d, 3) for d, _ in subscriber.retries] == [0.1, 0.2]  # growing backoff
    assert (consumer.stats.retried, consumer.stats.dead_lettered) == (2, 1)
    [dead] = transport.dead_letters(GROUP)
    assert dead.message_id == "tx-1"
    assert dead.reason == "handler failed 3 times: ValueError: boom on attempt 3"
    assert applied(engine, tables) == [] and inbox_ids(engine) == []


def test_business_change_of_a_failed_attempt_is_rolled_back_and_redone_once(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    def fail_first(message: ReceivedMessage) -> None:
        if message.attempt == 1:
            raise ConnectionError("downstream hiccup")

    handler = Recorder(tables, fail=fail_first)
    consumer = model.consumer(subscriber, GROUP, handler,
                                  config=ConsumerConfig(backoff=tenacity.wait_fixed(0)))
    publish(transport, "tx-1", {"n": 1})
    consume_until_settled(model, consumer, transport)
    assert [m.attempt for m in handler.calls] == [1, 2]
    assert applied(engine, tables) == ["tx-1"]
    assert inbox_ids(engine) == ["tx-1"]
    assert transport.dead_letters(GROUP) == []


def test_reject_dead_letters_at_once(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    def reject(message: ReceivedMessage) -> None:
        raise Reject("account 99 does not exist")

    handler = Recorder(tables, fail=reject)
    consumer = model.consumer(subscriber, GROUP, handler,
                                  config=ConsumerConfig(max_attempts=5))
    publish(transport, "tx-1", {"to": 99})
    assert run(model, consumer.run_once, wait_seconds=1).dead_lettered == 1
    assert len(handler.calls) == 1
    assert subscriber.retries == []
    [dead] = transport.dead_letters(GROUP)
    assert (dead.message_id, dead.reason) == (
        "tx-1", "rejected by handler: account 99 does not exist")
    assert applied(engine, tables) == [] and inbox_ids(engine) == []
    assert transport.pending_count(TOPIC, GROUP) == 0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"payload": b""}, "undecodable message: payload is empty"),
        ({"payload": b"not json"}, "undecodable message: payload is not valid JSON"),
        ({"payload": b"\xff\xfe\x00"}, "undecodable message: payload is not valid UTF-8"),
        ({"payload": b"{\"a\": NaN}"}, "undecodable message: payload is not valid JSON"),
        ({"payload": b"{}", "message_id": None},
         "undecodable message: delivery has no message id"),
        ({"payload": b"{}", "message_id": ""}, "undecodable message: delivery has no message id"),
    ],
)
def test_undecodable_deliveries_are_dead_lettered_without_the_handler(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
    raw: dict[str, Any], reason: str,
) -> None:
    handler = Recorder(tables)
    consumer = model.consumer(subscriber, GROUP, handler)
    fields = {"message_id": "bad-1", **raw}
    transport.put_raw(TOPIC, fields.pop("payload"), **fields)
    publish(transport, "good-1", {"n": 1})  # a bad message does not block a good one

    consume_until_settled(model, consumer, transport)
    assert [m.id for m in handler.calls] == ["good-1"]
    [dead] = transport.dead_letters(GROUP)
    assert dead.message_id == (raw.get("message_id", "bad-1"))
    assert dead.reason is not None and dead.reason.startswith(reason), dead.reason
    assert dead.attempts == 1
    assert inbox_ids(engine) == ["good-1"]


def test_malformed_delivery_is_dead_lettered(
    model: Model, engine: Engine, tables: SimpleNamespace
) -> None:
    """Fields no SQL queue column could even hold, through the in-memory broker."""
    broker = InMemoryBroker()
    handler = Recorder(tables)
    sub = model.subscriber(broker, TOPIC, GROUP)
    consumer = model.consumer(sub, GROUP, handler)
    broker.put_raw(Delivery(topic=TOPIC, payload=b"{}", message_id="m-1", attempt=0,
                            key="k" * 201))
    broker.put_raw(Delivery(topic=TOPIC, payload=b"{}", message_id="m\x002", attempt=0))
    assert run(model, consumer.run_once, wait_seconds=1).dead_lettered == 2
    assert handler.calls == []
    reasons = [reason for _, reason in broker.dead_letters(TOPIC, GROUP)]
    assert reasons == [
        "undecodable message: delivery is not a valid message: message key is 201 characters; "
        "the limit is 200",
        "undecodable message: delivery is not a valid message: message id must not contain "
        "control characters; found U+0000 (NUL) at position 1: use printable text",
    ]
    assert inbox_ids(engine) == []


def test_oversized_payload_is_dead_lettered(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    handler = Recorder(tables)
    consumer = model.consumer(subscriber, GROUP, handler, codec=JsonCodec(max_bytes=64))
    transport.put_raw(TOPIC, b'"' + b"x" * 100 + b'"', message_id="big")
    consume_until_settled(model, consumer, transport)
    assert handler.calls == []
    [dead] = transport.dead_letters(GROUP)
    assert dead.reason == "undecodable message: payload is 102 bytes; the limit is 64"


def test_delivery_past_max_attempts_without_ack_is_dead_lettered(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
) -> None:
    """Consumers that crashed mid-message (no ack, no retry) count as attempts too."""
    publish(transport, "tx-1", {"n": 1})
    crashing = queue_subscriber(model, visibility_timeout=0.05)
    for _ in range(3):
        # taken, then "crash": the visibility timeout expires
        [d] = run(model, crashing.fetch, 1, 2.0)
    handler = Recorder(tables)
    consumer = model.consumer(crashing, GROUP, handler,
                              config=ConsumerConfig(max_attempts=3, max_deliveries=3))
    time.sleep(0.1)
    assert run(model, consumer.run_once, wait_seconds=1).dead_lettered == 1
    assert handler.calls == []
    [dead] = transport.dead_letters(GROUP)
    assert dead.reason == "gave up after 3 deliveries without acknowledgement"
    assert d.attempt == 3


def test_an_unreachable_database_is_retried_past_max_attempts_not_dead_lettered(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    """A database outage is not the message's fault: no dead letter, no lost credit."""
    from sqlalchemy.exc import OperationalError

    calls: list[int] = []

    async def handler(ops: SyncOps, message: Any) -> None:
        calls.append(message.attempt)
        if len(calls) <= 5:
            raise OperationalError("UPDATE accounts", {}, ConnectionError("server restarting"))
        await ops.execute(tables.applied.insert().values(message_id=message.id, body="{}"))

    consumer = model.consumer(subscriber, GROUP, handler, config=ConsumerConfig(
        max_attempts=2, backoff=tenacity.wait_fixed(0)))
    publish(transport, "tx-1", {"n": 1})
    consume_until_settled(model, consumer, transport)
    assert calls == [1, 2, 3, 4, 5, 6]
    assert transport.dead_letters(GROUP) == []
    assert applied(engine, tables) == ["tx-1"]


def test_inbox_row_commits_with_the_business_change(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    """If the commit fails after the handler ran, neither row exists and it is retried."""
    calls = 0

    async def handler(ops: SyncOps, message: ReceivedMessage) -> None:
        nonlocal calls
        calls += 1
        await ops.execute(tables.applied.insert().values(message_id=message.id, body="x"))
        if calls == 1:
            # Same primary key as the inbox row the consumer is about to commit.
            await ops.execute(inbox.insert().values(
                consumer_group="other", message_id=message.id, processed_at=func.now()))
            await ops.execute(inbox.insert().values(
                consumer_group="other", message_id=message.id, processed_at=func.now()))

    consumer = model.consumer(subscriber, GROUP, handler,
                                  config=ConsumerConfig(backoff=tenacity.wait_fixed(0)))
    publish(transport, "tx-1", {"n": 1})
    consume_until_settled(model, consumer, transport)
    assert calls == 2
    assert applied(engine, tables) == ["tx-1"]
    assert inbox_ids(engine) == ["tx-1"] and inbox_ids(engine, "other") == []
    assert subscriber.retries and subscriber.retries[0][1].startswith("IntegrityError")


def test_queue_rows_are_untouched_by_consumption(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    publish(transport, "tx-1", {"n": 1})
    consume_until_settled(model, model.consumer(subscriber, GROUP, Recorder(tables)),
                          transport)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(queue)) == 1


def test_message_ids_differing_only_in_case_are_different_messages(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    handler = Recorder(tables)
    consumer = model.consumer(subscriber, GROUP, handler)
    publish(transport, "tx-a", {"n": 1})
    publish(transport, "TX-A", {"n": 2})
    consume_until_settled(model, consumer, transport)
    assert sorted(m.id for m in handler.calls) == ["TX-A", "tx-a"]


def test_an_id_with_trailing_space_is_dead_lettered_not_taken_for_another(
    model: Model, engine: Engine, tables: SimpleNamespace, transport: SqlTransport,
    subscriber: SpySubscriber,
) -> None:
    handler = Recorder(tables)
    consumer = model.consumer(subscriber, GROUP, handler)
    publish(transport, "tx-b", {"n": 1})
    transport.put_raw(TOPIC, b'{"n": 2}', message_id="tx-b ")
    consume_until_settled(model, consumer, transport)
    assert [m.id for m in handler.calls] == ["tx-b"]
    [dead] = transport.dead_letters(GROUP)
    assert dead.message_id == "tx-b "
    assert "whitespace" in (dead.reason or "")
