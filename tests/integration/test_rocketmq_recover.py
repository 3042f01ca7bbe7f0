"""The recovery command on real brokers (4.9 and the 5.3 broker's remoting side):
committed transactions whose half messages the broker dropped are found through the
broker's message index and sent again through their outbox rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

import outbox
from outbox import Message, Relay, RelayConfig, cli
from outbox.message import TransactionState
from outbox.schema import PENDING, SENT, outbox_messages, transaction_log, utcnow
from outbox.storage import add_message
from outbox_rocketmq import RocketMQConfig, RocketMQPublisher, RocketMQTransactionalProducer
from outbox_rocketmq.recover import Committed, TopicIndex, recover
from outbox_rocketmq.remoting.client import RemotingClient

from .helpers import outbox_row
from .rocketmq_support import MIXED_TOPIC, group_name, make_service, unique, wait_until

pytestmark = [pytest.mark.rocketmq4, pytest.mark.rocketmq]


class DroppedByBroker(RocketMQTransactionalProducer):
    """As if the broker had given up on every half message just before the commit came
    and acknowledged the commit all the same: the half message is rolled back on the
    broker, the producer takes the commit for done and settles the guard row."""

    def _end(self, transaction: Any, state: TransactionState, message: Any) -> bool:
        super()._end(transaction, TransactionState.ROLLBACK, message)
        return state is TransactionState.COMMIT


@pytest.fixture(params=["4.9", "5.3"])
def brokers(request: pytest.FixtureRequest) -> tuple[RocketMQConfig, str, str]:
    """(config of the producing side, name server to search, topic)."""
    if request.param == "4.9":
        namesrv = request.getfixturevalue("rocketmq4_namesrv")
        return (RocketMQConfig(namesrv=namesrv, producer_group=group_name("recover")),
                namesrv, "outbox-test4-normal")
    return (RocketMQConfig(request.getfixturevalue("rocketmq_endpoints")),
            request.getfixturevalue("rocketmq5_namesrv"), MIXED_TOPIC)


def on_topic(namesrv: str, topic: str, message_id: str) -> bool:
    client = RemotingClient(namesrv)
    try:
        return TopicIndex(client).has(Committed(message_id, topic, utcnow()))
    finally:
        client.close()


def test_recovery_resends_what_the_broker_dropped(
        brokers: tuple[RocketMQConfig, str, str], tmp_path: Path) -> None:
    config, namesrv, topic = brokers
    guard = dt.timedelta(minutes=30)
    lossy = DroppedByBroker(config, [topic], guard_after=guard)
    good = RocketMQTransactionalProducer(config, [topic], guard_after=guard)
    db_url = f"sqlite:///{tmp_path / 'bank1.db'}"
    dropped_service = make_service(db_url, lossy, topic)
    try:
        dropped, delivered, lost = unique("dropped"), unique("ok"), unique("nocopy")
        dropped_service.place_order(dropped)
        make_service(db_url, good, topic).place_order(delivered)
        engine = dropped_service.engine
        # A committed transaction whose outbox row is gone (guard off, or purged).
        with engine.begin() as conn:
            conn.execute(transaction_log.insert().values(
                transaction_id=lost, message_id=lost, topic=topic, created_at=utcnow()))
        assert outbox_row(engine, dropped).status == SENT  # the guard row was settled
        assert wait_until(lambda: on_topic(namesrv, topic, delivered), 15)
        assert not on_topic(namesrv, topic, dropped)

        since, until = utcnow() - dt.timedelta(minutes=10), utcnow() + dt.timedelta(seconds=1)
        dry = recover(engine, namesrv, since=since, until=until, dry_run=True)
        assert (dry.checked, dry.on_topic, dry.resent, dry.no_local_copy) == \
            (3, 1, [dropped], [lost])
        assert outbox_row(engine, dropped).status == SENT  # a dry run changes nothing

        seen: list[int] = []
        report = recover(engine, namesrv, since=since, until=until,
                         progress=lambda r: seen.append(r.checked), every=1)
        assert (report.resent, report.no_local_copy, report.unanswered) == \
            ([dropped], [lost], [])
        assert seen == [1, 2, 3]
        row = outbox_row(engine, dropped)
        assert (row.status, row.attempts) == (PENDING, 0)
        assert row.next_attempt_at <= utcnow()

        publisher = RocketMQPublisher(config, [topic])
        try:
            Relay(engine, publisher, RelayConfig(claim_ahead=False)).run_once()
        finally:
            publisher.close()
        assert outbox_row(engine, dropped).status == SENT
        assert wait_until(lambda: on_topic(namesrv, topic, dropped), 15)
        again = recover(engine, namesrv, since=since, until=until)
        assert (again.on_topic, again.resent, again.no_local_copy) == (2, [], [lost])
        assert again.line() == "RECOVER checked=3 on_topic=2 resent=0 no_local_copy=1 unanswered=0"
    finally:
        lossy.close()
        good.close()


def test_recovery_refuses_an_empty_window(rocketmq4_namesrv: str, tmp_path: Path) -> None:
    engine = outbox.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    outbox.metadata.create_all(engine)
    now = utcnow()
    with pytest.raises(outbox.ConfigurationError, match="window is empty"):
        recover(engine, rocketmq4_namesrv, since=now, until=now)


def test_an_unreachable_broker_leaves_rows_unanswered(tmp_path: Path) -> None:
    engine = outbox.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    outbox.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(transaction_log.insert().values(
            transaction_id="m1", message_id="m1", topic="t", created_at=utcnow()))
    report = recover(engine, "127.0.0.1:9", since=utcnow() - dt.timedelta(hours=1),
                     until=utcnow() + dt.timedelta(seconds=1), request_timeout=1.0)
    assert (report.checked, report.unanswered, report.resent) == (1, ["m1"], [])


def test_the_cli_command_sends_again_and_names_what_it_cannot(
        rocketmq4_namesrv: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'bank1.db'}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    topic, kept, lost = "outbox-test4-normal", unique("kept"), unique("lost")
    with engine.begin() as conn:
        for message_id in (kept, lost):
            conn.execute(transaction_log.insert().values(
                transaction_id=message_id, message_id=message_id, topic=topic,
                created_at=utcnow() - dt.timedelta(minutes=40)))
        add_message(conn, Message(topic=topic, id=kept, payload=b"{}"))
        conn.execute(update(outbox_messages).where(outbox_messages.c.message_id == kept)
                     .values(status=SENT))
    args = ["rocketmq-recover", "--db", url, "--rocketmq-namesrv", rocketmq4_namesrv]
    assert cli.main([*args, "--since", "1h", "--dry-run"]) == cli.NEEDS_ATTENTION
    out = capsys.readouterr().out
    assert f"LOST {lost}:" in out and f"RESENT {kept}: would send again" in out
    assert out.strip().endswith(
        "RECOVER checked=2 on_topic=0 resent=1 no_local_copy=1 unanswered=0 dry_run=yes")
    assert outbox_row(engine, kept).status == SENT
    # The default --until (30m) still covers them; --until 50m leaves them out.
    assert cli.main([*args, "--since", "1h", "--until", "50m"]) == 0
    assert capsys.readouterr().out.strip() == (
        "RECOVER checked=0 on_topic=0 resent=0 no_local_copy=0 unanswered=0")
    assert cli.main([*args, "--since", "1h"]) == cli.NEEDS_ATTENTION
    assert outbox_row(engine, kept).status == PENDING
    capsys.readouterr()
    assert cli.main([*args, "--since", "5x"]) == 2
    assert "give a time back from now with its unit" in capsys.readouterr().err
