"""The SQL transport shared by processes: another process publishes while this one consumes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections import Counter
from types import SimpleNamespace

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from outbox import ConsumerConfig, IdempotentConsumer, ReceivedMessage, SqlTransport

COUNT = 200

PUBLISHER = textwrap.dedent("""
    import sys, time, decimal
    import outbox
    url, count = sys.argv[1], int(sys.argv[2])
    engine = outbox.create_engine(url)
    publisher = outbox.SqlTransport(engine).publisher()
    codec = outbox.JsonCodec()
    for i in range(count):
        body = {"no": i, "amount": decimal.Decimal(i) / 100, "name": "李四"}
        publisher.publish(outbox.Message(topic="transfers", id=f"tx-{i:04d}", key=f"k{i % 5}",
                                         payload=codec.encode(body)))
        if i % 5 == 0:
            time.sleep(0.01)  # let the consumer catch up now and then
    # Two messages a second time, as a broker that redelivers would.
    for i in (3, 150):
        publisher.publish(outbox.Message(topic="transfers", id=f"tx-{i:04d}",
                                         payload=codec.encode({"dup": i})))
    engine.dispose()
""")


def test_consumer_here_applies_what_another_process_publishes(
    engine: Engine, db_url: str, tables: SimpleNamespace
) -> None:
    bodies: dict[str, object] = {}

    def handler(session: Session, message: ReceivedMessage) -> None:
        bodies[message.id] = message.body
        session.execute(tables.applied.insert().values(message_id=message.id, body="x"))

    transport = SqlTransport(engine, poll_interval=0.01)
    consumer = IdempotentConsumer(engine, transport.subscriber("transfers", "bank2"), "bank2",
                                  handler, config=ConsumerConfig(wait_seconds=0.05))
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, db_url, str(COUNT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    consumed_while_publishing = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = proc.poll() is None
            stats = consumer.run_once()
            if running:
                consumed_while_publishing += stats.processed
            elif transport.pending_count("transfers", "bank2") == 0:
                break
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err

    assert len(bodies) == COUNT
    assert bodies["tx-0042"] == {"no": 42, "amount": "0.42", "name": "李四"}
    assert (consumer.stats.processed, consumer.stats.duplicates) == (COUNT, 2)
    with engine.connect() as conn:
        applied = Counter(conn.scalars(select(tables.applied.c.message_id)))
    assert len(applied) == COUNT and set(applied.values()) == {1}
    assert consumed_while_publishing > 0  # the two processes really overlapped
