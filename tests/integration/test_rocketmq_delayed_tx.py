"""A delayed message from the transactional producer: RocketMQ cannot delay a half
message, so it becomes an outbox row due at its time, in the same local transaction,
and a relay sends it then; a topic that takes no normal sends refuses it up front."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

import outbox
from outbox import AsyncOutbox, Relay, RelayConfig
from outbox.errors import ConfigurationError
from outbox_rocketmq import RocketMQConfig, RocketMQPublisher, RocketMQTransactionalProducer

from .helpers import outbox_row
from .rocketmq_support import (
    MIXED_TOPIC,
    TX_TOPIC_A,
    business_metadata,
    group_name,
    has_log_row,
    has_order,
    orders,
    unique,
)
from .test_rocketmq4 import delivered
from .test_rocketmq_async import sqlite_db

DELAY = dt.timedelta(seconds=2)


def delayed_service(db_url: str, adapter: RocketMQTransactionalProducer, topic: str) -> Any:
    engine = outbox.create_engine(db_url)
    outbox.metadata.create_all(engine)
    business_metadata.create_all(engine)
    app = outbox.Outbox(engine, delivery=adapter)

    @app.transactional_message(topic=topic, message_id="order_no", key="order_no",
                               deliver_after=DELAY)
    def place_order(session: Any, order_no: str) -> None:
        session.execute(orders.insert().values(order_no=order_no))

    return engine, place_order


@pytest.mark.rocketmq4
def test_a_delayed_transactional_message_goes_out_through_the_outbox_on_time(
    rocketmq4_namesrv: str, tmp_path: Path,
) -> None:
    topic = "outbox-test4-tx"
    config = RocketMQConfig(namesrv=rocketmq4_namesrv, producer_group=group_name("delay"))
    adapter = RocketMQTransactionalProducer(config, [topic])
    publisher = RocketMQPublisher(config, [topic])
    engine, place_order = delayed_service(f"sqlite:///{tmp_path / 'd.db'}", adapter, topic)
    order_no = unique("later")
    try:
        started = time.monotonic()
        place_order(order_no)
        assert has_order(engine, order_no) and not has_log_row(engine, order_no)
        row = outbox_row(engine, order_no)
        assert row.status == "pending" and row.next_attempt_at > row.created_at
        relay = Relay(engine, publisher, RelayConfig(claim_ahead=False))
        assert relay.run_once().published == 0  # not due yet
        while relay.run_once().published == 0:
            assert time.monotonic() - started < 10
            time.sleep(0.1)
        assert time.monotonic() - started >= DELAY.total_seconds() - 0.2
        got = delivered(rocketmq4_namesrv, topic, {order_no}, timeout=15)
        assert len(got[order_no]) == 1
    finally:
        adapter.close()
        publisher.close()


@pytest.mark.rocketmq
def test_a_delayed_message_to_a_topic_without_normal_sends_is_refused_before_anything(
    rocketmq_endpoints: str, tmp_path: Path,
) -> None:
    config = RocketMQConfig(rocketmq_endpoints)
    adapter = RocketMQTransactionalProducer(config, [TX_TOPIC_A], guard_after=None)
    engine, place_order = delayed_service(f"sqlite:///{tmp_path / 'r.db'}", adapter, TX_TOPIC_A)
    order_no = unique("refused")
    try:
        with pytest.raises(ConfigurationError, match="cannot delay a transactional message"):
            place_order(order_no)
    finally:
        adapter.close()
    assert not has_order(engine, order_no)
    with engine.connect() as conn:
        assert outbox.storage.counts(conn)["pending"] == 0

    mixed = RocketMQTransactionalProducer(config, [MIXED_TOPIC])
    engine, place_order = delayed_service(f"sqlite:///{tmp_path / 'm.db'}", mixed, MIXED_TOPIC)
    try:
        place_order(order_no)
    finally:
        mixed.close()
    assert outbox_row(engine, order_no).status == "pending"


@pytest.mark.rocketmq
def test_an_async_delayed_message_becomes_an_outbox_row_and_a_refused_one_writes_nothing(
    rocketmq_endpoints: str, tmp_path: Path,
) -> None:
    config = RocketMQConfig(rocketmq_endpoints)
    engine, aengine = sqlite_db(tmp_path, "a.db")
    mixed = RocketMQTransactionalProducer(config, [MIXED_TOPIC])
    refusing = RocketMQTransactionalProducer(config, [TX_TOPIC_A], guard_after=None)
    ob = AsyncOutbox(aengine, delivery=mixed)
    other = AsyncOutbox(aengine, delivery=refusing)

    @ob.transactional_message(topic=MIXED_TOPIC, message_id="no", deliver_after=DELAY)
    async def later(session: AsyncSession, no: str) -> None:
        pass

    @other.transactional_message(topic=TX_TOPIC_A, message_id="no", deliver_after=DELAY)
    async def refused(session: AsyncSession, no: str) -> None:
        raise AssertionError("must not run")

    ok, no = unique("a-later"), unique("a-refused")

    async def scenario() -> None:
        try:
            await later(ok)
            with pytest.raises(ConfigurationError, match="cannot delay"):
                await refused(no)
        finally:
            await mixed.aclose()
            await refusing.aclose()
            await aengine.dispose()

    asyncio.run(scenario())
    row = outbox_row(engine, ok)
    assert row.status == "pending" and row.next_attempt_at > row.created_at
    with engine.connect() as conn:
        assert outbox.storage.counts(conn)["pending"] == 1
