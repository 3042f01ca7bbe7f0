"""Fault hooks of the example's processes, armed only by environment variables.

``BANK_TRANSFER_CRASH="point:probability,..."`` names the points at which the
process kills itself (``SIGKILL``: no cleanup, no flush, exactly like a power cut
of one process) with that probability; ``BANK_TRANSFER_CRASH_SEED`` seeds the draw
so that a run can be replayed; ``BANK_TRANSFER_FAULT_LOG`` is a file to which
every fault is appended before it happens, so the harness can count faults
without trusting anything the process says after it died. Unset, every hook here
returns what it was given and the services behave as usual.

Points:

- bank1, any adapter: ``before_commit``, ``after_commit`` (the local transaction);
- bank1, half messages: ``before_half_send``, ``after_half_send``,
  ``before_end``, ``after_end`` (the end-transaction call);
- relay: ``relay_mid_batch`` (after part of a batch was published, before the
  rows are marked sent);
- bank2: ``before_ack`` (after the business commit), and ``handler_fail`` (the
  handler raises before doing anything: not a crash, a retryable failure).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from outbox import Delivery, Message, ReceivedMessage
from outbox.consumer import Handler
from outbox.transport import SubscriberWrapper
from outbox.typing import BatchPublisher, Publisher, Subscriber
from outbox_rocketmq import RocketMQTransactionalProducer
from outbox_rocketmq.halfsend import HalfSender

CRASH_ENV = "BANK_TRANSFER_CRASH"
SEED_ENV = "BANK_TRANSFER_CRASH_SEED"
LOG_ENV = "BANK_TRANSFER_FAULT_LOG"

BANK1_POINTS = ("before_commit", "after_commit", "before_half_send", "after_half_send",
                "before_end", "after_end")
RELAY_POINTS = ("relay_mid_batch",)
BANK2_POINTS = ("before_ack", "handler_fail")
POINTS = (*BANK1_POINTS, *RELAY_POINTS, *BANK2_POINTS)


def parse_spec(spec: str) -> dict[str, float]:
    """``"a:0.1,b:0.2"`` -> ``{"a": 0.1, "b": 0.2}``; unknown points are an error."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, prob = part.partition(":")
        if point not in POINTS:
            raise ValueError(f"unknown crash point {point!r}; known: {', '.join(POINTS)}")
        out[point] = float(prob or "1")
    return out


def format_spec(points: dict[str, float]) -> str:
    return ",".join(f"{p}:{q:g}" for p, q in points.items())


class Faults:
    """The armed points of this process and the seeded draw deciding each time."""

    def __init__(self, points: dict[str, float], seed: int, log_path: str | None) -> None:
        self.points = points
        self.random = random.Random(seed)
        self.log_path = log_path

    @classmethod
    def from_env(cls) -> Faults:
        return cls(parse_spec(os.environ.get(CRASH_ENV, "")),
                   int(os.environ.get(SEED_ENV, "0")), os.environ.get(LOG_ENV))

    def armed(self, point: str) -> bool:
        return point in self.points

    def fires(self, point: str) -> bool:
        """Draw for ``point``; when it fires, record it first (the record must
        survive the SIGKILL that may follow, so it is written, not buffered)."""
        probability = self.points.get(point)
        if probability is None or self.random.random() >= probability:
            return False
        if self.log_path:
            line = f"{point} {os.getpid()} {time.time():.3f}\n".encode()
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return True

    def maybe_crash(self, point: str) -> None:
        if self.fires(point):
            os.kill(os.getpid(), signal.SIGKILL)


FAULTS = Faults.from_env()


# -- bank1 ------------------------------------------------------------------------------


def install_commit_hooks() -> None:
    """Crash points around every local commit of this process.

    bank1's only ORM sessions are the transfer transactions (its reads use plain
    connections, and a check-back's session never commits), so listening on the
    Session class hooks exactly the commit of a debit, with either adapter.
    """
    if FAULTS.armed("before_commit"):
        event.listen(Session, "before_commit", lambda _s: FAULTS.maybe_crash("before_commit"))
    if FAULTS.armed("after_commit"):
        event.listen(Session, "after_commit", lambda _s: FAULTS.maybe_crash("after_commit"))


class _CrashingSender:
    """The producer's half sender (5.x gRPC or 4.x remoting, the same face), dying
    right after a half message went out."""

    def __init__(self, sender: HalfSender) -> None:
        self._sender = sender

    def send_half(self, message: Message) -> Any:
        handle = self._sender.send_half(message)
        FAULTS.maybe_crash("after_half_send")
        return handle

    def end(self, handle: Any, commit: bool) -> None:
        self._sender.end(handle, commit)

    def send(self, message: Message) -> None:
        self._sender.send(message)

    def shutdown(self) -> None:
        self._sender.shutdown()


class CrashingProducer(RocketMQTransactionalProducer):
    """The half-message adapter with crash points before and after the half send
    and around the end-transaction call (commit or rollback of the half message)."""

    def prepare(self, outbox: Any, message: Message) -> Any:
        FAULTS.maybe_crash("before_half_send")
        return super().prepare(outbox, message)

    async def aprepare(self, outbox: Any, message: Message) -> Any:
        FAULTS.maybe_crash("before_half_send")
        return await super().aprepare(outbox, message)

    def _started(self) -> HalfSender:
        return _CrashingSender(super()._started())

    def _end(self, transaction: Any, state: Any, message: Message) -> bool:
        FAULTS.maybe_crash("before_end")
        committed = super()._end(transaction, state, message)
        FAULTS.maybe_crash("after_end")
        return committed


def producer_class() -> type[RocketMQTransactionalProducer]:
    """The half-message adapter bank1 should use: with crash points if armed."""
    if any(FAULTS.armed(p) for p in ("before_half_send", "after_half_send",
                                     "before_end", "after_end")):
        return CrashingProducer
    return RocketMQTransactionalProducer


# -- relay ------------------------------------------------------------------------------


class CrashingPublisher:
    """A publisher that may die right after a publish: the relay publishes a claimed
    batch row by row in one transaction, so the rows already out are never marked
    sent, and the next relay publishes them again (the consumer's inbox absorbs it)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def publish(self, message: Message) -> None:
        self.publisher.publish(message)
        FAULTS.maybe_crash("relay_mid_batch")

    def close(self) -> None:
        self.publisher.close()


class CrashingBatchPublisher(CrashingPublisher):
    """For a publisher of whole batches: publish the first part of the batch (its
    own round trip), maybe die, then the rest."""

    def __init__(self, publisher: Publisher, batches: BatchPublisher) -> None:
        super().__init__(publisher)
        self.batch_publisher = batches  # the same object, seen as a batch publisher

    def publish_batch(self, messages: Sequence[Message]) -> None:
        cut = FAULTS.random.randint(1, len(messages)) if messages else 0
        self.batch_publisher.publish_batch(messages[:cut])
        FAULTS.maybe_crash("relay_mid_batch")
        if messages[cut:]:
            self.batch_publisher.publish_batch(messages[cut:])


def wrap_publisher(publisher: Publisher) -> Publisher:
    if not FAULTS.armed("relay_mid_batch"):
        return publisher
    if isinstance(publisher, BatchPublisher):
        return CrashingBatchPublisher(publisher, publisher)
    return CrashingPublisher(publisher)


# -- bank2 ------------------------------------------------------------------------------


class CrashingSubscriber(SubscriberWrapper):
    """A subscriber dying in ``ack``: the business transaction (credit and inbox row)
    has committed, the broker has not heard of it and will deliver again."""

    def ack(self, delivery: Delivery) -> None:
        FAULTS.maybe_crash("before_ack")
        self.inner.ack(delivery)


def wrap_subscriber(subscriber: Subscriber) -> Subscriber:
    return CrashingSubscriber(subscriber) if FAULTS.armed("before_ack") else subscriber


class InjectedFailure(RuntimeError):
    """A handler failure the chaos run asked for; the consumer retries it."""


def wrap_handler(handler: Handler) -> Handler:
    """The handler, failing before its work with the armed probability."""
    if not FAULTS.armed("handler_fail"):
        return handler

    def failing(session: Session, message: ReceivedMessage) -> None:
        if FAULTS.fires("handler_fail"):
            raise InjectedFailure(f"chaos: injected failure for {message.id}")
        handler(session, message)

    return failing
