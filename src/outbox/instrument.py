"""One seam where the framework says what happens: the instrumentation events.

Every component (the decorator, the relays, the consumers, the RocketMQ check-back)
announces its work here as :class:`Event` values. Metrics (``outbox.metrics``,
Prometheus) and tracing (``outbox.tracing``, OpenTelemetry) are observers of the
seam; a user plugs their own the same way::

    from outbox import instrument

    class Counting(instrument.Observer):
        def event(self, event: instrument.Event) -> None:
            print(event.name, event.topic, event.count)

    remove = instrument.add_observer(Counting())

With no observer the seam costs one truth test of a module-level tuple at each
point (``if instrument.observers:``); no :class:`Event` is built.

An observer's failure never reaches the framework's work: it is logged once per
observer and event name, and the work goes on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: A row written to the outbox (or a half message's transaction log) and committed.
WRITTEN = "written"
#: Rows claimed by a relay for publishing (``count``).
CLAIMED = "claimed"
#: A row published and acknowledged by the broker (``seconds``: the publish call's
#: time; ``delay``: from the message's creation to the broker's receipt).
PUBLISHED = "published"
#: A publish that failed and will be tried again (``attempt``, ``error``).
PUBLISH_FAILED = "publish_failed"
#: A row that ran out of attempts (``attempt``, ``error``); its key is parked.
DEAD = "dead"
#: A key held back behind a dead row (``key``).
PARKED = "parked"
#: Dead (or parked) rows made pending again (``count``).
REPLAYED = "replayed"
#: Dead rows discarded by an operator (``count``).
DISCARDED = "discarded"
#: Sent rows (and old inbox rows) deleted by the retention purge (``count``).
PURGED = "purged"
#: A delivery fetched by a consumer (``group``, ``attempt``: the broker's count).
DELIVERED = "delivered"
#: A delivery applied by its handler and recorded in the inbox (``seconds``).
PROCESSED = "processed"
#: A delivery already in the inbox: acknowledged, not applied again.
DUPLICATE = "duplicate"
#: A delivery whose handler failed, to be retried (``attempt``, ``error``, ``delay``).
RETRIED = "retried"
#: A delivery given up on and dead-lettered (``attempt``, ``error``).
DEAD_LETTERED = "dead_lettered"
#: A broker's check-back answered (``answer``: COMMIT, ROLLBACK or UNKNOWN;
#: ``checks``: the broker's count of checks, where it says).
CHECK_BACK = "check_back"

NAMES = (WRITTEN, CLAIMED, PUBLISHED, PUBLISH_FAILED, DEAD, PARKED, REPLAYED, DISCARDED,
         PURGED, DELIVERED, PROCESSED, DUPLICATE, RETRIED, DEAD_LETTERED, CHECK_BACK)


@dataclass(slots=True)
class Event:
    """One thing that happened. Fields that do not apply to an event are None.
    Every observer gets the same instance: read it, do not change it."""

    name: str
    topic: str | None = None
    message_id: str | None = None
    key: str | None = None
    #: The consumer group (receiving side).
    group: str | None = None
    count: int = 1
    attempt: int | None = None
    error: str | None = None
    #: How long it took: the publish call, or the handler with its inbox transaction.
    seconds: float | None = None
    #: From the message's creation to this event (published), or the retry delay.
    delay: float | None = None
    answer: str | None = None
    checks: int | None = None
    #: The message's headers, where the event concerns one message (for tracing).
    headers: Mapping[str, str] | None = None


class Observer:
    """The base of an observer: override what you need; everything else does nothing.

    ``event`` receives every :class:`Event`. ``span`` wraps a unit of work (the
    relay's publish of a message or batch, a consumer's handling of a delivery, a
    check-back) and may return a context manager to run it in (tracing); None is no
    span. ``parent`` and ``links`` are message headers, as in :func:`span`.
    ``context`` returns headers to write with a new message (a trace context).
    """

    def event(self, event: Event) -> None:
        pass

    def span(self, name: str, *, topic: str | None, message_id: str | None = None,
             group: str | None = None, parent: Mapping[str, str] | None = None,
             links: Sequence[Mapping[str, str]] = ()
             ) -> contextlib.AbstractContextManager[Any] | None:
        return None

    def context(self) -> Mapping[str, str]:
        return {}


#: The installed observers; read by every point of the seam, so it stays a tuple
#: (empty is false: nothing to do).
observers: tuple[Observer, ...] = ()
_lock = threading.Lock()
_reported: set[tuple[int, str]] = set()


def add_observer(observer: Observer) -> Callable[[], None]:
    """Install ``observer`` for the whole process; returns the function that removes it."""
    global observers
    if not isinstance(observer, Observer):
        raise TypeError(
            f"an observer must subclass outbox.instrument.Observer, not "
            f"{type(observer).__name__}; override its event (and span or context) methods"
        )
    with _lock:
        if observer not in observers:
            observers = (*observers, observer)

    def remove() -> None:
        remove_observer(observer)

    return remove


def remove_observer(observer: Observer) -> None:
    global observers
    with _lock:
        observers = tuple(o for o in observers if o is not observer)


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[Observer]:
    """``observer`` installed for the block (tests, a command's run)."""
    remove = add_observer(observer)
    try:
        yield observer
    finally:
        remove()


def _failed(observer: Observer, what: str, exc: BaseException) -> None:
    mark = (id(observer), what)
    if mark in _reported:
        return
    _reported.add(mark)
    from .log import get_logger  # late: the log module is not needed without observers

    get_logger("outbox.instrument").warning(
        "observer_failed", observer=type(observer).__name__, during=what,
        error=f"{type(exc).__name__}: {exc}")


def emit(name: str, **fields: Any) -> None:
    """Announce an event to every observer; call it behind ``if observers:``."""
    event = Event(name, **fields)
    for observer in observers:
        try:
            observer.event(event)
        except Exception as exc:
            _failed(observer, name, exc)


@contextlib.contextmanager
def span(name: str, *, topic: str | None, message_id: str | None = None,
         group: str | None = None, parent: Mapping[str, str] | None = None,
         links: Sequence[Mapping[str, str]] = ()) -> Iterator[None]:
    """The observers' spans around a unit of work, nested in install order.

    ``parent`` is the headers of the message whose trace the work continues (a
    consumer's handling); ``links`` those of the messages it concerns without
    continuing them (a relay's publish of a batch, a check-back)."""
    with contextlib.ExitStack() as stack:
        for observer in observers:
            try:
                cm = observer.span(name, topic=topic, message_id=message_id, group=group,
                                   parent=parent, links=links)
                if cm is not None:
                    stack.enter_context(cm)
            except Exception as exc:
                _failed(observer, name, exc)
        yield


def context_headers() -> dict[str, str]:
    """Headers the observers want written with a new message (a trace context)."""
    out: dict[str, str] = {}
    for observer in observers:
        try:
            out.update(observer.context())
        except Exception as exc:
            _failed(observer, "context", exc)
    return out


__all__ = [
    "CHECK_BACK", "CLAIMED", "DEAD", "DEAD_LETTERED", "DELIVERED", "DISCARDED",
    "DUPLICATE", "NAMES", "PARKED", "PROCESSED", "PUBLISHED", "PUBLISH_FAILED",
    "PURGED", "REPLAYED", "RETRIED", "WRITTEN", "Event", "Observer", "add_observer",
    "context_headers", "emit", "observers", "observing", "remove_observer", "span",
]
