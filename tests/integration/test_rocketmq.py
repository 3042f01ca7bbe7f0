"""The RocketMQ adapter against the real broker (scripts/rocketmq up).

The test broker checks half messages back every 2 s once they are 3 s old, so the
check-back paths settle in seconds.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tenacity

import outbox
from outbox import ConsumerConfig, IdempotentConsumer, Message, ReceivedMessage
from outbox.errors import ConfigurationError
from outbox_rocketmq import (
    RocketMQConfig,
    RocketMQPublisher,
    RocketMQSubscriber,
    RocketMQTransactionalProducer,
)
from outbox_rocketmq.producer import DEFAULT_GUARD_AFTER

from .helpers import capture_events, outbox_row
from .rocketmq_support import (
    DLQ_TOPIC,
    MIXED_TOPIC,
    TX_TOPIC_A,
    TX_TOPIC_B,
    collect,
    dead_letter_reasons,
    group_name,
    has_log_row,
    has_order,
    make_service,
    unique,
)

pytestmark = [pytest.mark.rocketmq]
CHILD = Path(__file__).resolve().parent / "rocketmq_child.py"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(rocketmq_endpoints: str) -> RocketMQConfig:
    return RocketMQConfig(rocketmq_endpoints)


@pytest.fixture
def adapter(config: RocketMQConfig) -> Any:
    producer = RocketMQTransactionalProducer(config, [TX_TOPIC_A, TX_TOPIC_B], guard_after=None)
    yield producer
    producer.close()


def test_commit_is_delivered_once_and_rollback_never(
    tmp_path: Path, config: RocketMQConfig, adapter: RocketMQTransactionalProducer
) -> None:
    service = make_service(f"sqlite:///{tmp_path / 'a.db'}", adapter, TX_TOPIC_A)
    adapter.start()
    good, bad = unique("good"), unique("bad")
    service.place_order(good)
    with pytest.raises(ValueError, match="refused"):
        service.place_order(bad, fail=True)
    assert has_order(service.engine, good) and has_log_row(service.engine, good)
    assert not has_order(service.engine, bad) and not has_log_row(service.engine, bad)
    seen = collect(config, TX_TOPIC_A, {good, bad}, timeout=20, settle=5)
    assert seen == {good: 1}


def _crash_child(tmp_path: Path, endpoints: str, order_no: str, point: str,
                 *extra: str, topic: str = TX_TOPIC_A) -> float:
    """Run a producer that dies at ``point``; returns the monotonic time of death."""
    db_url = f"sqlite:///{tmp_path / 'crash.db'}"
    done = subprocess.run(
        [sys.executable, str(CHILD), db_url, endpoints, topic, order_no, point, *extra],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "src"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    died = time.monotonic()
    assert done.returncode == -9, done.stdout + done.stderr
    assert "KILLING" in done.stdout
    return died


def test_crash_after_local_commit_is_delivered_once_through_check_back(
    tmp_path: Path, config: RocketMQConfig, adapter: RocketMQTransactionalProducer,
    rocketmq_endpoints: str,
) -> None:
    order_no = unique("crash-commit")
    died = _crash_child(tmp_path, rocketmq_endpoints, order_no, "after-local-commit")
    # A new process of the same producer answers the broker's check-back.
    service = make_service(f"sqlite:///{tmp_path / 'crash.db'}", adapter, TX_TOPIC_A)
    assert has_order(service.engine, order_no) and has_log_row(service.engine, order_no)
    with capture_events() as events:
        adapter.start()
        seen = collect(config, TX_TOPIC_A, {order_no}, timeout=60, settle=5)
    delivered_after = time.monotonic() - died
    assert seen == {order_no: 1}
    answers = [e["state"] for e in events
               if e["event"] == "check_back" and e.get("message_id") == order_no]
    assert "commit" in answers
    print(f"crash to delivery through check-back: {delivered_after:.1f} s (incl. 5 s settle)")


def test_crash_after_half_send_is_never_delivered(
    tmp_path: Path, config: RocketMQConfig, adapter: RocketMQTransactionalProducer,
    rocketmq_endpoints: str,
) -> None:
    order_no = unique("crash-half")
    _crash_child(tmp_path, rocketmq_endpoints, order_no, "after-half-send")
    service = make_service(f"sqlite:///{tmp_path / 'crash.db'}", adapter, TX_TOPIC_A)
    assert not has_order(service.engine, order_no)
    with capture_events() as events:
        adapter.start()
        deadline = time.monotonic() + 60
        answers: list[str] = []
        while "rollback" not in answers and time.monotonic() < deadline:
            time.sleep(0.5)
            answers = [e["state"] for e in events
                       if e["event"] == "check_back" and e.get("message_id") == order_no]
    # Young, the message is UNKNOWN ("ask again"); past the local-transaction timeout
    # without a log row, it is rolled back for good.
    assert "rollback" in answers
    assert set(answers) <= {"unknown", "rollback"}
    assert collect(config, TX_TOPIC_A, {order_no}, timeout=8) == {}


def test_a_guarded_send_settles_its_guard_row_once_the_broker_has_the_commit(
    tmp_path: Path, config: RocketMQConfig
) -> None:
    adapter = RocketMQTransactionalProducer(config, [MIXED_TOPIC],
                                            guard_after=dt.timedelta(seconds=30))
    try:
        service = make_service(f"sqlite:///{tmp_path / 'g.db'}", adapter, MIXED_TOPIC)
        adapter.start()
        order_no = unique("guarded")
        service.place_order(order_no)
    finally:
        adapter.close()
    with service.engine.connect() as conn:
        counts = outbox.storage.counts(conn)
    assert (counts["pending"], counts["sent"], counts["dead"]) == (0, 1, 0)
    assert collect(config, MIXED_TOPIC, {order_no}, timeout=20, settle=3) == {order_no: 1}


def test_the_guard_row_is_on_by_default_and_refused_where_the_topic_cannot_take_it(
    tmp_path: Path, config: RocketMQConfig
) -> None:
    adapter = RocketMQTransactionalProducer(config, [MIXED_TOPIC])
    assert adapter.guard_after == DEFAULT_GUARD_AFTER
    try:
        service = make_service(f"sqlite:///{tmp_path / 'd.db'}", adapter, MIXED_TOPIC)
        adapter.start()
        order_no = unique("default-guard")
        service.place_order(order_no)
    finally:
        adapter.close()
    row = outbox_row(service.engine, order_no)
    assert row.status == "sent"  # written with the transaction, settled after the commit
    assert row.next_attempt_at - row.created_at >= DEFAULT_GUARD_AFTER - dt.timedelta(seconds=5)

    refused = RocketMQTransactionalProducer(config, [MIXED_TOPIC, TX_TOPIC_A])
    with pytest.raises(ConfigurationError, match=r"\(TRANSACTION\) takes no normal sends") as info:
        refused.start()
    assert "guard_after=None" in str(info.value) and TX_TOPIC_A in str(info.value)
    refused.close()
    opted_out = RocketMQTransactionalProducer(config, [TX_TOPIC_A], guard_after=None)
    try:
        opted_out.start()  # the user chose to go without: no check, no guard row
    finally:
        opted_out.close()
    assert opted_out.tables == (outbox.schema.transaction_log,)


def test_a_guard_row_delivers_a_half_message_the_broker_may_give_up_on(
    tmp_path: Path, config: RocketMQConfig, rocketmq_endpoints: str
) -> None:
    """The producer dies after its local commit and no process of it comes back to
    answer check-backs: the guard row, published by a relay, still gets the
    message out (a late check-back commit would only add a duplicate)."""
    order_no = unique("guard")
    _crash_child(tmp_path, rocketmq_endpoints, order_no, "after-local-commit", "guard",
                 topic=MIXED_TOPIC)
    engine = outbox.create_engine(f"sqlite:///{tmp_path / 'crash.db'}")
    with engine.connect() as conn:
        assert outbox.storage.counts(conn)["pending"] == 1  # the guard, due in 1 s
    time.sleep(1.5)
    publisher = RocketMQPublisher(config, [MIXED_TOPIC])
    try:
        assert outbox.Relay(engine, publisher).run_once().published == 1
    finally:
        publisher.close()
    assert collect(config, MIXED_TOPIC, {order_no}, timeout=20).get(order_no, 0) >= 1


class LosesEndTransaction(RocketMQTransactionalProducer):
    """As if every commit/rollback call to the broker were lost on the way."""

    def _end(self, transaction: Any, state: Any, message: Any) -> bool:
        return False


def test_two_topics_in_one_process_are_each_checked_against_their_own_log(
    tmp_path: Path, config: RocketMQConfig
) -> None:
    adapter = LosesEndTransaction(config, [TX_TOPIC_A, TX_TOPIC_B], guard_after=None)
    try:
        shop_a = make_service(f"sqlite:///{tmp_path / 'a.db'}", adapter, TX_TOPIC_A)
        shop_b = make_service(f"sqlite:///{tmp_path / 'b.db'}", adapter, TX_TOPIC_B)
        adapter.start()
        a, b = unique("a"), unique("b")
        shop_a.place_order(a)
        shop_b.place_order(b)
        # Each log holds only its own row: a check against the wrong database would
        # find nothing and, past the 4 s timeout, roll the message back.
        assert has_log_row(shop_a.engine, a) and not has_log_row(shop_b.engine, a)
        assert has_log_row(shop_b.engine, b) and not has_log_row(shop_a.engine, b)
        assert collect(config, TX_TOPIC_A, {a}, timeout=60) == {a: 1}
        assert collect(config, TX_TOPIC_B, {b}, timeout=60) == {b: 1}
    finally:
        adapter.close()


def test_a_topic_the_producer_was_not_given_is_refused_when_decorating(
    tmp_path: Path, adapter: RocketMQTransactionalProducer
) -> None:
    with pytest.raises(outbox.ConfigurationError, match="not among"):
        make_service(f"sqlite:///{tmp_path / 'x.db'}", adapter, MIXED_TOPIC)


def _run_consumer(consumer: IdempotentConsumer, until: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        consumer.run_once(wait_seconds=1)


def _consumer_db(tmp_path: Path) -> Any:
    engine = outbox.create_engine(f"sqlite:///{tmp_path / 'consumer.db'}")
    outbox.metadata.create_all(engine)
    return engine


def test_duplicate_delivery_runs_the_handler_once(tmp_path: Path, config: RocketMQConfig) -> None:
    publisher = RocketMQPublisher(config, [MIXED_TOPIC])
    group = group_name("dup")
    subscriber = RocketMQSubscriber(config, MIXED_TOPIC, group, dead_letter_topic=DLQ_TOPIC)
    calls: list[str] = []
    message = Message(topic=MIXED_TOPIC, payload=b'{"n": 1}', id=unique("dup"))
    try:
        publisher.publish(message)
        publisher.publish(message)

        def handler(session: Any, received: ReceivedMessage) -> None:
            if received.id == message.id:
                calls.append(received.id)

        consumer = IdempotentConsumer(_consumer_db(tmp_path), subscriber, group, handler)
        with capture_events() as events:
            def ignored() -> int:
                return sum(1 for e in events if e["event"] == "consumer_duplicate_ignored"
                           and e.get("message_id") == message.id)

            _run_consumer(consumer, lambda: ignored() >= 1, 30)
    finally:
        publisher.close()
        subscriber.close()
    assert calls == [message.id]
    assert ignored() == 1


class RecordingSubscriber(RocketMQSubscriber):
    """Remembers which message ids it dead-lettered (a new group also reads the
    topic's older messages, so counts alone would mislead)."""

    dead: set[str | None]

    def dead_letter(self, delivery: Any, reason: str) -> None:
        super().dead_letter(delivery, reason)
        self.dead.add(delivery.message_id)


def test_handler_failure_is_redelivered_then_dead_lettered_with_the_error(
    tmp_path: Path, config: RocketMQConfig
) -> None:
    publisher = RocketMQPublisher(config, [MIXED_TOPIC])
    group = group_name("fail")
    subscriber = RecordingSubscriber(config, MIXED_TOPIC, group, dead_letter_topic=DLQ_TOPIC)
    subscriber.dead = set()
    failing = Message(topic=MIXED_TOPIC, payload=b'{"n": 2}', id=unique("fail"))
    garbage = Message(topic=MIXED_TOPIC, payload=b"\xff not json", id=unique("garbage"))
    attempts: list[int] = []

    def handler(session: Any, received: ReceivedMessage) -> None:
        if received.id == failing.id:
            attempts.append(received.attempt)
            raise RuntimeError("ledger is closed")

    consumer = IdempotentConsumer(
        _consumer_db(tmp_path), subscriber, group, handler,
        config=ConsumerConfig(max_attempts=3, backoff=tenacity.wait_fixed(1)),
    )
    try:
        publisher.publish(failing)
        publisher.publish(garbage)
        _run_consumer(consumer, lambda: {failing.id, garbage.id} <= subscriber.dead, 90)
    finally:
        publisher.close()
        subscriber.close()
    assert attempts == [1, 2, 3]
    reasons = dead_letter_reasons(config, {failing.id, garbage.id}, 30)
    assert "ledger is closed" in reasons[failing.id]
    assert "undecodable" in reasons[garbage.id]


def test_unreachable_broker_is_a_clear_error(tmp_path: Path) -> None:
    config = RocketMQConfig("127.0.0.1:1", request_timeout=2)
    adapter = RocketMQTransactionalProducer(config, [TX_TOPIC_A], guard_after=None)
    service = make_service(f"sqlite:///{tmp_path / 'down.db'}", adapter, TX_TOPIC_A)
    order_no = unique("down")
    try:
        with pytest.raises(outbox.BrokerUnavailableError, match=r"127\.0\.0\.1:1"):
            service.place_order(order_no)
    finally:
        adapter.close()
    assert not has_order(service.engine, order_no)  # nothing happened locally either


def test_missing_topic_is_a_clear_error(tmp_path: Path, config: RocketMQConfig) -> None:
    publisher = RocketMQPublisher(config, ["outbox-no-such-topic"])
    try:
        with pytest.raises(outbox.ConfigurationError, match="no route for the topic"):
            publisher.publish(Message(topic="outbox-no-such-topic", payload=b"{}"))
    finally:
        publisher.close()


def test_broker_down_at_send_time_falls_back_to_the_outbox_and_delivers_after_restart(
    tmp_path: Path, config: RocketMQConfig
) -> None:
    """Stops the real broker, so it runs last (the file's order) and restarts it."""
    script = ROOT / "scripts" / "rocketmq"
    adapter = RocketMQTransactionalProducer(config, [MIXED_TOPIC], fallback_to_outbox=True)
    service = make_service(f"sqlite:///{tmp_path / 'fallback.db'}", adapter, MIXED_TOPIC)
    order_no = unique("fallback")
    subprocess.run([str(script), "down"], check=True, timeout=120, capture_output=True)
    try:
        service.place_order(order_no)  # the business call succeeds without the broker
        assert has_order(service.engine, order_no)
        with service.engine.connect() as conn:
            assert outbox.storage.counts(conn)["pending"] == 1
    finally:
        adapter.close()
        subprocess.run([str(script), "up"], check=True, timeout=300, capture_output=True)
    relay = outbox.Relay(service.engine, RocketMQPublisher(config, [MIXED_TOPIC]),
                         outbox.RelayConfig(max_attempts=20,
                                            backoff=tenacity.wait_fixed(dt.timedelta(seconds=1))))
    try:
        deadline = time.monotonic() + 60
        while relay.run_once().published == 0 and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        relay.publisher.close()
    assert collect(config, MIXED_TOPIC, {order_no}, timeout=30) == {order_no: 1}
