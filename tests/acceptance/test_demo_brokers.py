"""The demo over Kafka, RabbitMQ, Redis Streams and NATS JetStream settles like the SQL
one (``--transport broker --broker URL``), and a second run on the same broker counts
none of the first run's messages.

Each broker's URL comes from its fixture (``OUTBOX_TEST_<BROKER>_URL``); without it
the test skips, or fails when CI is set.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bank_transfer.bank2 import read_report

from .test_demo import EXPECTED, run_demo

TIMEOUT = 180

BROKERS = [
    pytest.param("kafka_url", id="kafka", marks=pytest.mark.kafka),
    pytest.param("redis_url", id="redis", marks=pytest.mark.redis),
    pytest.param("nats_url", id="nats", marks=pytest.mark.nats),
    pytest.param("rabbitmq_url", id="rabbitmq", marks=pytest.mark.rabbitmq),
]


@pytest.mark.slow
@pytest.mark.parametrize("fixture", BROKERS)
def test_demo_over_a_broker(tmp_path: Path, fixture: str, request: pytest.FixtureRequest
                            ) -> None:
    url: str = request.getfixturevalue(fixture)
    for name in ("first", "second"):
        workdir = tmp_path / name
        code, output = run_demo(workdir, "--transport", "broker", "--broker", url,
                                timeout=TIMEOUT)
        lines = output.strip().splitlines()
        assert lines and lines[-1] == EXPECTED, output
        assert code == 0, output
        assert f"{url.partition('://')[0]}:// broker at" in output
        report = read_report(workdir / "bank2-report.json")
        assert report is not None
        # 10 credited, 2 sent back (the frozen account), the duplicate ignored: by
        # bank2's inbox, or (NATS JetStream, its id seen within the duplicate window)
        # by the broker, so that bank2 never got it.
        by_broker = fixture == "nats_url"
        assert (report.processed, report.duplicates, report.dead_lettered, report.stopped) == (
            12, 0 if by_broker else 1, 0, True), report
        assert ("the broker stored it once" in output) == by_broker, output
