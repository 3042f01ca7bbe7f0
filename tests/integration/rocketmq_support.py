"""Helpers of the RocketMQ tests: a producer service, collecting deliveries, a child
producer process that dies at a chosen point."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Engine, MetaData, String, Table, func, select

import outbox
from outbox_rocketmq import RocketMQConfig, RocketMQSubscriber, RocketMQTransactionalProducer

TX_TOPIC_A = "outbox-test-tx-a"
TX_TOPIC_B = "outbox-test-tx-b"
MIXED_TOPIC = "outbox-test-mixed"
DLQ_TOPIC = "outbox-test-normal"
#: Short, so that a check-back may answer ROLLBACK within a test's patience.
LOCAL_TIMEOUT = dt.timedelta(seconds=4)
#: Shorter still where a test waits for ROLLBACK answers: the broker's first check
#: (a half message older than 3 s) then answers it at once.
CHECK_BACK_TIMEOUT = dt.timedelta(seconds=2)

business_metadata = MetaData()
orders = Table("rmq_orders", business_metadata, Column("order_no", String(64), primary_key=True))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def group_name(prefix: str) -> str:
    """A consumer group of its own (names allow letters, digits, - and _ only)."""
    return unique(prefix).replace(".", "_")


@dataclass
class Service:
    """One producing service: its database, outbox, and decorated function."""

    engine: Engine
    app: outbox.Outbox
    place_order: Any


def make_service(db_url: str, adapter: RocketMQTransactionalProducer, topic: str) -> Service:
    engine = outbox.create_engine(db_url)
    outbox.metadata.create_all(engine)
    business_metadata.create_all(engine)
    app = outbox.Outbox(engine, delivery=adapter, local_transaction_timeout=LOCAL_TIMEOUT)

    @app.transactional_message(topic=topic, message_id="order_no", key="order_no")
    def place_order(session: Any, order_no: str, fail: bool = False) -> None:
        session.execute(orders.insert().values(order_no=order_no))
        if fail:
            raise ValueError(f"order {order_no} refused")

    return Service(engine, app, place_order)


def has_order(engine: Engine, order_no: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.scalar(select(func.count()).where(orders.c.order_no == order_no)))


def has_log_row(engine: Engine, message_id: str) -> bool:
    log = outbox.schema.transaction_log
    with engine.connect() as conn:
        return bool(conn.scalar(select(func.count()).where(log.c.transaction_id == message_id)))


def collect(
    config: RocketMQConfig, topic: str, wanted: set[str], *, timeout: float,
    settle: float = 0.0, group: str | None = None, unwanted: Iterable[str] = (),
) -> Counter[str]:
    """Deliveries of the ``wanted`` outbox ids on ``topic`` to a fresh group, counted.

    Waits until every wanted id arrived (or ``timeout``), then ``settle`` seconds
    more to catch late duplicates. Deliveries of ``unwanted`` ids (which must never
    arrive) are counted too, without waiting for them. Everything received is
    acknowledged.
    """
    counted = wanted | set(unwanted)
    sub = RocketMQSubscriber(config, topic, group or group_name("collect"),
                             dead_letter_topic=DLQ_TOPIC)
    seen: Counter[str] = Counter()
    try:
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < (settle_until or deadline):
            for d in sub.fetch(32, 1):
                if d.message_id in counted:
                    seen[d.message_id] += 1
                sub.ack(d)
            if settle_until is None and wanted <= set(seen):
                settle_until = time.monotonic() + settle
    finally:
        sub.close()
    return seen


class LosesEndTransaction(RocketMQTransactionalProducer):
    """As if every commit/rollback call to the broker were lost on the way; remembers
    which outcome each message's ticket asked for, so the broker's check-back decides."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: dict[str, str] = {}

    def _end(self, transaction: Any, state: Any, message: Any) -> bool:
        self.asked[message.id] = state.value
        return False


def ended(events: Sequence[Mapping[str, Any]], message_id: str) -> list[str]:
    """The end-transaction calls the broker took for ``message_id``, in order."""
    return [e["state"] for e in events
            if e["event"] == "rocketmq_transaction_ended" and e.get("message_id") == message_id]


def check_backs(events: Sequence[Mapping[str, Any]], message_id: str) -> list[str]:
    """The answers given to the broker's check-backs for ``message_id``, in order."""
    return [e["state"] for e in events
            if e["event"] == "check_back" and e.get("message_id") == message_id]


def wait_until(condition: Any, timeout: float, step: float = 0.2) -> bool:
    """Poll ``condition()`` until true or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return bool(condition())
        time.sleep(step)
    return True


def log_rows(engine: Engine) -> set[str]:
    """The message ids of the transaction-log rows in ``engine``'s database."""
    log = outbox.schema.transaction_log
    with engine.connect() as conn:
        return set(conn.scalars(select(log.c.transaction_id)))


def dead_letter_reasons(config: RocketMQConfig, ids: set[str], timeout: float) -> dict[str, str]:
    """The reason property of dead-lettered copies of ``ids`` on the DLQ topic."""
    sub = RocketMQSubscriber(config, DLQ_TOPIC, group_name("dlq"), dead_letter_topic=MIXED_TOPIC)
    found: dict[str, str] = {}
    try:
        deadline = time.monotonic() + timeout
        while not ids <= set(found) and time.monotonic() < deadline:
            for d in sub.fetch(32, 1):
                if d.message_id in ids:
                    found[d.message_id] = dict(d.handle.properties or {}).get(
                        "OUTBOX_DEAD_REASON", "")
                sub.ack(d)
    finally:
        sub.close()
    return found
