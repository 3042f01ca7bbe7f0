"""The instrumentation seam: what each component announces, observers that fail, and
the Prometheus observer and table gauges over it (SQLite files, the in-memory broker)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from outbox import (
    IdempotentConsumer,
    Outbox,
    Reject,
    RelayConfig,
    create_engine,
    instrument,
    metadata,
)
from outbox.aio import AsyncIdempotentConsumer
from outbox.instrument import Event, Observer
from outbox.metrics import METRICS, PrometheusObserver, TableCollector, serve
from outbox.schema import outbox_messages
from outbox.testing import InMemoryBroker

from .helpers import free_port, scrape_until


class Recording(Observer):
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.spans: list[tuple[str, str | None, Mapping[str, str] | None, int]] = []

    def event(self, event: Event) -> None:
        self.events.append(event)

    def span(self, name: str, *, topic: str | None, message_id: str | None = None,
             group: str | None = None, parent: Mapping[str, str] | None = None,
             links: Sequence[Mapping[str, str]] = ()) -> Any:
        self.spans.append((name, message_id, parent, len(links)))
        return contextlib.nullcontext()

    def context(self) -> Mapping[str, str]:
        return {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}

    def names(self) -> list[str]:
        return [e.name for e in self.events]


@pytest.fixture
def recording() -> Iterator[Recording]:
    with instrument.observing(Recording()) as observer:
        yield observer  # type: ignore[misc]


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def engine_of(app: Outbox) -> Engine:
    return app.engine  # type: ignore[no-any-return]


def send(app: Outbox, *ids: str, topic: str = "transfers", key: str | None = "k") -> None:
    with Session(engine_of(app)) as session, session.begin():
        for message_id in ids:
            app.send(session, topic=topic, payload={"id": message_id}, key=key,
                     message_id=message_id)


def test_no_observer_means_no_event_and_no_header(local: Engine) -> None:
    assert instrument.observers == ()
    app = Outbox(local)
    send(app, "m-1")
    broker = InMemoryBroker()
    assert app.relay(broker).run_once().published == 1
    assert "traceparent" not in broker.published[0].headers


def test_the_sending_side_announces_written_claimed_published_with_timings(
        local: Engine, recording: Recording) -> None:
    app = Outbox(local)
    send(app, "m-1", "m-2")
    broker = InMemoryBroker()
    app.relay(broker, config=RelayConfig(batch_size=10)).run_once()
    assert recording.names() == ["written", "written", "claimed", "published", "published"]
    written, claimed, published = recording.events[0], recording.events[2], recording.events[3]
    assert (written.topic, written.message_id, written.key) == ("transfers", "m-1", "k")
    assert claimed.count == 2
    assert published.message_id == "m-1"
    assert published.seconds is not None and 0 <= published.seconds < 5
    assert published.delay is not None and 0 <= published.delay < 60
    # The observer's context travels with the message; the publish span links to it.
    assert broker.published[0].headers["traceparent"].startswith("00-0af7")
    assert ("outbox.publish", None, None, 2) in recording.spans  # one batch, two links


def test_failures_dead_rows_parked_keys_and_operator_work_are_announced(
        local: Engine, recording: Recording) -> None:
    app = Outbox(local)
    send(app, "m-1")
    broker = InMemoryBroker()
    relay = app.relay(broker, config=RelayConfig(max_attempts=2, batch_size=1))
    broker.fail_next(2)
    relay.run_once()
    with local.begin() as conn:
        conn.execute(update(outbox_messages).values(next_attempt_at=dt.datetime(2000, 1, 1)))
    relay.run_once()
    failed = [e for e in recording.events if e.name in ("publish_failed", "dead", "parked")]
    assert [(e.name, e.attempt) for e in failed] == [
        ("publish_failed", 1), ("dead", 2), ("parked", None)]
    assert failed[0].error is not None and "told to fail" in failed[0].error
    assert failed[2].key == "k"
    assert relay.replay() == 1
    assert recording.events[-1].name == "replayed" and recording.events[-1].count == 1


@pytest.fixture
def consumer_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'consumer.db'}")
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_the_receiving_side_announces_each_outcome_and_spans_the_handling(
        local: Engine, consumer_engine: Engine, recording: Recording) -> None:
    app = Outbox(local)
    broker = InMemoryBroker()
    send(app, "ok", "bad", "reject", key=None)
    app.relay(broker).run_once()
    broker.deliver_again("ok")
    seen: list[str] = []

    def handler(session: Any, message: Any) -> None:
        seen.append(message.id)
        if message.id == "bad":
            raise RuntimeError("try again")
        if message.id == "reject":
            raise Reject("not for us")

    consumer = IdempotentConsumer(consumer_engine, broker.subscriber("transfers", "g"), "g",
                                  handler)
    consumer.run_once(wait_seconds=0)
    received = [(e.name, e.message_id) for e in recording.events
                if e.group == "g" and e.name != "delivered"]
    assert received == [("processed", "ok"), ("retried", "bad"), ("dead_lettered", "reject"),
                        ("duplicate", "ok")], received
    processed = next(e for e in recording.events if e.name == "processed")
    assert processed.seconds is not None and processed.seconds >= 0
    retried = next(e for e in recording.events if e.name == "retried")
    assert retried.error is not None and "try again" in retried.error
    assert retried.delay is not None and retried.delay > 0
    # The consumer's span continues the message's trace (its headers are the parent).
    consume = [s for s in recording.spans if s[0] == "outbox.consume"]
    assert consume and all(s[2] is not None and "traceparent" in s[2] for s in consume)


def relayed(local: Engine, *ids: str) -> InMemoryBroker:
    """``ids`` sent through an outbox on ``local`` and relayed to an in-memory broker."""
    app = Outbox(local)
    broker = InMemoryBroker()
    send(app, *ids)
    app.relay(broker).run_once()
    return broker


def async_consumer(broker: InMemoryBroker, tmp_path: Path
                   ) -> tuple[Any, AsyncIdempotentConsumer]:
    """An asyncio consumer (group g, a handler that does nothing) of ``broker``'s
    transfers, on the consumer database the ``consumer_engine`` fixture made."""
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import create_async_engine

    async def handler(session: Any, message: Any) -> None:
        pass

    aengine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'consumer.db'}")
    return aengine, AsyncIdempotentConsumer(
        aengine, broker.async_subscriber("transfers", "g"), "g", handler)


def test_the_asyncio_consumer_announces_too(
        local: Engine, consumer_engine: Engine, tmp_path: Path,
        recording: Recording) -> None:
    broker = relayed(local, "a-1")

    async def main() -> None:
        aengine, consumer = async_consumer(broker, tmp_path)
        await consumer.run_once(wait_seconds=0)
        await aengine.dispose()

    asyncio.run(main())
    assert [e.name for e in recording.events if e.group == "g"] == ["delivered", "processed"]


class Broken(Observer):
    def event(self, event: Event) -> None:
        raise RuntimeError("observer bug")

    def span(self, name: str, **kw: Any) -> Any:
        raise RuntimeError("span bug")

    def context(self) -> Mapping[str, str]:
        raise RuntimeError("context bug")


def test_a_failing_observer_is_logged_once_and_the_work_goes_on(
        local: Engine, recording: Recording, caplog: pytest.LogCaptureFixture) -> None:
    with instrument.observing(Broken()):
        app = Outbox(local)
        send(app, "m-1", "m-2")
        broker = InMemoryBroker()
        assert app.relay(broker).run_once().published == 2
    assert len(broker.published) == 2
    assert recording.names().count("published") == 2  # the other observer still hears all
    failures = [r for r in caplog.records if "observer_failed" in r.getMessage()]
    # once per kind of failure (context, written, span, claimed, published), not per event
    assert 1 <= len(failures) <= 5, [r.getMessage() for r in failures]
    assert len({r.getMessage() for r in failures}) == len(failures)


def test_an_observer_must_subclass_the_base() -> None:
    with pytest.raises(TypeError, match=r"subclass outbox\.instrument\.Observer"):
        instrument.add_observer(object())  # type: ignore[arg-type]
    assert instrument.observers == ()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_prometheus_counts_events_and_histograms(local: Engine, consumer_engine: Engine
                                                 ) -> None:
    registry = CollectorRegistry()
    with instrument.observing(PrometheusObserver(registry)):
        app = Outbox(local)
        broker = InMemoryBroker()
        send(app, "m-1", "m-2")
        app.relay(broker).run_once()
        consumer = IdempotentConsumer(consumer_engine, broker.subscriber("transfers", "g"),
                                      "g", lambda session, message: None)
        consumer.run_once(wait_seconds=0)
    assert value(registry, "outbox_messages_written_total", topic="transfers") == 2
    assert value(registry, "outbox_messages_published_total", topic="transfers") == 2
    assert value(registry, "outbox_messages_claimed_total") == 2
    assert value(registry, "outbox_deliveries_processed_total", topic="transfers",
                 group="g") == 2
    assert value(registry, "outbox_publish_seconds_count", topic="transfers") == 2
    assert value(registry, "outbox_commit_to_publish_seconds_count", topic="transfers") == 2
    assert value(registry, "outbox_handler_seconds_count", topic="transfers", group="g") == 2


def test_check_backs_near_the_limit_are_a_gauge_until_answered() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry, check_limit=15)
    observer.event(Event("check_back", topic="t", message_id="h-1", answer="UNKNOWN", checks=9))
    assert value(registry, "outbox_half_messages_near_check_limit", topic="t") is None
    observer.event(Event("check_back", topic="t", message_id="h-1", answer="UNKNOWN",
                         checks=10))
    assert value(registry, "outbox_half_messages_near_check_limit", topic="t") == 1
    observer.event(Event("check_back", topic="t", message_id="h-1", answer="COMMIT",
                         checks=11))
    assert value(registry, "outbox_half_messages_near_check_limit", topic="t") is None
    assert value(registry, "outbox_check_backs_total", topic="t", answer="UNKNOWN") == 2
    with pytest.raises(ValueError, match="check_limit"):
        PrometheusObserver(CollectorRegistry(), check_limit=0)


def test_table_gauges_show_the_backlog_its_age_and_dead_rows(engine: Engine) -> None:
    app = Outbox(engine)
    send(app, "p-1", "p-2", topic="a")
    send(app, "d-1", topic="b", key="kb")
    with engine.begin() as conn:
        conn.execute(update(outbox_messages).where(outbox_messages.c.message_id == "p-1")
                     .values(created_at=dt.datetime(2000, 1, 1)))
        conn.execute(update(outbox_messages).where(outbox_messages.c.topic == "b")
                     .values(status="dead"))
    registry = CollectorRegistry()
    registry.register(TableCollector({"bank1": engine}))
    assert value(registry, "outbox_pending_messages", db="bank1", topic="a") == 2
    age = value(registry, "outbox_oldest_pending_seconds", db="bank1", topic="a")
    assert age is not None and age > 20 * 365 * 86400
    assert value(registry, "outbox_dead_messages", db="bank1", topic="b") == 1
    assert value(registry, "outbox_parked_keys", db="bank1", topic="b") == 1
    assert value(registry, "outbox_pending_messages", db="bank1", topic="b") is None


def test_an_unreadable_database_leaves_its_gauges_out(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    empty = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    registry = CollectorRegistry()
    registry.register(TableCollector({"empty": empty}))
    assert value(registry, "outbox_pending_messages", db="empty", topic="a") is None
    assert any("metrics_tables_unreadable" in r.getMessage() for r in caplog.records)
    empty.dispose()


def test_serve_answers_metrics_over_http(local: Engine) -> None:
    send(Outbox(local), "m-1")
    server, observer = serve(0, engines={"bank1": local})
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        instrument.remove_observer(observer)
    assert 'outbox_pending_messages{db="bank1",topic="transfers"} 1.0' in body
    for name in ("outbox_messages_published_total", "outbox_oldest_pending_seconds"):
        assert name in METRICS
    assert "# TYPE outbox_messages_written_total counter" in body


def test_a_running_consumer_serves_its_metrics(local: Engine, consumer_engine: Engine) -> None:
    app = Outbox(local)
    broker = InMemoryBroker()
    send(app, "c-1", "c-2")
    app.relay(broker).run_once()
    consumer = IdempotentConsumer(consumer_engine, broker.subscriber("transfers", "g"), "g",
                                  lambda session, message: None)
    port = free_port()
    runner = threading.Thread(target=consumer.run, kwargs={"metrics_port": port})
    runner.start()
    try:
        body = scrape_until(
            port, 'outbox_deliveries_processed_total{group="g",topic="transfers"} 2.0')
        assert "outbox_handler_seconds_count" in body
    finally:
        consumer.stop()
        runner.join(10)
    assert not runner.is_alive()
    with pytest.raises(OSError):  # the server went with the run
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_running_asyncio_consumer_serves_its_metrics(
        local: Engine, consumer_engine: Engine, tmp_path: Path) -> None:
    broker = relayed(local, "a-1")
    port = free_port()

    async def main() -> str:
        aengine, consumer = async_consumer(broker, tmp_path)
        task = asyncio.get_running_loop().create_task(consumer.run(metrics_port=port))
        try:
            return await asyncio.to_thread(
                scrape_until, port,
                'outbox_deliveries_processed_total{group="g",topic="transfers"} 1.0')
        finally:
            await consumer.stop()
            await task
            await aengine.dispose()

    assert "outbox_deliveries_total" in asyncio.run(main())
