"""Java services and the Python adapter on the same RocketMQ topics, both ways, on 5.x
(gRPC proxy) and 4.x (remoting): the write-up's Java bank1 (``rocketmq-client`` 4.9.7
``TransactionMQProducer``, ``rocketmq-client-java`` 5.0.7 transactional producer) and
Java bank2 (4.x ``DefaultMQPushConsumer``, 5.x ``PushConsumer``) from tests/java, built
once per session by ``scripts/java-interop build``.

The Java side prints one JSON line per event (sent, checked, received); the checks
here read those lines. Topics are shared with other tests, so every test uses a
prefix of its own for its transfer numbers and consumer groups of its own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
from sqlalchemy import Column, MetaData, Numeric, String, Table, select

import outbox
from outbox import ConsumerConfig, IdempotentConsumer, ReceivedMessage
from outbox.transport import Delivery
from outbox_rocketmq import (
    MessageIdFrom,
    RocketMQConfig,
    RocketMQSubscriber,
    RocketMQTransactionalProducer,
)
from outbox_rocketmq.mapping import KEYS_HEADER
from outbox_rocketmq.remoting.client import RemotingClient
from outbox_rocketmq.remoting.protocol import StoredMessage

from .helpers import capture_events
from .rocketmq_support import DLQ_TOPIC, LOCAL_TIMEOUT, TX_TOPIC_A, group_name, make_service, unique

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "java-interop"

TX_TOPIC4 = "outbox-test4-tx"
DLQ_TOPIC4 = "outbox-test4-order"  # any topic takes any message on 4.x
#: What the Java bank1 puts into every transfer (tests/java Main.Transfers).
JAVA_ACCOUNT = "1"
JAVA_AMOUNT = decimal.Decimal("100.5")
#: The header the Python bank1 sends with every transfer.
PY_TRACE = "trace-py-bank1"

rocketmq5 = pytest.mark.rocketmq
rocketmq4 = pytest.mark.rocketmq4


def unavailable(reason: str) -> NoReturn:
    """Skip on a laptop, fail in CI (as tests/conftest.py does for services)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


# -- the Java side -------------------------------------------------------------------


@dataclass
class Java:
    """The built jar and how to run it (small heap, logs inside the session's tmp)."""

    jar: Path
    home: Path

    def command(self, *args: str) -> list[str]:
        return [
            os.environ.get("JAVA", "java"), "-Xmx256m", "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1", f"-Duser.home={self.home}",
            f"-Drocketmq.client.logRoot={self.home}/logs/rocketmqlogs",
            "-jar", str(self.jar), *args,
        ]

    def run(self, *args: str, timeout: float) -> JavaResult:
        """Run to the end (bounded); its events and stderr."""
        try:
            done = subprocess.run(self.command(*args), capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"java {' '.join(args)} ran over {timeout} s; stdout: "
                        f"{exc.stdout!r}; stderr tail: {str(exc.stderr)[-2000:]!r}")
        return JavaResult(done.returncode, parse_events(done.stdout.splitlines()),
                          done.stderr)

    def start(self, *args: str) -> JavaProcess:
        return JavaProcess(self.command(*args), self.home / f"stderr-{unique('p')}.log")


@dataclass
class JavaResult:
    rc: int
    events: list[dict[str, Any]]
    stderr: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def explain(self) -> str:
        return f"rc={self.rc} events={self.events} stderr tail={self.stderr[-3000:]}"


def parse_events(lines: Sequence[str]) -> list[dict[str, Any]]:
    events = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


class JavaProcess:
    """A Java bank2 running in the background while the test sends."""

    def __init__(self, command: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("w")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True)
        self.events: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            for event in parse_events([line]):
                self.events.append(event)
                if event.get("event") == "ready":
                    self.ready.set()
        self.ready.set()  # ended: nobody waits for ever

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout) or self.proc.poll() is not None:
            self.finish(5)
            pytest.fail(f"the Java consumer did not start: {self.explain()}")

    def finish(self, timeout: float) -> JavaResult:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
        return JavaResult(rc, list(self.events), self.stderr_path.read_text(errors="replace"))

    def explain(self) -> str:
        return f"events={self.events} stderr tail={self.stderr_path.read_text()[-3000:]}"


@pytest.fixture(scope="session")
def java(tmp_path_factory: pytest.TempPathFactory) -> Java:
    """Builds tests/java once per session (only when its sources changed)."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(os.environ.get(
        tool.upper(), tool)) is None]
    if missing:
        unavailable(f"the Java interop tests need {' and '.join(missing)} (Java 17 and "
                    "Maven) on PATH")
    try:
        built = subprocess.run([str(SCRIPT), "build"], capture_output=True, text=True,
                               timeout=900, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/java-interop build ran over 900 s", pytrace=False)
    if built.returncode != 0:
        pytest.fail(f"scripts/java-interop build failed (rc {built.returncode}):\n"
                    f"{built.stderr[-4000:]}", pytrace=False)
    jar = subprocess.run([str(SCRIPT), "jar"], capture_output=True, text=True, check=True)
    home = tmp_path_factory.mktemp("java-home")
    return Java(Path(jar.stdout.strip()), home)


# -- the Python side -----------------------------------------------------------------


bank_metadata = MetaData()
#: bank1's debits and bank2's credits (each in its own database).
debits = Table("interop_debits", bank_metadata,
               Column("tx_no", String(80), primary_key=True), Column("amount", Numeric(12, 2)))
credits = Table("interop_credits", bank_metadata,
                Column("tx_no", String(80), primary_key=True), Column("amount", Numeric(12, 2)))


@dataclass
class PythonBank1:
    engine: Any
    transfer: Any


def python_bank1(db_url: str, adapter: RocketMQTransactionalProducer, topic: str) -> PythonBank1:
    """The write-up's bank1 in Python: debit and the transfer message, atomically."""
    engine = outbox.create_engine(db_url)
    outbox.metadata.create_all(engine)
    bank_metadata.create_all(engine)
    app = outbox.Outbox(engine, delivery=adapter, local_transaction_timeout=LOCAL_TIMEOUT)

    @app.transactional_message(
        topic=topic, message_id="tx_no", key="tx_no", tag="transfer",
        headers={"traceId": PY_TRACE},
        payload=lambda tx_no, account_no, amount: {
            "accountNo": account_no, "amount": amount, "txNo": tx_no},
    )
    def transfer(session: Any, tx_no: str, account_no: str, amount: decimal.Decimal) -> None:
        session.execute(debits.insert().values(tx_no=tx_no, amount=amount))

    return PythonBank1(engine, transfer)


class CountingSubscriber(RocketMQSubscriber):
    """A subscriber that remembers every delivery's de-duplication id (copies too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delivered: Counter[str | None] = Counter()

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        got = super().fetch(max_messages, wait_seconds)
        for d in got:
            self.delivered[d.message_id] += 1
        return got


@dataclass
class PythonBank2:
    """An IdempotentConsumer crediting bank2 for transfers (de-duplicated on txNo)."""

    engine: Any
    subscriber: CountingSubscriber
    consumer: IdempotentConsumer
    applied: list[ReceivedMessage] = field(default_factory=list)

    def run_until(self, wanted: set[str], *, copies: int, timeout: float) -> None:
        """Until every wanted transfer was applied and delivered ``copies`` times (or
        ``timeout``), then a few more rounds for late copies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.consumer.run_once()
            applied = {m.id for m in self.applied}
            if wanted <= applied and all(self.subscriber.delivered[w] >= copies
                                         for w in wanted):
                break
        for _ in range(3):
            self.consumer.run_once()

    def credited(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.scalars(select(credits.c.tx_no)))

    def close(self) -> None:
        self.subscriber.close()
        self.engine.dispose()


@pytest.fixture
def bank2_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[PythonBank2] = []

    def make(config: RocketMQConfig, topic: str, dead_letter_topic: str) -> PythonBank2:
        engine = outbox.create_engine(f"sqlite:///{tmp_path}/bank2-{len(made)}.db")
        outbox.metadata.create_all(engine)
        bank_metadata.create_all(engine)
        subscriber = CountingSubscriber(
            config, topic, group_name("java-to-py-bank2"), dead_letter_topic=dead_letter_topic,
            message_id_from=MessageIdFrom.json_field("txNo"))
        bank2 = PythonBank2(engine, subscriber, None)  # type: ignore[arg-type]

        def credit(session: Any, message: ReceivedMessage) -> None:
            if not str(message.id).startswith("jx"):
                return  # history of the shared topic: not ours
            session.execute(credits.insert().values(tx_no=message.id,
                                                    amount=message.body["amount"]))
            bank2.applied.append(message)

        bank2.consumer = IdempotentConsumer(engine, subscriber, "bank2", credit,
                                            config=ConsumerConfig(wait_seconds=1.0))
        made.append(bank2)
        return bank2

    yield make
    for bank2 in made:
        bank2.close()


def tx_nos(prefix: str, count: int) -> set[str]:
    return {f"{prefix}{i}" for i in range(count)}


def assert_java_transfers_applied_once(bank2: PythonBank2, wanted: set[str],
                                       copies: int) -> None:
    mine = [m for m in bank2.applied if m.id in wanted]
    counts = Counter(m.id for m in mine)
    assert set(counts) == wanted, f"never applied: {wanted - set(counts)}"
    assert all(n == 1 for n in counts.values()), f"applied more than once: {counts}"
    assert bank2.credited() >= wanted
    for tx_no in wanted:
        assert bank2.subscriber.delivered[tx_no] >= copies, (
            f"{tx_no} was delivered {bank2.subscriber.delivered[tx_no]} times, sent {copies}")
    for m in mine:
        assert m.body == {"accountNo": JAVA_ACCOUNT, "amount": JAVA_AMOUNT, "txNo": m.id}
        assert m.tag == "transfer"
        assert m.headers["traceId"] == f"trace-{m.id}"
        # Two keys (txNo, accountNo): the first in sorted order, and all of them.
        assert m.key == min(m.id, JAVA_ACCOUNT)
        assert m.headers[KEYS_HEADER] == " ".join(sorted({m.id, JAVA_ACCOUNT}))
        # RocketMQ's own properties (4.x: KEYS, TAGS, PGROUP, TRAN_MSG, UNIQ_KEY, ...;
        # 5.x: __transactionId__) are no headers.
        assert set(m.headers) == {"traceId", KEYS_HEADER}, m.headers


# -- 5.x: Java bank1 -> Python bank2 ---------------------------------------------------------


@rocketmq5
def test_java_bank1_5x_transactional_to_python_bank2_applies_each_transfer_once(
    java: Java, rocketmq_endpoints: str, bank2_factory: Any,
) -> None:
    prefix = unique("jx5a") + "-"
    sent = java.run("produce", "--api", "5", "--address", rocketmq_endpoints,
                    "--topic", TX_TOPIC_A, "--count", "3", "--repeat", "2",
                    "--prefix", prefix, "--transactional", timeout=120)
    assert sent.rc == 0, sent.explain()
    assert len(sent.of("sent")) == 6, sent.explain()  # every txNo twice: a resend

    bank2 = bank2_factory(RocketMQConfig(rocketmq_endpoints), TX_TOPIC_A, DLQ_TOPIC)
    wanted = tx_nos(prefix, 3)
    bank2.run_until(wanted, copies=2, timeout=90)
    assert_java_transfers_applied_once(bank2, wanted, copies=2)


@rocketmq5
def test_java_half_messages_with_lost_commits_arrive_while_a_python_producer_shares_the_topic(
    java: Java, rocketmq_endpoints: str, tmp_path: Path, bank2_factory: Any,
) -> None:
    # Through the proxy a producer's group is its topic: the broker may ask the Python
    # producer about the Java half messages. It must answer "ask again", never
    # ROLLBACK, so that the broker reaches the Java checker, which commits.
    config = RocketMQConfig(rocketmq_endpoints)
    ours = RocketMQTransactionalProducer(config, [TX_TOPIC_A], guard_after=None)
    make_service(f"sqlite:///{tmp_path}/py-bank1.db", ours, TX_TOPIC_A)
    ours.start()
    prefix = unique("jx5b") + "-"
    try:
        with capture_events() as events:
            sent = java.run("produce", "--api", "5", "--address", rocketmq_endpoints,
                            "--topic", TX_TOPIC_A, "--count", "6", "--prefix", prefix,
                            "--transactional", "--lose-commit", "--check-timeout", "120",
                            timeout=180)
            time.sleep(1)
        asked_us = [e for e in events if e["event"] == "check_back_foreign_message"]
    finally:
        ours.close()
    assert sent.rc == 0, f"the Java checker was not asked about every message: {sent.explain()}"
    wanted = tx_nos(prefix, 6)
    assert {e["txNo"] for e in sent.of("checked") if e["answer"] == "COMMIT"} == wanted
    assert all(e["answer"].startswith("unknown") for e in asked_us), asked_us
    assert not [e for e in events if e["event"] == "check_back"
                and e.get("topic") == TX_TOPIC_A and e.get("state") == "rollback"
                and str(e.get("message_id", "")).startswith(prefix)]

    bank2 = bank2_factory(config, TX_TOPIC_A, DLQ_TOPIC)
    bank2.run_until(wanted, copies=1, timeout=90)
    assert_java_transfers_applied_once(bank2, wanted, copies=1)


# -- Python bank1 -> Java bank2 ------------------------------------------------------------


def python_transfers_reach_java(java: Java, api: str, address: str, topic: str,
                                adapter: RocketMQTransactionalProducer, db_url: str) -> None:
    prefix = unique(f"py{api}") + "-"
    wanted = {f"{prefix}{i}": decimal.Decimal(f"{100 + i}.50") for i in range(3)}
    bank2 = java.start("consume", "--api", api, "--address", address, "--topic", topic,
                       "--group", group_name(f"java-bank2-{api}"), "--expect", str(len(wanted)),
                       "--timeout", "90", "--settle", "3", "--filter-prefix", prefix)
    try:
        bank2.wait_ready(60)
        time.sleep(2)  # the new group's first pulls/pops
        bank1 = python_bank1(db_url, adapter, topic)
        before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
        for tx_no, amount in wanted.items():
            bank1.transfer(tx_no, "1", amount)
    finally:
        result = bank2.finish(120)
        adapter.close()
    received = result.of("received")
    assert result.rc == 0, result.explain()
    counts = Counter(json.loads(e["body"])["txNo"] for e in received)
    assert counts == dict.fromkeys(wanted, 1), f"not exactly once: {counts}"
    for e in received:
        body = json.loads(e["body"])
        tx_no = body["txNo"]
        # JsonCodec writes a Decimal as a string by default.
        assert body == {"accountNo": "1", "amount": str(wanted[tx_no]), "txNo": tx_no}, e
        assert e["topic"] == topic
        assert e["keys"] == [tx_no], e
        assert e["tag"] == "transfer", e
        props = e["properties"]
        assert props["OUTBOX_MESSAGE_ID"] == tx_no, e
        assert props["traceId"] == PY_TRACE, e  # a header is a plain user property
        created = dt.datetime.fromisoformat(props["OUTBOX_CREATED_AT"].replace("Z", "+00:00"))
        assert props["OUTBOX_CREATED_AT"].endswith("Z"), e
        assert before <= created <= dt.datetime.now(dt.UTC), e
        assert "OUTBOX_HEADERS" not in props, e  # nothing needed packing


@rocketmq5
def test_python_bank1_5x_to_java_bank2_push_consumer(
    java: Java, rocketmq_endpoints: str, tmp_path: Path,
) -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(rocketmq_endpoints), [TX_TOPIC_A],
                                            guard_after=None)
    python_transfers_reach_java(java, "5", rocketmq_endpoints, TX_TOPIC_A, adapter,
                                f"sqlite:///{tmp_path}/py-bank1.db")


@rocketmq4
def test_python_bank1_4x_to_java_bank2_push_consumer(
    java: Java, rocketmq4_namesrv: str, tmp_path: Path,
) -> None:
    config = RocketMQConfig(namesrv=rocketmq4_namesrv, producer_group=group_name("py-bank1"))
    adapter = RocketMQTransactionalProducer(config, [TX_TOPIC4])
    python_transfers_reach_java(java, "4", rocketmq4_namesrv, TX_TOPIC4, adapter,
                                f"sqlite:///{tmp_path}/py-bank1.db")


# -- 4.x: Java bank1 -> Python ---------------------------------------------------------------


def pulled(namesrv: str, topic: str, prefix: str, count: int,
           timeout: float) -> list[StoredMessage]:
    """Messages whose body names a txNo with ``prefix``, read from the start of every
    queue by a fresh group through the remoting client, until ``count`` came."""
    client = RemotingClient(namesrv)
    group = group_name("py-pull4")
    found: list[StoredMessage] = []
    try:
        client.subscribe(group, [topic])
        queues = client.route(topic).read_queues
        offsets = dict.fromkeys(queues, 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(found) < count:
            for queue in queues:
                result = client.pull(group, topic, queue, offsets[queue])
                offsets[queue] = result.next_offset
                found += [m for m in result.messages if prefix.encode() in m.body]
            time.sleep(0.2)
    finally:
        client.close()
    return found


@rocketmq4
@pytest.mark.parametrize("lose_commit", [False, True], ids=["commit", "check-back"])
def test_java_bank1_4x_transactional_reaches_the_python_remoting_client(
    java: Java, rocketmq4_namesrv: str, lose_commit: bool,
) -> None:
    prefix = unique("jx4e") + "-"
    args = ["produce", "--api", "4", "--address", rocketmq4_namesrv, "--topic", TX_TOPIC4,
            "--count", "3", "--prefix", prefix, "--transactional"]
    if lose_commit:
        args += ["--lose-commit", "--check-timeout", "90"]
    sent = java.run(*args, timeout=150)
    assert sent.rc == 0, sent.explain()
    msg_ids = {e["txNo"]: e["msgId"] for e in sent.of("sent")}
    assert set(msg_ids) == tx_nos(prefix, 3)

    messages = pulled(rocketmq4_namesrv, TX_TOPIC4, prefix, 3, timeout=60)
    by_tx = {json.loads(m.body)["txNo"]: m for m in messages}
    assert sorted(json.loads(m.body)["txNo"] for m in messages) == sorted(msg_ids), messages
    for tx_no, m in by_tx.items():
        assert json.loads(m.body) == {"accountNo": "1", "amount": 100.5, "txNo": tx_no}
        assert m.properties["traceId"] == f"trace-{tx_no}"
        assert m.properties["KEYS"] == f"{tx_no} {JAVA_ACCOUNT}"
        assert m.properties["TAGS"] == "transfer"
        assert m.msg_id == msg_ids[tx_no]  # the id the Java producer was given
        assert m.properties.get("TRAN_MSG") == "true"


@rocketmq4
def test_java_bank1_4x_transactional_to_python_bank2_applies_each_transfer_once(
    java: Java, rocketmq4_namesrv: str, bank2_factory: Any,
) -> None:
    # The 4.x RocketMQSubscriber (remoting consumer-group member) as bank2.
    prefix = unique("jx4f") + "-"
    sent = java.run("produce", "--api", "4", "--address", rocketmq4_namesrv,
                    "--topic", TX_TOPIC4, "--count", "3", "--repeat", "2",
                    "--prefix", prefix, "--transactional", timeout=120)
    assert sent.rc == 0, sent.explain()
    config = RocketMQConfig(namesrv=rocketmq4_namesrv)
    bank2 = bank2_factory(config, TX_TOPIC4, DLQ_TOPIC4)
    wanted = tx_nos(prefix, 3)
    bank2.run_until(wanted, copies=2, timeout=90)
    assert_java_transfers_applied_once(bank2, wanted, copies=2)



@rocketmq4
def test_python_4x_messages_can_be_looked_up_by_id_from_java(
    java: Java, rocketmq4_namesrv: str, tmp_path: Path,
) -> None:
    # Java (and the console, and mqadmin queryMsgByUniqueKey) read a store time out
    # of the message id (UNIQ_KEY) and search the index from there: the remoting
    # client builds its ids in the Java layout, so they are found.
    # Control: the Java producer's own ids are found.
    prefix = unique("jx4v") + "-"
    sent = java.run("produce", "--api", "4", "--address", rocketmq4_namesrv, "--topic",
                    TX_TOPIC4, "--count", "2", "--prefix", prefix, timeout=120)
    assert sent.rc == 0, sent.explain()
    java_ids = [e["msgId"] for e in sent.of("sent")]
    viewed = java.run("view", "--address", rocketmq4_namesrv, "--topic", TX_TOPIC4,
                      "--msg-id", ",".join(java_ids), timeout=120)
    assert viewed.rc == 0, viewed.explain()

    # The Python bank1's messages, looked up by the id they carry (UNIQ_KEY).
    config = RocketMQConfig(namesrv=rocketmq4_namesrv, producer_group=group_name("py-bank1"))
    adapter = RocketMQTransactionalProducer(config, [TX_TOPIC4])
    bank1 = python_bank1(f"sqlite:///{tmp_path}/py-bank1.db", adapter, TX_TOPIC4)
    py_prefix = unique("py4v") + "-"
    try:
        for i in range(8):
            bank1.transfer(f"{py_prefix}{i}", "1", decimal.Decimal("1.50"))
    finally:
        adapter.close()
    stored = pulled(rocketmq4_namesrv, TX_TOPIC4, py_prefix, 8, timeout=60)
    assert len(stored) == 8
    ids = [m.msg_id for m in stored]
    viewed = java.run("view", "--address", rocketmq4_namesrv, "--topic", TX_TOPIC4,
                      "--msg-id", ",".join(ids), timeout=120)
    missing = [e for e in viewed.of("viewed") if not e["found"]]
    assert not missing, f"{len(missing)} of {len(ids)} not found by id: {missing}"
