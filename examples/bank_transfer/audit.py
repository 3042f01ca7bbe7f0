"""Reads both banks and the transport directly, and checks the books.

The SQL transport can be read like a database. A RocketMQ broker cannot be asked
what a consumer group did, so there bank2's own report (see ``bank2.py``) says how
many deliveries were duplicates and how many were dead-lettered.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from decimal import Decimal

from sqlalchemy import Engine, Table, func, select

from outbox import SqlTransport
from outbox.schema import inbox, outbox_messages
from outbox.storage import counts

from . import CONSUMER_GROUP, REFUND_GROUP, REFUND_TOPIC, TOPIC
from .bank2 import ConsumerReport
from .models import (
    FROZEN_ACCOUNT,
    bank1_accounts,
    bank2_accounts,
    credits,
    refunds,
    returns,
    transfers,
)


@dataclass(frozen=True)
class Books:
    """Everything the audit needs, read from bank1, bank2 and the transport."""

    balance1: Decimal
    balance2: Decimal
    balance3: Decimal  # bank2's frozen account: never credited
    transfers: dict[str, Decimal]  # bank1: transfer_no -> amount debited
    credits: dict[str, Decimal]  # bank2: transfer_no -> amount credited
    returns: dict[str, Decimal]  # bank2: transfer_no -> amount sent back
    refunds: dict[str, Decimal]  # bank1: transfer_no -> amount refunded
    bank2_outbox: dict[str, int]  # bank2's outbox rows (the refunds) per status
    refunds_pending: int  # refund messages bank1 has not settled (SQL transport)
    outbox: dict[str, int]  # bank1's outbox rows per status
    outbox_ids: frozenset[str]
    inbox_rows: int  # bank2's de-duplication rows for its group
    duplicates_ignored: int  # deliveries bank2 acknowledged without crediting again
    dead_letters: int
    transport_pending: int  # 0 where the transport cannot tell (RocketMQ)
    #: With RocketMQ the outbox holds only the messages that fell back to it.
    outbox_has_every_message: bool = True

    @property
    def total(self) -> Decimal:
        return self.balance1 + self.balance2 + self.balance3


def _balance(engine: Engine, accounts: Table, account_no: str) -> Decimal:
    with engine.connect() as conn:
        value = conn.scalar(select(accounts.c.balance).where(accounts.c.account_no == account_no))
    if value is None:
        raise LookupError(f"no account {account_no} in {engine.url.database}")
    return Decimal(value)


def balances(bank1: Engine, bank2: Engine) -> tuple[Decimal, Decimal]:
    """Balance of account 1 (bank1) and of bank2's accounts 2 and 3 together."""
    return _balance(bank1, bank1_accounts, "1"), (
        _balance(bank2, bank2_accounts, "2") + _balance(bank2, bank2_accounts, FROZEN_ACCOUNT))


def backlog(bank1: Engine, bank2: Engine, transport: SqlTransport) -> tuple[int, int]:
    """Pending outbox rows of both banks, and messages not yet settled by their
    consumers (bank2's transfers, bank1's refunds)."""
    pending = 0
    for engine in (bank1, bank2):
        with engine.connect() as conn:
            pending += counts(conn)["pending"]
    return pending, (transport.pending_count(TOPIC, CONSUMER_GROUP)
                     + transport.pending_count(REFUND_TOPIC, REFUND_GROUP))


def progress(bank1: Engine, bank2: Engine) -> tuple[int, int, int]:
    """Pending outbox rows of both banks, transfers bank1 committed, and those settled:
    credited by bank2, or sent back by bank2 and refunded by bank1."""
    with bank1.connect() as conn:
        pending = counts(conn)["pending"]
        committed = conn.scalar(select(func.count()).select_from(transfers)) or 0
        refunded = conn.scalar(select(func.count()).select_from(refunds)) or 0
    with bank2.connect() as conn:
        pending += counts(conn)["pending"]
        credited = conn.scalar(select(func.count()).select_from(credits)) or 0
    return pending, int(committed), int(credited) + int(refunded)


def _amounts(engine: Engine, table: Table) -> dict[str, Decimal]:
    with engine.connect() as conn:
        return {r.transfer_no: r.amount for r in conn.execute(
            select(table.c.transfer_no, table.c.amount))}


def read_books(
    bank1: Engine, bank2: Engine, transport: SqlTransport | None,
    report: ConsumerReport | None = None,
) -> Books:
    """Read the books; the consumer's side from ``transport`` (the SQL transport) or,
    without one, from bank2's ``report``."""
    balance1 = _balance(bank1, bank1_accounts, "1")
    balance2 = _balance(bank2, bank2_accounts, "2")
    balance3 = _balance(bank2, bank2_accounts, FROZEN_ACCOUNT)
    with bank1.connect() as conn:
        outbox = counts(conn)
        outbox_ids = frozenset(conn.scalars(select(outbox_messages.c.message_id)))
    with bank2.connect() as conn:
        bank2_outbox = counts(conn)
        inbox_rows = conn.scalar(select(func.count()).select_from(inbox)
                                 .where(inbox.c.consumer_group == CONSUMER_GROUP)) or 0
    books = Books(
        balance1=balance1, balance2=balance2, balance3=balance3,
        transfers=_amounts(bank1, transfers), credits=_amounts(bank2, credits),
        returns=_amounts(bank2, returns), refunds=_amounts(bank1, refunds),
        bank2_outbox=bank2_outbox, refunds_pending=0,
        outbox=outbox, outbox_ids=outbox_ids, inbox_rows=int(inbox_rows),
        duplicates_ignored=0, dead_letters=0, transport_pending=0,
    )
    if transport is not None:
        # Every acknowledged delivery either inserted an inbox row or was a duplicate.
        done = int(transport.counts(TOPIC, CONSUMER_GROUP)["done"])
        return replace(
            books, duplicates_ignored=done - books.inbox_rows,
            dead_letters=len(transport.dead_letters(CONSUMER_GROUP))
            + len(transport.dead_letters(REFUND_GROUP)),
            transport_pending=transport.pending_count(TOPIC, CONSUMER_GROUP),
            refunds_pending=transport.pending_count(REFUND_TOPIC, REFUND_GROUP),
        )
    if report is not None:
        return replace(books, duplicates_ignored=report.duplicates,
                       dead_letters=report.dead_lettered, outbox_has_every_message=False)
    raise ValueError("read_books needs the SQL transport or bank2's report")


def find_problems(
    books: Books, before: tuple[Decimal, Decimal], refused: Collection[str]
) -> list[str]:
    """Every way the books fail to add up; empty when all is well."""
    problems: list[str] = []
    before1, before2 = before
    total = sum(before, Decimal("0.00"))
    if books.total != total:
        problems.append(f"money not conserved: {total} before, {books.total} after")
    settled = set(books.credits) | set(books.returns)
    missing = sorted(set(books.transfers) - settled)
    if missing:
        problems.append(f"committed but neither credited nor sent back: {', '.join(missing)}")
    both = sorted(set(books.credits) & set(books.returns))
    if both:
        problems.append(f"credited and sent back: {', '.join(both)}")
    unknown = sorted(settled - set(books.transfers))
    if unknown:
        problems.append(f"credited or sent back without a committed transfer: "
                        f"{', '.join(unknown)}")
    for no in sorted(set(books.transfers) & settled):
        got = books.credits.get(no, books.returns.get(no))
        if books.transfers[no] != got:
            problems.append(f"{no}: debited {books.transfers[no]}, bank2 took {got}")
    if set(books.refunds) != set(books.returns):
        problems.append(f"sent back {sorted(books.returns)} but refunded {sorted(books.refunds)}")
    for no in sorted(set(books.refunds) & set(books.returns)):
        if books.refunds[no] != books.returns[no]:
            problems.append(f"{no}: sent back {books.returns[no]}, refunded {books.refunds[no]}")
    debited = sum(books.transfers.values(), Decimal("0.00"))
    refunded = sum(books.refunds.values(), Decimal("0.00"))
    if books.balance1 != before1 - debited + refunded:
        problems.append("account 1's balance does not match bank1's transfers and refunds "
                        "(refunded twice?)")
    if books.balance2 + books.balance3 != before2 + sum(books.credits.values(), Decimal("0.00")):
        problems.append("bank2's balances do not match its credits (credited twice?)")
    if books.inbox_rows != len(books.credits) + len(books.returns):
        problems.append(f"{books.inbox_rows} inbox rows for {len(books.credits)} credits and "
                        f"{len(books.returns)} returns")
    if books.outbox_has_every_message and books.outbox_ids != set(books.transfers):
        problems.append("bank1's outbox messages do not match its transfers")
    if not books.outbox_ids <= set(books.transfers):
        problems.append("bank1's outbox holds messages of no transfer")
    traces = sorted(set(refused) & (set(books.transfers) | books.outbox_ids | settled))
    if traces:
        problems.append(f"refused transfers left a trace: {', '.join(traces)}")
    for bank, outbox in (("bank1", books.outbox), ("bank2", books.bank2_outbox)):
        if outbox.get("pending") or outbox.get("dead"):
            problems.append(f"{bank}'s outbox is not drained: {outbox}")
    if books.transport_pending or books.refunds_pending or books.dead_letters:
        problems.append(f"transport: {books.transport_pending} transfers and "
                        f"{books.refunds_pending} refunds pending, {books.dead_letters} "
                        "dead-lettered")
    return problems
