"""The load: many transfers over HTTP from a few threads, each driven to a definite answer.

A transfer is posted again, with the same number, after any connection error,
timeout or 5xx, until bank1 answers 201 (committed), 200 (committed earlier: the
answer after a crash that followed the commit) or 409 (refused). Retrying the same
number is what makes the outcome knowable at all; bank1's ``transfers`` table stays
the truth for what committed.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal

import httpx

from ..models import FROZEN_ACCOUNT

#: Above any balance account 1 can have: always refused, so rolled-back transfers exist.
TOO_MUCH = Decimal("10000.01")


@dataclass(frozen=True)
class Planned:
    transfer_no: str
    amount: Decimal
    to_account: str = "2"


def plan(prefix: str, count: int, rng: random.Random) -> list[Planned]:
    """``count`` transfers: most small, about one in twelve refused for insufficient
    funds, about one in eight to bank2's frozen account (sent back and refunded). The
    small ones average 2.50, so account 1 never runs dry by chance."""
    out = []
    for i in range(1, count + 1):
        if rng.random() < 1 / 12:
            amount = TOO_MUCH + Decimal(rng.randint(0, 99999)) / 100
        else:
            amount = Decimal(rng.randint(1, 500)) / 100
        to_account = FROZEN_ACCOUNT if rng.random() < 1 / 8 else "2"
        out.append(Planned(f"{prefix}-{i:05d}", amount.quantize(Decimal("0.01")), to_account))
    return out


@dataclass
class Outcome:
    committed: set[str] = field(default_factory=set)  # answered 201 or 200
    refused: set[str] = field(default_factory=set)  # answered 409
    undecided: set[str] = field(default_factory=set)  # no answer before the deadline
    problems: list[str] = field(default_factory=list)  # answers that should never come
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self) -> int:
        with self._lock:
            return len(self.committed) + len(self.refused) + len(self.problems)


def _post_until_answered(client: httpx.Client, item: Planned, outcome: Outcome,
                         deadline: float) -> None:
    body = {"transfer_no": item.transfer_no, "amount": str(item.amount),
            "from_account": "1", "to_account": item.to_account}
    pause = 0.05
    while True:
        status = None
        try:
            response = client.post("/transfers", json=body)
            status = response.status_code
        except httpx.HTTPError:
            pass  # bank1 down, restarting, or slow: the same transfer again
        with outcome._lock:
            outcome.requests += 1
            if status in (200, 201):
                outcome.committed.add(item.transfer_no)
                return
            if status == 409:
                outcome.refused.add(item.transfer_no)
                return
            if status is not None and status < 500:
                outcome.problems.append(f"{item.transfer_no}: HTTP {status} {response.text[:200]}")
                return
            if time.monotonic() >= deadline:
                outcome.undecided.add(item.transfer_no)
                return
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def drive(base_url: str, transfers: list[Planned], outcome: Outcome, *, threads: int,
          timeout: float, gate_at: int = 0, gate: threading.Event | None = None) -> None:
    """Post every transfer from ``threads`` threads into ``outcome``; leave one
    undecided when it has no answer ``timeout`` seconds after the start.

    Transfers from number ``gate_at`` on wait for ``gate``: the harness opens it once
    its fault (a broker outage, say) is under way, so load meets the fault.
    """
    work: queue.Queue[tuple[int, Planned]] = queue.Queue()
    for number, item in enumerate(transfers):
        work.put((number, item))
    deadline = time.monotonic() + timeout

    def worker() -> None:
        with httpx.Client(base_url=base_url, timeout=10.0) as client:
            while True:
                try:
                    number, item = work.get_nowait()
                except queue.Empty:
                    return
                if gate is not None and number >= gate_at:
                    gate.wait(max(0.0, deadline - time.monotonic()))
                _post_until_answered(client, item, outcome, deadline)

    pool = [threading.Thread(target=worker, name=f"driver-{i}", daemon=True)
            for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
