"""The audit of one scenario, read from the databases themselves.

Never the processes' own claims: bank1's ``transfers`` table says what committed,
bank2's ``credits`` and account say what was credited, bank1's outbox and the SQL
transport's tables say what is still on its way. The HTTP answers the driver got
are only compared against those tables.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from decimal import Decimal

from sqlalchemy import Engine, func, select

from outbox import SqlTransport
from outbox.schema import inbox
from outbox.storage import counts

from .. import CONSUMER_GROUP, REFUND_GROUP, REFUND_TOPIC, TOPIC
from ..audit import balances
from ..models import credits, refunds, returns, transfers
from .driver import Outcome

START1, START2 = Decimal("10000.00"), Decimal("0.00")


@dataclass
class Verdict:
    committed: int = 0
    refused: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong_balance: int = 0
    stuck: int = 0
    details: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Snapshot:
    """What is still in flight; settled when every number here is zero."""

    outbox_pending: int
    transport_pending: int  # SQL transport only
    uncredited: int  # committed transfers bank2 has not credited yet
    hostile_open: int  # malformed messages not yet dead-lettered


def in_flight(bank1: Engine, bank2: Engine, transport: SqlTransport | None) -> tuple[int, int, int]:
    """Outbox rows pending (both banks), SQL transport messages not settled (transfers
    and refunds), and committed transfers neither credited nor sent back and refunded."""
    with bank1.connect() as conn:
        pending = counts(conn)["pending"]
        committed = set(conn.scalars(select(transfers.c.transfer_no)))
        refunded = set(conn.scalars(select(refunds.c.transfer_no)))
    with bank2.connect() as conn:
        pending += counts(conn)["pending"]
        credited = set(conn.scalars(select(credits.c.transfer_no)))
    unsettled = (transport.pending_count(TOPIC, CONSUMER_GROUP)
                 + transport.pending_count(REFUND_TOPIC, REFUND_GROUP)) if transport else 0
    return pending, unsettled, len(committed - credited - refunded)


def audit(bank1: Engine, bank2: Engine, transport: SqlTransport | None, outcome: Outcome,
          hostile_expected: dict[str, str], hostile_dead: dict[str, str],
          hostile_refused: Collection[str]) -> Verdict:
    """Count lost, duplicated, wrong-balance and stuck from the books.

    ``hostile_expected``: case -> the word its dead letter's reason must contain;
    ``hostile_dead``: case -> reason found; ``hostile_refused``: cases the broker
    refused to take at all (they never reached the topic).
    """
    v = Verdict()
    balance1, balance2 = balances(bank1, bank2)  # balance2: accounts 2 and 3 together
    with bank1.connect() as conn:
        debits = {r.transfer_no: r.amount for r in conn.execute(
            select(transfers.c.transfer_no, transfers.c.amount))}
        refunded = {r.transfer_no: r.amount for r in conn.execute(
            select(refunds.c.transfer_no, refunds.c.amount))}
        outbox = counts(conn)
        refund_inbox = conn.scalar(select(func.count()).select_from(inbox)
                                   .where(inbox.c.consumer_group == REFUND_GROUP)) or 0
    with bank2.connect() as conn:
        credited = {r.transfer_no: r.amount for r in conn.execute(
            select(credits.c.transfer_no, credits.c.amount))}
        returned = {r.transfer_no: r.amount for r in conn.execute(
            select(returns.c.transfer_no, returns.c.amount))}
        bank2_outbox = counts(conn)
        inbox_rows = conn.scalar(select(func.count()).select_from(inbox)
                                 .where(inbox.c.consumer_group == CONSUMER_GROUP)) or 0
    v.committed, v.refused = len(debits), len(outcome.refused)

    # Lost: committed (or answered as committed) and neither credited nor sent back
    # and refunded.
    answered_missing = sorted(outcome.committed - set(debits))
    if answered_missing:
        v.details.append(f"answered committed but not in bank1's transfers: {answered_missing[:5]}")
    lost = sorted((set(debits) | outcome.committed) - set(credited) - set(refunded))
    v.lost = len(lost)
    if lost:
        v.details.append(f"committed, never credited or refunded: {lost[:5]}")
    unrefunded = sorted(set(returned) - set(refunded))
    if unrefunded:
        v.lost += len(unrefunded)
        v.details.append(f"sent back by bank2, never refunded: {unrefunded[:5]}")

    # Duplicated: credits or refunds beyond one per committed transfer.
    foreign = sorted((set(credited) | set(refunded)) - set(debits))
    twice = sorted(set(credited) & (set(returned) | set(refunded)))
    refund_only = sorted(set(refunded) - set(returned))
    v.duplicated = len(foreign) + len(twice) + len(refund_only)
    if foreign:
        v.details.append(f"credited or refunded without a committed transfer: {foreign[:5]}")
    if twice:
        v.details.append(f"credited and also sent back: {twice[:5]}")
    if refund_only:
        v.details.append(f"refunded but never sent back: {refund_only[:5]}")
    credit_sum = sum(credited.values(), Decimal("0.00"))
    refund_sum = sum(refunded.values(), Decimal("0.00"))
    if balance2 > START2 + credit_sum:
        v.duplicated += 1
        v.details.append(f"bank2's balance {balance2} exceeds the credits' sum {credit_sum}")
    if inbox_rows > len(credited) + len(returned):
        v.details.append(f"{inbox_rows} inbox rows for {len(credited)} credits and "
                         f"{len(returned)} returns")
    if refund_inbox > len(refunded):
        v.details.append(f"{refund_inbox} refund inbox rows for {len(refunded)} refunds")

    # Wrong balance: every way the books fail to add up counts once.
    checks = [
        (balance1 + balance2 == START1 + START2,
         f"total {balance1 + balance2} != {START1 + START2}"),
        (balance2 == START2 + credit_sum, f"bank2's balance {balance2} != credits {credit_sum}"),
        (balance1 == START1 - sum(debits.values(), Decimal("0.00")) + refund_sum,
         f"balance(1) {balance1} does not match bank1's transfers and refunds"),
        (balance1 >= 0 and balance2 >= 0, "negative balance"),
        (not (outcome.refused & set(debits)), "answered 409 but committed"),
    ]
    for no in sorted(set(debits) & set(credited)):
        checks.append((debits[no] == credited[no],
                       f"{no}: debited {debits[no]}, credited {credited[no]}"))
    for no in sorted(set(debits) & set(refunded)):
        checks.append((debits[no] == refunded[no] == returned.get(no),
                       f"{no}: debited {debits[no]}, refunded {refunded[no]}"))
    for ok, what in checks:
        if not ok:
            v.wrong_balance += 1
            v.details.append(what)

    # Stuck: still on its way after the settle timeout, or never properly parked.
    for bank, box in (("bank1", outbox), ("bank2", bank2_outbox)):
        stuck = int(box.get("pending", 0)) + int(box.get("dead", 0))
        if stuck:
            v.stuck += stuck
            v.details.append(f"{bank}'s outbox not drained: {box}")
    if transport is not None:
        unsettled = (transport.pending_count(TOPIC, CONSUMER_GROUP)
                     + transport.pending_count(REFUND_TOPIC, REFUND_GROUP))
        if unsettled:
            v.stuck += unsettled
            v.details.append(f"{unsettled} transport deliveries not settled")
        dead_real = sorted(d.message_id or "" for group in (CONSUMER_GROUP, REFUND_GROUP)
                           for d in transport.dead_letters(group) if d.message_id in debits)
        if dead_real:
            v.details.append(f"committed transfers dead-lettered: {dead_real[:5]}")
    for case, word in hostile_expected.items():
        if case in hostile_refused:
            continue
        reason = hostile_dead.get(case)
        if reason is None or word not in reason.lower():
            v.stuck += 1
            v.details.append(f"malformed {case}: " + (
                "not dead-lettered" if reason is None else f"reason {reason[:120]!r}"))
    return v
