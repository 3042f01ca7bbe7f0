"""Helpers of the RocketMQ tests: a producer service, collecting deliveries, a child
producer process that dies at a chosen point."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections import Counter
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
    settle: float = 0.0, group: str | None = None,
) -> Counter[str]:
    """Deliveries of the ``wanted`` outbox ids on ``topic`` to a fresh group, counted.

    Waits until every wanted id arrived (or ``timeout``), then ``settle`` seconds
    more to catch late duplicates. Everything received is acknowledged.
    """
    sub = RocketMQSubscriber(config, topic, group or group_name("collect"),
                             dead_letter_topic=DLQ_TOPIC)
    seen: Counter[str] = Counter()
    try:
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < (settle_until or deadline):
            for d in sub.fetch(32, 1):
                if d.message_id in wanted:
                    seen[d.message_id] += 1
                sub.ack(d)
            if settle_until is None and wanted <= set(seen):
                settle_until = time.monotonic() + settle
    finally:
        sub.close()
    return seen
