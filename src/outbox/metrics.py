"""Prometheus metrics (the ``prometheus`` extra: ``pip install 'outbox[prometheus]'``).

Two parts, used together or apart:

- :class:`PrometheusObserver` plugs into :mod:`outbox.instrument` and counts every
  event (by topic, and by consumer group on the receiving side), with histograms of
  the publish latency, the delay from a message's creation to its publish, and the
  handler's duration.
- :class:`TableCollector` reads the tables when Prometheus scrapes (one grouped query
  per table, on the indexed status columns): pending rows and the age of the oldest
  pending row per topic (the relay's lag), dead rows, parked keys, consumer dead
  letters, and the SQL transport's deliveries not yet processed.

``serve(port, engines=...)`` does both and serves ``/metrics`` from a thread; it is what
``outbox relay --metrics-port N`` calls. :data:`METRICS` names every metric.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import REGISTRY, Collector
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "outbox.metrics needs prometheus-client: pip install 'outbox[prometheus]'"
    ) from exc

from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Engine

from . import instrument, storage
from .db import safe_url
from .errors import ConfigurationError
from .instrument import Event, Observer
from .log import get_logger
from .schema import consumer_dead_letters

log = get_logger("outbox.metrics")

#: Counters: event name -> (metric name without ``_total``, help, labels).
COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    instrument.WRITTEN: ("outbox_messages_written", "Messages written to the outbox "
                         "(or a half message's transaction log) and committed", ("topic",)),
    instrument.CLAIMED: ("outbox_messages_claimed", "Outbox rows claimed by a relay", ()),
    instrument.PUBLISHED: ("outbox_messages_published", "Messages published and "
                           "acknowledged by the broker", ("topic",)),
    instrument.PUBLISH_FAILED: ("outbox_publish_failures", "Publishes that failed and "
                                "will be tried again", ("topic",)),
    instrument.DEAD: ("outbox_messages_dead", "Outbox rows that ran out of attempts",
                      ("topic",)),
    instrument.PARKED: ("outbox_keys_parked", "Keys held back behind a dead row", ("topic",)),
    instrument.REPLAYED: ("outbox_messages_replayed", "Dead rows made pending again", ()),
    instrument.DISCARDED: ("outbox_messages_discarded", "Dead rows discarded", ()),
    instrument.PURGED: ("outbox_rows_purged", "Rows deleted by the retention purge", ()),
    instrument.DELIVERED: ("outbox_deliveries", "Deliveries fetched by a consumer",
                           ("topic", "group")),
    instrument.PROCESSED: ("outbox_deliveries_processed", "Deliveries applied and recorded "
                           "in the inbox", ("topic", "group")),
    instrument.DUPLICATE: ("outbox_deliveries_duplicate", "Deliveries already in the inbox, "
                           "acknowledged without applying them again", ("topic", "group")),
    instrument.RETRIED: ("outbox_deliveries_retried", "Deliveries whose handler failed, "
                         "to be retried", ("topic", "group")),
    instrument.DEAD_LETTERED: ("outbox_deliveries_dead_lettered", "Deliveries given up on "
                               "and dead-lettered", ("topic", "group")),
    instrument.CHECK_BACK: ("outbox_check_backs", "Broker check-backs answered",
                            ("topic", "answer")),
}

HISTOGRAMS = {
    "outbox_publish_seconds": ("The publish call for one message (or its batch)", ("topic",)),
    "outbox_commit_to_publish_seconds": ("From a message's creation to the broker's receipt",
                                         ("topic",)),
    "outbox_handler_seconds": ("A consumer's inbox transaction with its handler",
                               ("topic", "group")),
}

GAUGES = {
    "outbox_pending_messages": "Outbox rows waiting to be published",
    "outbox_oldest_pending_seconds": "Age of the oldest pending outbox row (the relay's lag)",
    "outbox_dead_messages": "Outbox rows that ran out of attempts",
    "outbox_parked_keys": "Keys held back behind a dead outbox row",
    "outbox_consumer_dead_letters": "Dead letters kept in the consumer's database",
    "outbox_transport_unprocessed": "SQL transport messages a consumer group has not "
                                    "processed yet",
    "outbox_half_messages_near_check_limit": "Half messages whose check-backs passed two "
                                             "thirds of the broker's check limit",
}

#: Every metric name as Prometheus shows it (counters with their ``_total``).
METRICS: tuple[str, ...] = (
    *(f"{name}_total" for name, _, _ in COUNTERS.values()), *HISTOGRAMS, *GAUGES,
)

_LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
_DELAY = (.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class PrometheusObserver(Observer):
    """Counts the seam's events into ``registry`` (the default registry if None).

    ``check_limit`` is the broker's most check-backs for one half message (RocketMQ's
    ``transactionCheckMax``, 15 by default): a half message still unanswered after two
    thirds of it is in ``outbox_half_messages_near_check_limit``."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 check_limit: int = 15) -> None:
        if check_limit < 1:
            raise ValueError(f"check_limit must be at least 1, not {check_limit}")
        self.registry = registry if registry is not None else REGISTRY
        self.check_limit = check_limit
        self._near = math.ceil(check_limit * 2 / 3)
        self._counters = {
            event: (Counter(name, help_, labels, registry=self.registry), labels)
            for event, (name, help_, labels) in COUNTERS.items()
        }
        (self._publish, self._lag, self._handler) = (
            Histogram(name, help_, labels, registry=self.registry,
                      buckets=_DELAY if name == "outbox_commit_to_publish_seconds" else _LATENCY)
            for name, (help_, labels) in HISTOGRAMS.items()
        )
        self._children: dict[tuple[str | None, ...], tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()
        self._unanswered: dict[str, str] = {}  # message id -> topic, near the limit
        self.registry.register(_NearLimit(self))

    def event(self, event: Event) -> None:
        name = event.name
        key = (name, event.topic, event.group, event.answer)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = self._labelled(event)
        count, first, second = children
        count.inc(event.count)
        if first is not None and event.seconds is not None:
            first.observe(event.seconds)
        if second is not None and event.delay is not None:
            second.observe(max(event.delay, 0.0))
        if name == instrument.CHECK_BACK and event.message_id is not None:
            self._track_check(event)

    def _labelled(self, event: Event) -> tuple[Any, Any, Any]:
        """The metrics an event of this name and these labels goes to (looked up once:
        ``labels()`` is the costly part of counting)."""
        counter, labels = self._counters[event.name]
        values = [_label(getattr(event, label)) for label in labels]
        count = counter.labels(*values) if labels else counter
        topic = _label(event.topic)
        if event.name == instrument.PUBLISHED:
            return count, self._publish.labels(topic), self._lag.labels(topic)
        if event.name == instrument.PROCESSED:
            return count, self._handler.labels(topic, _label(event.group)), None
        return count, None, None

    def _track_check(self, event: Event) -> None:
        with self._lock:
            if event.answer == "UNKNOWN" and (event.checks or 0) >= self._near:
                self._unanswered[event.message_id or ""] = _label(event.topic)
            else:
                self._unanswered.pop(event.message_id or "", None)

    def near_limit(self) -> dict[str, int]:
        """Half messages near the check limit, per topic."""
        out: dict[str, int] = {}
        with self._lock:
            for topic in self._unanswered.values():
                out[topic] = out.get(topic, 0) + 1
        return out


class _NearLimit(Collector):
    def __init__(self, observer: PrometheusObserver) -> None:
        self.observer = observer

    def collect(self) -> Iterator[GaugeMetricFamily]:
        name = "outbox_half_messages_near_check_limit"
        g = GaugeMetricFamily(name, GAUGES[name], labels=["topic"])
        for topic, n in sorted(self.observer.near_limit().items()):
            g.add_metric([topic], n)
        yield g


def _label(value: object) -> str:
    return "" if value is None else str(value)


class TableCollector(Collector):
    """Gauges read from the outbox's tables at each scrape, for each named engine.

    ``engines`` maps a name (the ``db`` label; the URL without its password if you
    pass a list) to a sync engine. A database that cannot be read leaves its gauges out
    of that scrape and logs why; the scrape goes on."""

    def __init__(self, engines: Mapping[str, Engine] | Sequence[Engine], *,
                 clock: Any = None) -> None:
        if isinstance(engines, Mapping):
            self.engines = dict(engines)
        else:
            self.engines = {safe_url(e.url): e for e in engines}
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None))

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # read at scrape time only, not when registered

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "outbox_pending_messages": ["db", "topic"],
            "outbox_oldest_pending_seconds": ["db", "topic"],
            "outbox_dead_messages": ["db", "topic"],
            "outbox_parked_keys": ["db", "topic"],
            "outbox_consumer_dead_letters": ["db", "group"],
            "outbox_transport_unprocessed": ["db", "topic", "group"],
        }
        out = {name: GaugeMetricFamily(name, GAUGES[name], labels=labels)
               for name, labels in families.items()}
        for name, engine in self.engines.items():
            try:
                self._read(name, engine, out)
            except Exception as exc:
                log.warning("metrics_tables_unreadable", db=name,
                            error=f"{type(exc).__name__}: {exc}")
        yield from out.values()

    def _read(self, db: str, engine: Engine, out: dict[str, GaugeMetricFamily]) -> None:
        now = self.clock()
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            for t in storage.topic_backlog(conn):
                if t.pending:
                    out["outbox_pending_messages"].add_metric([db, t.topic], t.pending)
                    oldest = t.oldest_pending
                    age = max((now - oldest).total_seconds(), 0.0) if oldest else 0.0
                    out["outbox_oldest_pending_seconds"].add_metric([db, t.topic], age)
                if t.dead:
                    out["outbox_dead_messages"].add_metric([db, t.topic], t.dead)
                    out["outbox_parked_keys"].add_metric([db, t.topic], t.parked_keys)
            if consumer_dead_letters.name in tables:
                c = consumer_dead_letters.c
                for group, n in conn.execute(
                        select(c.consumer_group, func.count()).group_by(c.consumer_group)):
                    out["outbox_consumer_dead_letters"].add_metric([db, group], n)
            from . import sql_queue

            if sql_queue.cursors.name in tables:
                for name, group, n in sql_queue.unprocessed(conn):
                    out["outbox_transport_unprocessed"].add_metric([db, name, group], n)
            conn.rollback()


def serve(port: int, *, engines: Mapping[str, Engine] | Sequence[Engine] = (),
          host: str = "127.0.0.1", registry: CollectorRegistry | None = None,
          check_limit: int = 15) -> tuple[Any, PrometheusObserver]:
    """Count the seam's events and serve ``/metrics`` (with the table gauges of
    ``engines``) on ``host:port`` from a daemon thread. Returns the server (its
    ``shutdown()`` stops it) and the observer (``instrument.remove_observer`` it when
    done)."""
    registry = registry if registry is not None else CollectorRegistry()
    observer = PrometheusObserver(registry, check_limit=check_limit)
    if engines:
        registry.register(TableCollector(engines))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    instrument.add_observer(observer)
    log.info("metrics_serving", url=f"http://{host}:{server.server_port}/metrics")
    return server, observer


@contextlib.contextmanager
def serving(port: int, *, host: str = "127.0.0.1",
            engines: Mapping[str, Engine] | Sequence[Engine] = (),
            option: str = "port") -> Iterator[int]:
    """:func:`serve` for the duration of a ``with`` block (yields the port); the server
    and the observer go when it ends. A port that cannot be had is a
    :class:`~outbox.errors.ConfigurationError` that says so (naming ``option``)."""
    try:
        server, observer = serve(port, host=host, engines=engines)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); choose "
            f"another {option}") from exc
    try:
        yield int(server.server_port)
    finally:
        instrument.remove_observer(observer)
        server.shutdown()
        server.server_close()


__all__ = ["COUNTERS", "GAUGES", "HISTOGRAMS", "METRICS", "PrometheusObserver",
           "TableCollector", "serve", "serving"]
