"""OpenTelemetry tracing over the instrumentation seam (the ``tracing`` extra:
``pip install 'outbox[tracing]'``, which is ``opentelemetry-api``; bring your own SDK).

Install it once per process::

    from outbox import instrument
    from outbox.tracing import TracingObserver

    instrument.add_observer(TracingObserver())   # the global tracer provider

- **Write:** the trace context of the business call (W3C ``traceparent`` and
  ``tracestate``, from the current span) is written into the message's headers, so it
  travels in each broker's native headers (Kafka and AMQP headers, NATS headers,
  stream fields, RocketMQ user properties).
- **Publish:** the relay's span ``outbox.publish`` (kind PRODUCER) *links* to the trace of
  each message it publishes (a batch links to all of them): the relay works for many
  business calls at once, later, so it is not their child.
- **Consume:** the consumer's span ``outbox.consume`` (kind CONSUMER) *continues* the
  message's trace; it covers the inbox transaction, the handler and the acknowledgement,
  so the handler's own spans (and the messages it sends) are in the same trace.
- **Check-back:** a RocketMQ check-back gets its span ``outbox.check_back`` linked to
  the half message's trace.

Spans carry ``messaging.system`` (``outbox``), ``messaging.destination.name`` (the
topic), ``messaging.message.id`` and, on the receiving side,
``messaging.consumer.group.name``. The consumer's outcome is an event on its span
(``outbox.processed``, ``outbox.duplicate``, ``outbox.retried``,
``outbox.dead_lettered``, with the attempt and the error); a retry or a dead letter
sets the span's status to ERROR.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "outbox.tracing needs opentelemetry-api: pip install 'outbox[tracing]'"
    ) from exc

from . import instrument
from .instrument import Event, Observer

_KINDS = {"outbox.publish": SpanKind.PRODUCER, "outbox.consume": SpanKind.CONSUMER,
          "outbox.check_back": SpanKind.SERVER}

#: Events recorded on the current span (the consumer's, where it handles a delivery).
_ON_SPAN = frozenset({instrument.PROCESSED, instrument.DUPLICATE, instrument.RETRIED,
                      instrument.DEAD_LETTERED})

#: The headers a trace context takes (W3C Trace Context).
TRACE_HEADERS = ("traceparent", "tracestate")


class TracingObserver(Observer):
    """Spans and trace-context headers for the seam; see the module's documentation.

    ``tracer_provider``: where the spans go (the global provider if None).
    ``propagator``: how the context is written into headers (W3C Trace Context if
    None; pass ``opentelemetry.propagate.get_global_textmap()`` to use the
    application's configured propagators)."""

    def __init__(self, tracer_provider: Any = None,
                 propagator: TextMapPropagator | None = None) -> None:
        self.tracer = trace.get_tracer("outbox", tracer_provider=tracer_provider)
        self.propagator = propagator or TraceContextTextMapPropagator()

    def event(self, event: Event) -> None:
        """A consumer's outcome (and a publish failure) on the span it happened in."""
        if event.name not in _ON_SPAN:
            return
        span = trace.get_current_span()
        if not span.is_recording():
            return
        attributes: dict[str, str | int | float] = {}
        for name in ("attempt", "error", "delay"):
            value = getattr(event, name)
            if value is not None:
                attributes[f"outbox.{name}"] = value
        span.add_event(f"outbox.{event.name}", attributes)
        if event.name in (instrument.RETRIED, instrument.DEAD_LETTERED):
            span.set_status(Status(StatusCode.ERROR, event.error or event.name))

    def context(self) -> Mapping[str, str]:
        carrier: dict[str, str] = {}
        if trace.get_current_span().get_span_context().is_valid:
            self.propagator.inject(carrier)
        return carrier

    def _span_context(self, headers: Mapping[str, str]) -> Any:
        ctx = self.propagator.extract(dict(headers))
        span_context = trace.get_current_span(ctx).get_span_context()
        return span_context if span_context.is_valid else None

    def span(self, name: str, *, topic: str | None, message_id: str | None = None,
             group: str | None = None, parent: Mapping[str, str] | None = None,
             links: Sequence[Mapping[str, str]] = ()
             ) -> contextlib.AbstractContextManager[Any] | None:
        attributes: dict[str, str] = {"messaging.system": "outbox"}
        if topic is not None:
            attributes["messaging.destination.name"] = topic
        if message_id is not None:
            attributes["messaging.message.id"] = message_id
        if group is not None:
            attributes["messaging.consumer.group.name"] = group
        found = (self._span_context(h) for h in links)
        span_links = [Link(c) for c in found if c is not None]
        ctx = None
        if parent is not None and self._span_context(parent) is not None:
            ctx = self.propagator.extract(dict(parent))
        return self.tracer.start_as_current_span(
            name, context=ctx, kind=_KINDS.get(name, SpanKind.INTERNAL),
            attributes=attributes, links=span_links)


__all__ = ["TRACE_HEADERS", "TracingObserver"]
