"""Retention: sent outbox rows, inbox rows, log rows and queue rows go in bounded batches."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select, update

from outbox import ConfigurationError, Message, Relay, RelayConfig, SqlTransport
from outbox.schema import DEAD, PENDING, SENT, inbox, outbox_messages, transaction_log, utcnow
from outbox.sql_transport import deliveries
from outbox.sql_transport import messages as queue
from outbox.storage import purge, purge_inbox, purge_transaction_log

from .helpers import RecordingPublisher, add_messages

DAY = dt.timedelta(days=1)


@pytest.fixture
def deletes(engine: Engine) -> Iterator[list[tuple[str, int]]]:
    """(table, rows deleted) for every DELETE statement run on the engine."""
    seen: list[tuple[str, int]] = []

    def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
              executemany: bool) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            table = statement.split()[2].strip('`"')
            seen.append((table, cursor.rowcount))

    event.listen(engine, "after_cursor_execute", after)
    yield seen
    event.remove(engine, "after_cursor_execute", after)


def set_rows(engine: Engine, ids: list[str], **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(outbox_messages).where(outbox_messages.c.message_id.in_(ids))
                     .values(**values))


def ids_by_status(engine: Engine) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {PENDING: [], SENT: [], DEAD: []}
    with engine.connect() as conn:
        for mid, status in conn.execute(select(outbox_messages.c.message_id,
                                               outbox_messages.c.status)
                                        .order_by(outbox_messages.c.seq)):
            out[status].append(mid)
    return out


def test_relay_purges_old_sent_rows_in_bounded_batches(
    engine: Engine, deletes: list[tuple[str, int]]
) -> None:
    now = utcnow()
    old = [f"old-{i:02d}" for i in range(23)]
    add_messages(engine, [Message(topic="t", id=i, payload=b"{}") for i in
                          [*old, "recent", "pending", "dead"]])
    set_rows(engine, old, status=SENT, sent_at=now - 8 * DAY)
    set_rows(engine, ["recent"], status=SENT, sent_at=now - DAY)
    set_rows(engine, ["dead"], status=DEAD, created_at=now - 30 * DAY)

    relay = Relay(engine, RecordingPublisher(), RelayConfig(retention=7 * DAY, purge_batch_size=10))
    assert relay.purge() == 23
    assert ids_by_status(engine) == {PENDING: ["pending"], SENT: ["recent"], DEAD: ["dead"]}
    assert [n for table, n in deletes if table == "outbox_messages"] == [10, 10, 3]
    assert relay.purge() == 0


def test_relay_loop_purges_and_delete_sent_leaves_nothing_to_purge(engine: Engine) -> None:
    add_messages(engine, [Message(topic="t", id="a", payload=b"{}")])
    relay = Relay(engine, RecordingPublisher(), RelayConfig(retention=dt.timedelta(0)))
    relay.drain(timeout=10)
    assert ids_by_status(engine)[SENT] == ["a"]
    assert relay.purge() == 1
    assert ids_by_status(engine) == {PENDING: [], SENT: [], DEAD: []}


def test_one_purge_call_deletes_at_most_one_batch(engine: Engine) -> None:
    ids = [f"m-{i}" for i in range(5)]
    add_messages(engine, [Message(topic="t", id=i, payload=b"{}") for i in ids])
    set_rows(engine, ids, status=SENT, sent_at=utcnow() - DAY)
    with engine.begin() as conn:
        assert purge(conn, sent_before=utcnow(), batch_size=2) == 2
    assert ids_by_status(engine)[SENT] == ids[2:]  # oldest first


def test_inbox_rows_are_purged_in_bounded_batches(
    engine: Engine, deletes: list[tuple[str, int]]
) -> None:
    now = utcnow()
    rows = [{"consumer_group": g, "message_id": f"m-{i}", "processed_at": now - 10 * DAY}
            for g in ("bank2", "audit") for i in range(12)]
    rows += [{"consumer_group": "bank2", "message_id": f"new-{i}", "processed_at": now}
             for i in range(3)]
    with engine.begin() as conn:
        conn.execute(insert(inbox), rows)

    purged = []
    while True:
        with engine.begin() as conn:
            n = purge_inbox(conn, processed_before=now - DAY, batch_size=5)
        purged.append(n)
        if n < 5:
            break
    assert purged == [5, 5, 5, 5, 4]
    assert [n for table, n in deletes if table == "outbox_inbox"] == [5, 5, 5, 5, 4]
    with engine.connect() as conn:
        left = conn.execute(select(inbox.c.consumer_group, inbox.c.message_id)
                            .order_by(inbox.c.message_id)).all()
    assert [tuple(r) for r in left] == [("bank2", f"new-{i}") for i in range(3)]


def test_transaction_log_rows_are_purged_in_bounded_batches(engine: Engine) -> None:
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(insert(transaction_log), [
            {"transaction_id": f"tx-{i}", "message_id": f"tx-{i}", "topic": "t",
             "created_at": now - (10 * DAY if i < 7 else dt.timedelta(0))}
            for i in range(9)
        ])
        assert purge_transaction_log(conn, created_before=now - DAY, batch_size=4) == 4
        assert purge_transaction_log(conn, created_before=now - DAY, batch_size=4) == 3
        assert purge_transaction_log(conn, created_before=now - DAY, batch_size=4) == 0
        assert conn.scalar(select(func.count()).select_from(transaction_log)) == 2


def test_sql_transport_purges_old_queue_rows_with_their_deliveries(
    engine: Engine, deletes: list[tuple[str, int]]
) -> None:
    transport = SqlTransport(engine)
    publisher = transport.publisher()
    for i in range(7):
        publisher.publish(Message(topic="t", id=f"m-{i}", payload=b"{}"))
    sub = transport.subscriber("t", "g")
    for d in sub.fetch(10, 1.0):
        sub.ack(d)
    with engine.begin() as conn:
        conn.execute(update(queue).where(queue.c.message_id != "m-6")
                     .values(created_at=utcnow() - 3 * DAY))

    assert transport.purge(older_than=DAY, batch_size=4) == 6
    with engine.connect() as conn:
        assert list(conn.scalars(select(queue.c.message_id))) == ["m-6"]
        assert conn.scalar(select(func.count()).select_from(deliveries)) == 1
    assert [n for table, n in deletes if table == "outbox_transport_messages"] == [4, 2]
    with pytest.raises(ConfigurationError, match="batch_size must be at least 1"):
        transport.purge(older_than=DAY, batch_size=0)
