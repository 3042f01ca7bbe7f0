"""OpenTelemetry over the seam, in one process (the SDK's in-memory exporter): the
business call's trace context is written with the message, the relay's publish span
links to it, the consumer's span continues it, and a handler's error is on its span."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox import IdempotentConsumer, Outbox, RelayConfig, create_engine, instrument, metadata
from outbox.testing import InMemoryBroker
from outbox.tracing import TracingObserver


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with instrument.observing(TracingObserver(provider)):
        yield provider, exporter
    provider.shutdown()


def sqlite(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    return engine


def test_one_trace_from_the_business_call_to_the_handler(
        traced: tuple[TracerProvider, InMemorySpanExporter], tmp_path: Path) -> None:
    provider, exporter = traced
    bank1, bank2 = sqlite(tmp_path / "bank1.db"), sqlite(tmp_path / "bank2.db")
    app = Outbox(bank1)
    tracer = provider.get_tracer("test")
    with (tracer.start_as_current_span("POST /transfers") as request,
          Session(bank1) as session, session.begin()):
        message = app.send(session, topic="transfers", payload={"n": 1}, message_id="T-1")
    assert message.headers["traceparent"].split("-")[1] == f"{request.context.trace_id:032x}"
    broker = InMemoryBroker()
    app.relay(broker, config=RelayConfig(batch_size=10)).run_once()
    assert broker.published[0].headers["traceparent"] == message.headers["traceparent"]

    def credit(session: Any, msg: Any) -> None:
        with tracer.start_as_current_span("credit"):
            pass

    IdempotentConsumer(bank2, broker.subscriber("transfers", "bank2"), "bank2",
                       credit).run_once(wait_seconds=0)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    publish, consume, handler = spans["outbox.publish"], spans["outbox.consume"], spans["credit"]
    trace_id = request.context.trace_id
    assert publish.kind is SpanKind.PRODUCER
    assert publish.context.trace_id != trace_id  # the relay's own work ...
    assert [link.context.span_id for link in publish.links] == [request.context.span_id]
    assert consume.kind is SpanKind.CONSUMER
    assert consume.context.trace_id == trace_id  # ... the consumer continues the call
    assert consume.parent is not None and consume.parent.span_id == request.context.span_id
    assert handler.parent is not None and handler.parent.span_id == consume.context.span_id
    assert consume.attributes is not None
    assert consume.attributes["messaging.consumer.group.name"] == "bank2"
    assert consume.attributes["messaging.message.id"] == "T-1"
    assert consume.attributes["messaging.destination.name"] == "transfers"
    bank1.dispose()
    bank2.dispose()


def test_no_current_span_writes_no_header_and_a_failing_handler_is_on_its_span(
        traced: tuple[TracerProvider, InMemorySpanExporter], tmp_path: Path) -> None:
    _, exporter = traced
    bank1, bank2 = sqlite(tmp_path / "bank1.db"), sqlite(tmp_path / "bank2.db")
    app = Outbox(bank1)
    with Session(bank1) as session, session.begin():
        message = app.send(session, topic="transfers", payload={}, message_id="T-2")
    assert "traceparent" not in message.headers
    broker = InMemoryBroker()
    app.relay(broker).run_once()

    def failing(session: Any, msg: Any) -> None:
        raise RuntimeError("no such account")

    IdempotentConsumer(bank2, broker.subscriber("transfers", "bank2"), "bank2",
                       failing).run_once(wait_seconds=0)
    [consume] = [s for s in exporter.get_finished_spans() if s.name == "outbox.consume"]
    assert consume.parent is None  # nothing to continue: a trace of its own
    # The consumer handles the error (retry later): the span says so in an event.
    events = [e for e in consume.events if e.name == "outbox.retried"]
    assert events and "no such account" in str(events[0].attributes)
    assert consume.status.status_code is not StatusCode.OK
    bank1.dispose()
    bank2.dispose()
