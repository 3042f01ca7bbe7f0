"""``outbox relay --broker URL``: the command publishes outbox rows to a real Kafka,
RabbitMQ, Redis or NATS server and marks them sent; the password of a URL given by
``--broker env`` never reaches the process list or the output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import outbox
from outbox import Message
from outbox.brokers import open_broker

from .helpers import add_messages, wait_relayed

BROKERS = [
    pytest.param("kafka_url", id="kafka", marks=pytest.mark.kafka),
    pytest.param("redis_url", id="redis", marks=pytest.mark.redis),
    pytest.param("nats_url", id="nats", marks=pytest.mark.nats),
    pytest.param("rabbitmq_url", id="rabbitmq", marks=pytest.mark.rabbitmq),
]


@pytest.mark.parametrize("fixture", BROKERS)
def test_the_cli_relay_publishes_to_the_broker(fixture: str, tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    broker_url: str = request.getfixturevalue(fixture)
    topic = f"outbox-cli-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    broker = open_broker(broker_url)
    subscriber = broker.subscriber(topic, "cli-check")
    subscriber.fetch(1, 0)  # the group exists before anything is published
    ids = [f"cli-{i}" for i in range(3)]
    add_messages(engine, [Message(topic=topic, id=i, key="k", payload=b'{"n":1}')
                          for i in ids])
    relay = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "relay", "--db", url, "--broker", "env",
         "--poll-interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OUTBOX_BROKER_URL": broker_url},
    )
    try:
        deadline = wait_relayed(relay, engine, ids)
        got: list[str] = []
        while len(got) < len(ids) and time.monotonic() < deadline:
            for d in subscriber.fetch(10, 1.0):
                subscriber.ack(d)
                got.append(d.message_id or "")
        assert got == ids  # one key: in order
    finally:
        relay.send_signal(signal.SIGTERM)
        output, _ = relay.communicate(timeout=30)
        subscriber.close()
        broker.close()
        engine.dispose()
    assert relay.returncode == 0, output
    assert "relay_started" in output
