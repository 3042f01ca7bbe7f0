"""RocketMQ on the real broker (scripts/rocketmq up), each figure against a baseline
measured in the same run through the same client:

- ``halfmsg_vs_plain``: transfers per second through the transactional path (an
  ``outbox.Outbox`` with ``RocketMQTransactionalProducer`` on SQLite: half message,
  local transaction, commit, one call after the other) over plain ``Producer.send``
  of the same payload, one after the other.
- the check-back path under a backlog: K half messages whose local transaction
  committed but whose commit call was lost (the adapter's ``_end`` hook, as the
  tests simulate it); how long until the broker's check-backs resolved all of them,
  and how many check-backs per second the listener answered. The test broker checks
  every ``transactionCheckInterval`` (2 s) half messages older than
  ``transactionTimeOut`` (3 s) (see scripts/rocketmq).
- ``rocketmq_batch_vs_sequential``: ``RocketMQPublisher.publish_batch`` (concurrent
  sends, a key's messages in order) over ``publish`` one by one, raw and under the
  relay (which takes the batch path by default).

Everything goes to the MIXED topic ``outbox-bench`` (its own, so that the demo's and
the tests' consumer groups never read the bench's messages) with a tag and message ids of
this run's own (``outbox-bench-<run>``: a consumer's tag filter then skips earlier
runs on the broker); check-backs for other ids are answered "ask again",
so a demo running at the same time is not harmed (but its producer may answer this
run's check-backs, which then skews the figures: run the bench on a quiet broker).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, Engine, MetaData, Numeric, String, Table

import outbox
from outbox import Message, Relay, RelayConfig
from outbox.message import TransactionState
from outbox_rocketmq import RocketMQConfig, RocketMQPublisher, RocketMQTransactionalProducer
from outbox_rocketmq._client import client_configuration, rocketmq
from outbox_rocketmq.mapping import MESSAGE_ID_PROPERTY

from .common import Report, Timings, ratio

TOPIC = "outbox-bench"
TAG_PREFIX = "outbox-bench-"
#: The test broker's check-back timing (scripts/rocketmq's broker.conf).
CHECK_INTERVAL_S = 2.0
CHECK_AGE_S = 3.0

metadata = MetaData()
transfers = Table(
    "bench_transfers", metadata,
    Column("transfer_no", String(64), primary_key=True),
    Column("from_account", String(32), nullable=False),
    Column("to_account", String(32), nullable=False),
    Column("amount", Numeric(12, 2), nullable=False),
)


def reachable(endpoints: str) -> None:
    host, _, port = endpoints.split(";")[0].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except (OSError, ValueError) as exc:
        raise SystemExit(
            f"bench: the RocketMQ proxy {endpoints} is not reachable ({exc}); start it with "
            "scripts/rocketmq up") from None


class BenchProducer(RocketMQTransactionalProducer):
    """The delivery adapter, with this run's check-back answers timed, other runs'
    messages answered "ask again", and (when ``lose_end``) every commit call lost."""

    def __init__(self, *args: Any, prefix: str, tag: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefix = prefix
        self.tag = tag
        self.lose_end = False
        self.answers: list[tuple[float, str, TransactionState]] = []
        self.foreign = 0
        self._answers_lock = threading.Lock()

    def check(self, message: Message) -> TransactionState:
        if not message.id.startswith(self.prefix):
            self.foreign += 1
            return TransactionState.UNKNOWN  # not ours: its own producer answers
        state = super().check(message)
        with self._answers_lock:
            self.answers.append((time.perf_counter(), message.id, state))
        return state

    def _end(self, transaction: Any, state: TransactionState, message: Message) -> bool:
        if self.lose_end:
            return False  # as if the commit never reached the broker
        return super()._end(transaction, state, message)


def received_ids(config: RocketMQConfig, tag: str, wanted: set[str],
                 timeout: float) -> dict[str, int]:
    """How often each of ``wanted`` reached a fresh consumer group (``tag`` filtered)."""
    rmq = rocketmq()
    consumer = rmq.SimpleConsumer(
        client_configuration(config), "outbox-bench-" + secrets.token_hex(4),
        {TOPIC: rmq.FilterExpression(tag)}, 1)
    consumer.startup()
    seen: dict[str, int] = {}
    try:
        deadline = time.monotonic() + timeout
        settle: float | None = None
        while time.monotonic() < (settle or deadline):
            try:
                batch = consumer.receive(32, 15)
            except Exception:  # a young client's "settings null": not yet
                time.sleep(0.2)
                continue
            for r in batch or ():
                mid = dict(r.properties or {}).get(MESSAGE_ID_PROPERTY, "")
                if mid in wanted:
                    seen[mid] = seen.get(mid, 0) + 1
                consumer.ack(r)
            if settle is None and wanted <= set(seen):
                settle = time.monotonic() + 1.0  # late copies
    finally:
        consumer.shutdown()
    return seen


def halfmsg_vs_plain(report: Report, app: outbox.Outbox, adapter: BenchProducer,
                     transfer: Any, n: int) -> dict[str, Any]:
    producer = adapter._started()

    def body(no: str, i: int) -> dict[str, Any]:
        return {"transfer_no": no, "from_account": f"A{i % 50:03d}",
                "to_account": f"A{(i + 1) % 50:03d}", "amount": "100.00"}

    def plain(no: str, i: int) -> None:
        fields = body(no, i)
        message = app.message(topic=TOPIC, payload=fields, key=fields["from_account"],
                              message_id=no, tag=adapter.tag)
        producer.send(message)

    def half(no: str, i: int) -> None:
        transfer(**body(no, i))

    for i in range(20):  # warm-up: connections, routes, statements
        plain(f"{adapter.prefix}w-p{i}", i)
        half(f"{adapter.prefix}w-h{i}", i)
    rates: dict[str, float] = {}
    timings: dict[str, Timings] = {}
    for name, fn in (("plain", plain), ("half", half)):
        t = Timings()
        start = time.perf_counter()
        for i in range(n):
            one = time.perf_counter()
            fn(f"{adapter.prefix}{name}-{i}", i)
            t.add(time.perf_counter() - one)
        rates[name] = n / (time.perf_counter() - start)
        timings[name] = t
        report.progress(f"rocketmq: {n} {name} sends at {rates[name]:.0f}/s")
    value = ratio(rates["half"], rates["plain"])
    report.figure("halfmsg_vs_plain", value)
    report.row("rmq transfers/s (half msg + local tx + commit)", f"{rates['half']:.0f}",
               f"p50 {timings['half'].ms(50):.2f} ms, p99 {timings['half'].ms(99):.2f} ms")
    report.row("rmq plain sends/s (Producer.send)", f"{rates['plain']:.0f}",
               f"p50 {timings['plain'].ms(50):.2f} ms, p99 {timings['plain'].ms(99):.2f} ms")
    report.row("halfmsg_vs_plain", f"{value:.2f}", "transfers/s over plain sends/s")
    return {"n": n, "transfers_per_s": rates["half"], "plain_per_s": rates["plain"],
            "halfmsg_vs_plain": value, "half": timings["half"].summary(),
            "plain": timings["plain"].summary()}


def check_back_backlog(report: Report, config: RocketMQConfig, adapter: BenchProducer,
                       transfer: Any, k: int, patience: float) -> dict[str, Any]:
    ids = [f"{adapter.prefix}cb-{i}" for i in range(k)]
    adapter.lose_end = True
    try:
        start = time.perf_counter()
        for i, no in enumerate(ids):
            transfer(transfer_no=no, from_account=f"B{i % 50:03d}",
                     to_account=f"B{(i + 1) % 50:03d}", amount="5.00")
        created = time.perf_counter()
    finally:
        adapter.lose_end = False
    report.progress(f"rocketmq: {k} half messages left to check-back in "
                    f"{created - start:.1f} s; waiting for the broker")
    wanted = set(ids)

    def committed() -> set[str]:
        return {mid for _, mid, state in list(adapter.answers)
                if mid in wanted and state is TransactionState.COMMIT}

    deadline = created + patience
    while len(committed()) < k and time.perf_counter() < deadline:
        time.sleep(0.05)
    ours = [a for a in list(adapter.answers) if a[1] in wanted]
    done = committed()
    if not ours:
        raise SystemExit(f"bench: no check-back arrived within {patience:.0f} s; is the "
                         "broker the one scripts/rocketmq up starts (2 s check interval)?")
    first = min(t for t, _, _ in ours)
    last_commit = max((t for t, mid, s in ours if s is TransactionState.COMMIT), default=first)
    span = last_commit - first
    answered_per_s = len(ours) / span if span > 0 else float("nan")
    report.progress(f"rocketmq: {len(done)}/{k} committed by check-back; checking delivery")
    delivered = received_ids(config, adapter.tag, wanted, timeout=30)
    copies = sum(delivered.values())
    report.row(f"rmq check-back: {k} lost commits resolved in",
               f"{last_commit - created:.1f} s",
               f"after the backlog was written; first check-back after "
               f"{first - created:.1f} s (broker: every {CHECK_INTERVAL_S:g} s, "
               f"age >= {CHECK_AGE_S:g} s)")
    report.row("rmq check-backs answered/s", f"{answered_per_s:.0f}",
               f"{len(ours)} answers over {span:.2f} s, first to last commit")
    report.row("rmq check-back: resolved / delivered (copies)",
               f"{len(done)}/{len(delivered)} ({copies})",
               f"of {k}; a copy more is a check round racing its own commit")
    return {"k": k, "create_s": created - start, "first_check_after_s": first - created,
            "resolved_after_s": last_commit - created, "resolve_span_s": span,
            "answers": len(ours), "answered_per_s": answered_per_s,
            "committed": len(done), "delivered": len(delivered), "copies": copies,
            "foreign_check_backs": adapter.foreign,
            "broker_check_interval_s": CHECK_INTERVAL_S, "broker_check_age_s": CHECK_AGE_S}


class OneByOne:
    """A publisher without ``publish_batch``: what the relay did before it had one."""

    def __init__(self, inner: RocketMQPublisher) -> None:
        self.inner = inner

    def publish(self, message: Message) -> None:
        self.inner.publish(message)

    def close(self) -> None:
        pass


def bench_messages(prefix: str, n: int, keys: int, tag: str) -> list[Message]:
    payload = (b'{"transfer_no":"T-000000000","from_account":"1","to_account":"2",'
               b'"amount":"100.00","currency":"EUR"}')
    return [Message(topic=TOPIC, payload=payload, id=f"{prefix}{i}", key=f"k{i % keys}",
                    tag=tag) for i in range(n)]


def relay_rate(engine: Engine, publisher: Any, messages: Sequence[Message]) -> float:
    with engine.begin() as conn:
        for m in messages:
            outbox.storage.add_message(conn, m)
    relay = Relay(engine, publisher, RelayConfig(batch_size=100))
    start = time.perf_counter()
    published = relay.drain(timeout=300)
    took = time.perf_counter() - start
    if published != len(messages):
        raise SystemExit(f"bench: the relay published {published} of {len(messages)} rows")
    return published / took


def batch_rate(publisher: RocketMQPublisher, messages: Sequence[Message]) -> float:
    """msg/s of ``publish_batch`` in relay-sized batches of 100."""
    start = time.perf_counter()
    for i in range(0, len(messages), 100):
        publisher.publish_batch(messages[i:i + 100])
    return len(messages) / (time.perf_counter() - start)


def batch_vs_sequential(report: Report, config: RocketMQConfig, engine: Engine,
                        prefix: str, tag: str, n: int) -> dict[str, Any]:
    publisher = RocketMQPublisher(config, [TOPIC])

    def messages(name: str, count: int, keys: int) -> list[Message]:
        return bench_messages(prefix + name, count, keys, tag)

    try:
        for m in messages("w", 200, 50):  # warm-up
            publisher.publish(m)
        keys = 20  # a relay batch of 100 rows then holds 5 of each key
        seq_messages = messages("s", n, keys)
        start = time.perf_counter()
        for m in seq_messages:
            publisher.publish(m)
        sequential = n / (time.perf_counter() - start)
        batched = batch_rate(publisher, messages("b", n, keys))
        distinct = batch_rate(publisher, messages("d", n, n))
        report.progress(f"rocketmq: publish {sequential:.0f}/s one by one, "
                        f"{batched:.0f}/s in batches of 100 ({distinct:.0f}/s, distinct keys)")
        relay_one = relay_rate(engine, OneByOne(publisher), messages("r1", n, keys))
        relay_batch = relay_rate(engine, publisher, messages("rb", n, keys))
    finally:
        publisher.close()
    value = ratio(batched, sequential)
    relay_value = ratio(relay_batch, relay_one)
    report.figure("rocketmq_batch_vs_sequential", value)
    report.figure("rocketmq_relay_batch_vs_one_by_one", relay_value)
    report.row("rmq publish msg/s: one by one / batch of 100",
               f"{sequential:.0f}/{batched:.0f}",
               f"x{value:.2f}; {keys} keys: 5 sends in a row per key and batch")
    report.row("rmq publish msg/s: batch of 100, distinct keys", f"{distinct:.0f}",
               f"x{ratio(distinct, sequential):.2f}; all 100 at once")
    report.row("rmq relay msg/s: one by one / batch (default)",
               f"{relay_one:.0f}/{relay_batch:.0f}", f"x{relay_value:.2f}; SQLite outbox")
    return {"n": n, "keys": keys, "publish_sequential_per_s": sequential,
            "publish_batch_per_s": batched, "batch_vs_sequential": value,
            "publish_batch_distinct_keys_per_s": distinct,
            "relay_one_by_one_per_s": relay_one, "relay_batch_per_s": relay_batch,
            "relay_batch_vs_one_by_one": relay_value}


def run(report: Report, *, quick: bool, endpoints: str) -> None:
    reachable(endpoints)
    n = 200 if quick else 1000
    k = 50 if quick else 500
    config = RocketMQConfig(endpoints)
    run_id = secrets.token_hex(4)
    prefix, tag = f"bench-{run_id}-", TAG_PREFIX + run_id
    folder = tempfile.mkdtemp(prefix="outbox-bench-rmq-")
    engine = outbox.create_engine(f"sqlite:///{os.path.join(folder, 'bank.db')}")
    outbox.metadata.create_all(engine)
    metadata.create_all(engine)
    adapter = BenchProducer(config, [TOPIC], prefix=prefix, tag=tag)
    app = outbox.Outbox(engine, delivery=adapter,
                        local_transaction_timeout=dt.timedelta(seconds=30))

    @app.transactional_message(topic=TOPIC, message_id="transfer_no", key="from_account",
                               tag=tag)
    def transfer(session: Any, transfer_no: str, from_account: str, to_account: str,
                 amount: str) -> None:
        session.execute(transfers.insert().values(
            transfer_no=transfer_no, from_account=from_account, to_account=to_account,
            amount=amount))

    details: dict[str, Any] = {"endpoints": endpoints, "topic": TOPIC, "tag": tag,
                               "db": "sqlite"}
    try:
        report.progress(f"rocketmq: {endpoints}, topic {TOPIC}, run {prefix.rstrip('-')}")
        try:
            adapter.start()
            adapter._started().send(app.message(
                topic=TOPIC, payload={"probe": True}, message_id=prefix + "probe", tag=tag))
        except outbox.OutboxError as exc:
            raise SystemExit(f"bench: RocketMQ at {endpoints} does not take sends ({exc}); "
                             "run scripts/rocketmq up (it also creates the topics)") from None
        details["halfmsg_vs_plain"] = halfmsg_vs_plain(report, app, adapter, transfer, n)
        details["check_back"] = check_back_backlog(report, config, adapter, transfer, k,
                                                   patience=30 if quick else 90)
        details["batch"] = batch_vs_sequential(report, config, engine, prefix, tag,
                                               1000 if quick else 5000)
    finally:
        report.detail("rocketmq", details)
        adapter.close()
        engine.dispose()
        shutil.rmtree(folder, ignore_errors=True)
