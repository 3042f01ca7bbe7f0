"""``outbox relay --rocketmq-endpoints`` (5.x proxy) and ``--rocketmq-namesrv`` (4.x,
remoting): the command publishes outbox rows to a real RocketMQ broker and marks them
sent."""

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


@pytest.fixture(params=["5.x proxy", "4.x name server"])
def target(request: pytest.FixtureRequest) -> tuple[list[str], RocketMQConfig, str]:
    """The relay's options, a config to read the topic back, and the topic."""
    if request.param == "5.x proxy":
        endpoints = request.getfixturevalue("rocketmq_endpoints")
        return ["--rocketmq-endpoints", endpoints], RocketMQConfig(endpoints), TOPIC
    namesrv = request.getfixturevalue("rocketmq4_namesrv")
    return (["--rocketmq-namesrv", namesrv], RocketMQConfig(namesrv=namesrv),
            "outbox-test4-normal")


def test_the_cli_relay_publishes_to_rocketmq(
        target: tuple[list[str], RocketMQConfig, str], tmp_path: Path) -> None:
    options, config, topic = target
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    message_id = f"cli-{os.getpid()}-{time.monotonic_ns()}"
    add_messages(engine, [Message(topic=topic, id=message_id, payload=b'{"n":1}')])
    relay = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "relay", "--db", url, *options, "--topic", topic,
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
    assert collect(config, topic, {message_id}, timeout=30) == {message_id: 1}
