"""A small chaos run: the services under kills, restarts and hostile messages settle
with nothing lost, duplicated or stuck, and the books balance.

``make chaos`` runs the whole matrix; this is a few scenarios of it, on SQLite and
PostgreSQL with the SQL transport, and on RocketMQ 5 and RocketMQ 4.9 (half messages)
when the test brokers are there. The PostgreSQL scenario restarts the test server (it
is started again whatever happens).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
TIMEOUT = 150
LAST_LINE = re.compile(
    r"CHAOS scenarios=(\d+) transfers=(\d+) faults=(\d+) "
    r"lost=0 duplicated=0 wrong_balance=0 stuck=0")

pytestmark = pytest.mark.slow


def run_chaos(workdir: Path, env: dict[str, str], *args: str) -> str:
    env = {**env, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(EXAMPLES_DIR), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-m", "bank_transfer.chaos", "--workdir", str(workdir), "--seed", "1",
         "--matrix", "full", "--transfers", "12", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # its finally blocks start stopped servers again
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"chaos run did not finish within {TIMEOUT} s:\n{output}")
    assert process.returncode == 0, output
    last = output.strip().splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match, output
    assert int(match.group(1)) >= 1 and int(match.group(3)) >= 1, output
    return output


def _server_env(url: URL, var: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OUTBOX_TEST_POSTGRES_URL", "OUTBOX_TEST_MARIADB_URL")}
    env[var] = url.render_as_string(hide_password=False)
    return env


@pytest.mark.exclusive  # db-restart stops the shared PostgreSQL server
def test_chaos_sql_transport_on_sqlite_and_postgres(postgres_url: URL, tmp_path: Path) -> None:
    output = run_chaos(
        tmp_path / "chaos", _server_env(postgres_url, "OUTBOX_TEST_POSTGRES_URL"),
        "--databases", "sqlite,postgres", "--adapters", "sql",
        "--scenarios", "bank1-kill,bank2-kill,hostile,db-restart",
    )
    assert "does not apply: SQLite is a file" in output  # db-restart on SQLite: not counted
    assert re.search(r"^db-restart +postgres +sql +12 ", output, re.MULTILINE), output


@pytest.mark.rocketmq
def test_chaos_half_messages_on_rocketmq(rocketmq_endpoints: str, tmp_path: Path) -> None:
    env = {**os.environ, "OUTBOX_TEST_ROCKETMQ_ENDPOINTS": rocketmq_endpoints}
    run_chaos(tmp_path / "chaos", env, "--databases", "sqlite", "--adapters", "rocketmq",
              "--scenarios", "bank2-kill,hostile", "--rocketmq-endpoints", rocketmq_endpoints)


@pytest.mark.rocketmq4
def test_chaos_half_messages_on_rocketmq4(rocketmq4_namesrv: str, tmp_path: Path) -> None:
    """bank1 killed around the half send, the local commit and the end-transaction
    call on the 4.9 broker (remoting protocol, check-backs over bank1's own
    connection), and hostile messages sent onto the 4.x topic."""
    env = {**os.environ, "OUTBOX_TEST_ROCKETMQ4_NAMESRV": rocketmq4_namesrv}
    output = run_chaos(tmp_path / "chaos", env, "--databases", "sqlite",
                       "--adapters", "rocketmq4", "--scenarios", "bank1-kill,hostile",
                       "--rocketmq-namesrv", rocketmq4_namesrv)
    killed = re.search(r"^bank1-kill +sqlite +rocketmq4 +12 +(\d+) ", output, re.MULTILINE)
    assert killed and int(killed.group(1)) >= 1, output  # bank1 did die, and it settled
    # Every hostile case reached the 4.x topic (none refused at the door) and was
    # dead-lettered with its reason (else it would count as stuck).
    hostile = re.search(r"^hostile +sqlite +rocketmq4 +12 +\d+ +0 +0 +0 +0 .*$", output,
                        re.MULTILINE)
    assert hostile and "refused" not in hostile.group(0), output


@pytest.mark.kafka
@pytest.mark.redis
@pytest.mark.nats
@pytest.mark.rabbitmq
def test_chaos_on_the_brokers_reached_by_url(kafka_url: str, redis_url: str, nats_url: str,
                                             rabbitmq_url: str, tmp_path: Path) -> None:
    """bank2 killed before its acknowledgement and hostile messages written with each
    broker's own client, on Kafka, Redis Streams, NATS JetStream and RabbitMQ
    (--transport broker)."""
    env = {**os.environ, "OUTBOX_TEST_KAFKA_URL": kafka_url, "OUTBOX_TEST_REDIS_URL": redis_url,
           "OUTBOX_TEST_NATS_URL": nats_url, "OUTBOX_TEST_RABBITMQ_URL": rabbitmq_url}
    adapters = ("kafka", "redis", "nats", "rabbitmq")
    output = run_chaos(tmp_path / "chaos", env, "--databases", "sqlite",
                       "--adapters", ",".join(adapters), "--scenarios", "bank2-kill,hostile")
    for adapter in adapters:
        hostile = re.search(rf"^hostile +sqlite +{adapter} +12 +(\d+) +0 +0 +0 +0 ", output,
                            re.MULTILINE)
        # 23 cases (all but the one without an id) reached the topic or were refused
        # at the door; each was dead-lettered with its reason (else: stuck).
        assert hostile and int(hostile.group(1)) >= 23, output
