"""Metrics and traces for each of the example's processes, switched on by environment
variables that the demo sets for its children:

- ``BANK_TRANSFER_METRICS_PORT``: serve Prometheus metrics on 127.0.0.1 at that port
  (outbox.metrics: the seam's counters, and the table gauges of the process's
  database).
- ``BANK_TRANSFER_TRACE_DIR``: trace with OpenTelemetry (outbox.tracing, and bank1's
  HTTP requests), each finished span one JSON line in ``<dir>/<service>.jsonl``.

Without them nothing is installed.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from sqlalchemy import Engine

from outbox import instrument

METRICS_PORT_VAR = "BANK_TRANSFER_METRICS_PORT"
TRACE_DIR_VAR = "BANK_TRANSFER_TRACE_DIR"


def observe(service: str, engines: Mapping[str, Engine] | None = None) -> Callable[[], None]:
    """Install what the environment asks for in this process; returns what stops it."""
    stops: list[Callable[[], None]] = []
    port = os.environ.get(METRICS_PORT_VAR)
    if port:
        from outbox import metrics

        server, observer = metrics.serve(int(port), engines=dict(engines or {}))

        def stop_metrics() -> None:
            instrument.remove_observer(observer)
            server.shutdown()
            server.server_close()

        stops.append(stop_metrics)
    folder = os.environ.get(TRACE_DIR_VAR)
    if folder:
        stops.append(_trace(service, Path(folder)))

    def stop() -> None:
        for fn in reversed(stops):
            fn()

    return stop


def _trace(service: str, folder: Path) -> Callable[[], None]:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from outbox.tracing import TracingObserver

    folder.mkdir(parents=True, exist_ok=True)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(folder / f"{service}.jsonl")))
    trace.set_tracer_provider(provider)
    remove = instrument.add_observer(TracingObserver(provider))

    def stop() -> None:
        remove()
        provider.shutdown()

    return stop


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


class JsonLinesExporter(SpanExporter):
    """An OpenTelemetry span exporter writing one JSON object per finished span."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        with self._lock:
            for span in spans:
                ctx = span.context
                self._file.write(json.dumps({
                    "name": span.name,
                    "kind": span.kind.name,
                    "trace_id": _hex(ctx.trace_id, 32),
                    "span_id": _hex(ctx.span_id, 16),
                    "parent_span_id": _hex(span.parent.span_id, 16) if span.parent else None,
                    "links": [{"trace_id": _hex(link.context.trace_id, 32),
                               "span_id": _hex(link.context.span_id, 16)}
                              for link in span.links],
                    "attributes": dict(span.attributes or {}),
                    "status": span.status.status_code.name,
                }) + "\n")
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class TracingMiddleware:
    """An ASGI middleware: each HTTP request in a SERVER span that continues the
    caller's ``traceparent``, if it sends one (installed only while tracing)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not instrument.observers:
            await self.app(scope, receive, send)
            return
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        parent = TraceContextTextMapPropagator().extract(headers)
        tracer = trace.get_tracer("bank_transfer")
        name = f"{scope['method']} {scope['path']}"
        with tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER,
                                          attributes={"http.request.method": scope["method"],
                                                      "url.path": scope["path"]}):
            await self.app(scope, receive, send)


__all__ = ["METRICS_PORT_VAR", "TRACE_DIR_VAR", "JsonLinesExporter", "TracingMiddleware",
           "observe"]
