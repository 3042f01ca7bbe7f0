"""One demo run among others on a shared broker: its transfer numbers, and subscribers
that pass on only its messages (sync for bank2, asyncio for bank1's refunds)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import structlog

from outbox import Delivery, OutboxError
from outbox.transport import AsyncSubscriberWrapper, SubscriberWrapper
from outbox.typing import AsyncSubscriber, Subscriber

log = structlog.get_logger("bank_transfer.runs")

RUN_ID = re.compile(r"[A-Za-z0-9]{1,20}")


def run_transfer_no(run_id: str, number: str) -> str:
    """The transfer number ``number`` as demo run ``run_id`` sends it."""
    return f"{run_id}-{number}"


class RunFilter:
    """Which deliveries belong to one demo run, and how many did not.

    A broker keeps its topic between runs, and a new consumer group may be handed
    the topic's older messages: transfers (or refunds) of earlier or concurrent runs,
    which this run's services, with their fresh databases, must not apply. They
    belong to the other runs' consumer groups, which get their own copies, so here
    they are acknowledged without processing and counted.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.prefix = run_transfer_no(run_id, "")
        self.fetches = 0
        self.other_runs = 0

    def split(self, deliveries: Sequence[Delivery]) -> tuple[list[Delivery], list[Delivery]]:
        """This run's deliveries, and the others' (to acknowledge unprocessed)."""
        ours = [d for d in deliveries if (d.message_id or "").startswith(self.prefix)]
        others = [d for d in deliveries if not (d.message_id or "").startswith(self.prefix)]
        self.fetches += 1
        if others:
            self.other_runs += len(others)
            log.info("other_runs_ignored", count=len(others), run_id=self.run_id)
        return ours, others

    @staticmethod
    def ack_failed(delivery: Delivery, exc: OutboxError) -> None:
        # It comes back later and is ignored again.
        log.warning("other_run_ack_failed", error=str(exc), message_id=delivery.message_id)


class OnlyRun(RunFilter, SubscriberWrapper):
    """A Subscriber passing on only the messages of one demo run (with the optional
    abilities of the one it wraps)."""

    def __init__(self, subscriber: Subscriber, run_id: str) -> None:
        RunFilter.__init__(self, run_id)
        SubscriberWrapper.__init__(self, subscriber)
        self.subscriber = subscriber

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        ours, others = self.split(self.subscriber.fetch(max_messages, wait_seconds))
        for delivery in others:
            try:
                self.subscriber.ack(delivery)
            except OutboxError as exc:
                self.ack_failed(delivery, exc)
        return ours


class AsyncOnlyRun(RunFilter, AsyncSubscriberWrapper):
    """An asyncio Subscriber passing on only the messages of one demo run."""

    def __init__(self, subscriber: AsyncSubscriber, run_id: str) -> None:
        RunFilter.__init__(self, run_id)
        AsyncSubscriberWrapper.__init__(self, subscriber)
        self.subscriber = subscriber

    async def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        ours, others = self.split(await self.subscriber.fetch(max_messages, wait_seconds))
        for delivery in others:
            try:
                await self.subscriber.ack(delivery)
            except OutboxError as exc:
                self.ack_failed(delivery, exc)
        return ours
