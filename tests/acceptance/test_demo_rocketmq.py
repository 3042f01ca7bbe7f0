"""The demo over a real RocketMQ broker settles like the SQL one, whatever the topic
already holds from earlier runs.

The broker comes from OUTBOX_TEST_ROCKETMQ_ENDPOINTS (``scripts/rocketmq up`` starts
one on 127.0.0.1:8081); without it the test skips, or fails when CI is set.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from bank_transfer import CONSUMER_GROUP, TOPIC
from bank_transfer.bank2 import ConsumerReport, make_credit, read_report, write_report
from bank_transfer.models import bank2_accounts, credits
from bank_transfer.runs import OnlyRun, run_transfer_no
from bank_transfer.setup import setup
from outbox import Delivery, IdempotentConsumer, JsonCodec, Message, Outbox, create_engine
from outbox.testing import InMemoryBroker

from .test_demo import EXPECTED, run_demo

TIMEOUT = 240


@pytest.mark.slow
@pytest.mark.rocketmq
def test_demo_over_rocketmq(tmp_path: Path, rocketmq_endpoints: str) -> None:
    # The second run finds the first run's messages on the topic (a new consumer
    # group is usually handed them) and must neither credit nor count them.
    for name in ("first", "second"):
        workdir = tmp_path / name
        code, output = run_demo(workdir, "--transport", "rocketmq",
                                "--rocketmq-endpoints", rocketmq_endpoints, timeout=TIMEOUT)
        lines = output.strip().splitlines()
        assert lines, "the demo printed nothing"
        assert lines[-1] == EXPECTED, output
        assert code == 0, output
        assert "consumer_processed" not in output  # the services log to files
        assert (workdir / "bank2.log").read_text().count("consumer_duplicate_ignored") == 1
        report = read_report(workdir / "bank2-report.json")
        assert report is not None
        # 10 credited, 2 sent back (the frozen account), 1 duplicate ignored.
        assert (report.processed, report.duplicates, report.dead_lettered, report.stopped) == (
            12, 1, 0, True), report
        # The client's own log goes to the run folder, not to the user's home.
        assert (workdir / "logs" / "rocketmq_python").is_dir()
        assert not any(workdir.glob("*.db-journal"))


@pytest.mark.slow
@pytest.mark.rocketmq4
def test_demo_over_rocketmq_4(tmp_path: Path, rocketmq4_namesrv: str) -> None:
    # RocketMQ 4.9 through its name server: the remoting client for the half
    # messages, the relay and both consumers. A second run must not count the first's.
    for name in ("first", "second"):
        workdir = tmp_path / name
        code, output = run_demo(workdir, "--transport", "rocketmq",
                                "--rocketmq-namesrv", rocketmq4_namesrv, timeout=TIMEOUT)
        lines = output.strip().splitlines()
        assert lines and lines[-1] == EXPECTED, output
        assert code == 0, output
        assert f"name server {rocketmq4_namesrv}" in output
        report = read_report(workdir / "bank2-report.json")
        assert report is not None
        assert (report.processed, report.duplicates, report.dead_lettered) == (12, 1, 0), report


def test_bank2_takes_only_the_transfers_of_its_run(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'bank2.db'}")
    setup(engine, "bank2")
    broker = InMemoryBroker()

    def send(transfer_no: str, amount: str) -> None:
        body = {"transfer_no": transfer_no, "to_account": "2", "amount": amount}
        broker.publish(Message(topic=TOPIC, id=transfer_no, key="1",
                               payload=JsonCodec().encode(body)))

    ours = run_transfer_no("rA", "TX-0001")
    send(run_transfer_no("rB", "TX-0001"), "5.00")   # an earlier run's transfer
    send(ours, "100.00")
    send(run_transfer_no("rAB", "TX-0001"), "7.00")  # starts with "rA" but is not ours
    broker.put_raw(Delivery(topic=TOPIC, payload=b"{}", message_id=None, attempt=0))
    broker.deliver_again(ours)
    filtered = OnlyRun(broker.subscriber(TOPIC, "bank2-rA"), "rA")
    consumer = IdempotentConsumer(engine, filtered, CONSUMER_GROUP, make_credit(Outbox(engine)))
    for _ in range(3):
        consumer.run_once(wait_seconds=0)

    with engine.connect() as conn:
        credited = list(conn.execute(select(credits.c.transfer_no, credits.c.amount)))
        balance = conn.scalar(select(bank2_accounts.c.balance)
                              .where(bank2_accounts.c.account_no == "2"))
    assert credited == [(ours, Decimal("100.00"))]
    assert balance == Decimal("100.00")
    assert (consumer.stats.processed, consumer.stats.duplicates,
            consumer.stats.dead_lettered) == (1, 1, 0)
    assert filtered.other_runs == 3
    # The other runs' messages were acknowledged, not left to come back.
    assert broker.subscriber(TOPIC, "bank2-rA").fetch(32, 0) == []
    assert broker.dead_letters(TOPIC, "bank2-rA") == []
    engine.dispose()


def test_consumer_report_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    assert read_report(path) is None
    report = ConsumerReport(ready=True, processed=10, duplicates=1, other_runs_ignored=26)
    write_report(path, report)
    assert read_report(path) == report
    assert json.loads(path.read_text())["duplicates"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no part file left
