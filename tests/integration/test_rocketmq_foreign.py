"""Another service on the same RocketMQ topics, through the raw client (as a Java
service would be): its half messages survive our check-backs, its user properties
and keys reach our handlers, and its messages are de-duplicated on the id the user
names."""

from __future__ import annotations

import decimal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import outbox
from outbox import ConsumerConfig, IdempotentConsumer, ReceivedMessage
from outbox_rocketmq import (
    MessageIdFrom,
    RocketMQConfig,
    RocketMQSubscriber,
    RocketMQTransactionalProducer,
)
from outbox_rocketmq._client import client_configuration, rocketmq
from outbox_rocketmq.mapping import KEYS_HEADER

from .helpers import capture_events
from .rocketmq_support import DLQ_TOPIC, MIXED_TOPIC, TX_TOPIC_A, group_name, make_service, unique

pytestmark = [pytest.mark.rocketmq]


@pytest.fixture
def config(rocketmq_endpoints: str) -> RocketMQConfig:
    return RocketMQConfig(rocketmq_endpoints)


class ForeignProducer:
    """A producer that is not outbox: the raw client, with a checker that commits
    every half message it wrote (and counts the checks it got)."""

    def __init__(self, config: RocketMQConfig, topic: str) -> None:
        rmq = rocketmq()
        self.checked: list[str] = []
        self.lock = threading.Lock()
        owner = self

        class Checker(rmq.TransactionChecker):  # type: ignore[misc,name-defined]
            def check(self, message: Any) -> Any:
                with owner.lock:
                    owner.checked.append(dict(message.properties).get("bizId", "?"))
                return rmq.TransactionResolution.COMMIT

        self.producer = rmq.Producer(client_configuration(config), (topic,), Checker())
        self.producer.startup()
        self.topic = topic

    def message(self, biz_id: str, body: bytes, *keys: str, **properties: str) -> Any:
        out = rocketmq().Message()
        out.topic, out.body = self.topic, body
        for key in keys:
            out.keys = key
        out.add_property("bizId", biz_id)
        for name, value in properties.items():
            out.add_property(name, value)
        return out

    def half_send_and_lose_the_commit(self, biz_id: str) -> None:
        transaction = self.producer.begin_transaction()
        self.producer.send(self.message(biz_id, b'{"txNo":"%s"}' % biz_id.encode()),
                           transaction)
        # No commit: as if it was lost. Only the check-back can commit it now.

    def send(self, message: Any) -> None:
        self.producer.send(message)

    def close(self) -> None:
        self.producer.shutdown()


def received_biz_ids(config: RocketMQConfig, topic: str, wanted: set[str],
                     timeout: float) -> set[str]:
    sub = RocketMQSubscriber(config, topic, group_name("foreign"), dead_letter_topic=DLQ_TOPIC,
                             message_id_from=MessageIdFrom.property("bizId"))
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not wanted <= seen:
            for d in sub.fetch(32, 1):
                if d.message_id in wanted:
                    seen.add(d.message_id)
                sub.ack(d)
    finally:
        sub.close()
    return seen


def test_another_producers_half_messages_are_never_rolled_back_by_us(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    # Through the proxy a producer's group is its topic: the broker asks either of
    # the two producers about the foreign half messages. Answering ROLLBACK from
    # here lost about half of them; "ask again" lets the broker reach their owner.
    ours = RocketMQTransactionalProducer(config, [TX_TOPIC_A], guard_after=None)
    make_service(f"sqlite:///{tmp_path}/svc.db", ours, TX_TOPIC_A)
    ours.start()
    foreign = ForeignProducer(config, TX_TOPIC_A)
    ids = {unique("foreign") for _ in range(8)}
    try:
        with capture_events() as events:
            for biz_id in ids:
                foreign.half_send_and_lose_the_commit(biz_id)
            got = received_biz_ids(config, TX_TOPIC_A, ids, timeout=90)
        asked_us = [e for e in events if e["event"] == "check_back_foreign_message"]
    finally:
        foreign.close()
        ours.close()
    assert got == ids, f"lost: {ids - got}"
    assert all(e["answer"].startswith("unknown") for e in asked_us)
    assert foreign.checked, "the owner answered the check-backs"


def test_a_foreign_message_is_applied_once_with_its_properties_and_keys(
    tmp_path: Path, config: RocketMQConfig,
) -> None:
    foreign = ForeignProducer(config, MIXED_TOPIC)
    tx_no = unique("T")
    message = foreign.message(tx_no, b'{"txNo":"%s","amount":100.50}' % tx_no.encode(),
                              tx_no, "acct-2", traceId="trace-7")
    applied: list[ReceivedMessage] = []
    engine = outbox.create_engine(f"sqlite:///{tmp_path}/bank2.db")
    outbox.metadata.create_all(engine)
    subscriber = RocketMQSubscriber(
        config, MIXED_TOPIC, group_name("bank2"), dead_letter_topic=DLQ_TOPIC,
        message_id_from=MessageIdFrom.outbox_then(MessageIdFrom.json_field("txNo")))
    consumer = IdempotentConsumer(
        engine, subscriber, "bank2", lambda session, m: applied.append(m),
        config=ConsumerConfig(wait_seconds=1.0))
    try:
        foreign.send(message)
        foreign.send(message)  # a producer's retry: the same business id
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(m.id == tx_no for m in applied):
            consumer.run_once()  # the topic's history may come first
        for _ in range(5):  # the copy arrives and is dropped by the inbox
            consumer.run_once()
    finally:
        subscriber.close()
        foreign.close()
        engine.dispose()
    mine = [m for m in applied if m.id == tx_no]
    assert len(mine) == 1
    got = mine[0]
    assert got.body == {"txNo": tx_no, "amount": decimal.Decimal("100.50")}
    assert got.headers["traceId"] == "trace-7"
    assert got.key == min(tx_no, "acct-2")  # the first in sorted order
    assert got.headers[KEYS_HEADER] == " ".join(sorted({tx_no, "acct-2"}))
