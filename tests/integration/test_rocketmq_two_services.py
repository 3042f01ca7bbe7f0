"""Two producing services, each a process with a database of its own, in one producer
group on a RocketMQ 4.9 broker, as in the write-up's layout (one producer group for
the transfer messages; here a second service shares it with a topic of its own).

The broker sends a half message's check-back to any live producer of the group, so a
service is asked about the other's messages too. It must answer those "ask again"
(never roll back what it knows nothing about), and each transaction must end as its
own service's log says: committed ones delivered once, refused ones never."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from outbox.schema import utcnow
from outbox_rocketmq.recover import Committed, TopicIndex
from outbox_rocketmq.remoting.client import RemotingClient

from .rocketmq_support import group_name, unique
from .test_rocketmq4 import delivered

pytestmark = [pytest.mark.rocketmq4]

CHILD = Path(__file__).resolve().parent / "rocketmq_service_child.py"
COUNT = 6  # orders per service; every third one is refused


def start(tmp_path: Path, namesrv: str, group: str, topic: str, prefix: str) -> Any:
    return subprocess.Popen(
        [sys.executable, str(CHILD), f"sqlite:///{tmp_path / (prefix + '.db')}", namesrv,
         group, topic, prefix, str(COUNT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_two_services_in_one_producer_group_each_decide_their_own_transactions(
    rocketmq4_namesrv: str, tmp_path: Path,
) -> None:
    group = group_name("producer_group_txmsg")
    services = {"outbox-test4-tx": unique("bank1"), "outbox-test4-order": unique("bank3")}
    children = {topic: start(tmp_path, rocketmq4_namesrv, group, topic, prefix)
                for topic, prefix in services.items()}
    answers: dict[str, list[dict[str, str]]] = {}
    try:
        for topic, child in children.items():
            assert child.stdout.readline().strip() == "READY", f"{topic} did not start"
        committed = {t: {f"{p}-{i}" for i in range(COUNT) if i % 3 != 2}
                     for t, p in services.items()}
        refused = {t: {f"{p}-{i}" for i in range(COUNT) if i % 3 == 2}
                   for t, p in services.items()}
        deadline = time.monotonic() + 60
        # settle: refused ones are rolled back once older than the local-transaction
        # timeout (4 s), at a later check-back.
        got = {t: delivered(rocketmq4_namesrv, t, committed[t],
                            timeout=max(1.0, deadline - time.monotonic()), settle=6)
               for t in services}
        client = RemotingClient(rocketmq4_namesrv)
        try:
            index = TopicIndex(client)
            arrived = {mid for t in services for mid in refused[t]
                       if index.has(Committed(mid, t, utcnow()))}
        finally:
            client.close()
    finally:
        for topic, child in children.items():
            out, _ = child.communicate("", timeout=60)
            answers[topic] = [json.loads(line) for line in out.splitlines()
                              if line.startswith("{")]
    assert not arrived, f"refused transactions were delivered: {arrived}"
    for topic in services:
        counts = {mid: len(copies) for mid, copies in got[topic].items()}
        assert counts == dict.fromkeys(committed[topic], 1), (topic, counts, answers)
    for topic, given in answers.items():
        own = [a for a in given if a["topic"] == topic]
        foreign = [a for a in given if a["topic"] != topic]
        assert {a["answer"] for a in foreign} <= {"unknown"}, (topic, foreign)
        assert {a["message_id"] for a in own if a["answer"] == "commit"} <= committed[topic]
        assert {a["message_id"] for a in own if a["answer"] == "rollback"} == refused[topic]
    # The broker did ask each service about the other's messages.
    assert all(any(a["topic"] != topic for a in given) for topic, given in answers.items()), \
        answers
