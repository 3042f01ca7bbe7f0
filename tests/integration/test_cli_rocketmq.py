"""``outbox relay --rocketmq-endpoints``: the command publishes outbox rows to a real
RocketMQ broker and marks them sent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import outbox
from outbox import Message
from outbox_rocketmq import RocketMQConfig

from .helpers import add_messages, outbox_row
from .rocketmq_support import collect

TOPIC = "outbox-test-mixed"  # takes normal sends

pytestmark = pytest.mark.rocketmq


def test_the_cli_relay_publishes_to_rocketmq(rocketmq_endpoints: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    message_id = f"cli-{os.getpid()}-{time.monotonic_ns()}"
    add_messages(engine, [Message(topic=TOPIC, id=message_id, payload=b'{"n":1}')])
    relay = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "relay", "--db", url,
         "--rocketmq-endpoints", rocketmq_endpoints, "--topic", TOPIC,
         "--poll-interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while outbox_row(engine, message_id).status != "sent" and time.monotonic() < deadline:
            assert relay.poll() is None, relay.communicate()[0]
            time.sleep(0.2)
        assert outbox_row(engine, message_id).status == "sent"
    finally:
        relay.send_signal(signal.SIGTERM)
        output, _ = relay.communicate(timeout=30)
        engine.dispose()
    assert relay.returncode == 0, output
    assert collect(RocketMQConfig(rocketmq_endpoints), TOPIC, {message_id}, timeout=30) == {
        message_id: 1}
