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

from . import CONSUMER_GROUP, TOPIC
from .bank2 import ConsumerReport
from .models import bank1_accounts, bank2_accounts, credits, transfers


@dataclass(frozen=True)
class Books:
    """Everything the audit needs, read from bank1, bank2 and the transport."""

    balance1: Decimal
    balance2: Decimal
    transfers: dict[str, Decimal]  # bank1: transfer_no -> amount debited
    credits: dict[str, Decimal]  # bank2: transfer_no -> amount credited
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
        return self.balance1 + self.balance2


def _balance(engine: Engine, accounts: Table, account_no: str) -> Decimal:
    with engine.connect() as conn:
        value = conn.scalar(select(accounts.c.balance).where(accounts.c.account_no == account_no))
    if value is None:
        raise LookupError(f"no account {account_no} in {engine.url.database}")
    return Decimal(value)


def balances(bank1: Engine, bank2: Engine) -> tuple[Decimal, Decimal]:
    """Balance of account 1 (bank1) and of account 2 (bank2)."""
    return _balance(bank1, bank1_accounts, "1"), _balance(bank2, bank2_accounts, "2")


def backlog(bank1: Engine, transport: SqlTransport) -> tuple[int, int]:
    """Pending rows in bank1's outbox, and messages bank2 has not yet settled."""
    with bank1.connect() as conn:
        pending = counts(conn)["pending"]
    return pending, transport.pending_count(TOPIC, CONSUMER_GROUP)


def progress(bank1: Engine, bank2: Engine) -> tuple[int, int, int]:
    """Pending rows in bank1's outbox, transfers bank1 committed, and bank2's credits."""
    with bank1.connect() as conn:
        pending = counts(conn)["pending"]
        committed = conn.scalar(select(func.count()).select_from(transfers)) or 0
    with bank2.connect() as conn:
        credited = conn.scalar(select(func.count()).select_from(credits)) or 0
    return pending, int(committed), int(credited)


def read_books(
    bank1: Engine, bank2: Engine, transport: SqlTransport | None,
    report: ConsumerReport | None = None,
) -> Books:
    """Read the books; the consumer's side from ``transport`` (the SQL transport) or,
    without one, from bank2's ``report``."""
    balance1, balance2 = balances(bank1, bank2)
    with bank1.connect() as conn:
        debits = {r.transfer_no: r.amount for r in conn.execute(
            select(transfers.c.transfer_no, transfers.c.amount))}
        outbox = counts(conn)
        outbox_ids = frozenset(conn.scalars(select(outbox_messages.c.message_id)))
    with bank2.connect() as conn:
        credited = {r.transfer_no: r.amount for r in conn.execute(
            select(credits.c.transfer_no, credits.c.amount))}
        inbox_rows = conn.scalar(select(func.count()).select_from(inbox)
                                 .where(inbox.c.consumer_group == CONSUMER_GROUP)) or 0
    books = Books(
        balance1=balance1, balance2=balance2, transfers=debits, credits=credited,
        outbox=outbox, outbox_ids=outbox_ids, inbox_rows=int(inbox_rows),
        duplicates_ignored=0, dead_letters=0, transport_pending=0,
    )
    if transport is not None:
        # Every acknowledged delivery either inserted an inbox row or was a duplicate.
        done = int(transport.counts(TOPIC, CONSUMER_GROUP)["done"])
        return replace(
            books, duplicates_ignored=done - books.inbox_rows,
            dead_letters=len(transport.dead_letters(CONSUMER_GROUP)),
            transport_pending=transport.pending_count(TOPIC, CONSUMER_GROUP),
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
    if books.total != before1 + before2:
        problems.append(f"money not conserved: {before1 + before2} before, {books.total} after")
    missing = sorted(set(books.transfers) - set(books.credits))
    if missing:
        problems.append(f"committed but never credited: {', '.join(missing)}")
    unknown = sorted(set(books.credits) - set(books.transfers))
    if unknown:
        problems.append(f"credited without a committed transfer: {', '.join(unknown)}")
    for no in sorted(set(books.transfers) & set(books.credits)):
        if books.transfers[no] != books.credits[no]:
            problems.append(f"{no}: debited {books.transfers[no]}, credited {books.credits[no]}")
    if books.balance1 != before1 - sum(books.transfers.values(), Decimal("0.00")):
        problems.append("account 1's balance does not match bank1's transfers")
    if books.balance2 != before2 + sum(books.credits.values(), Decimal("0.00")):
        problems.append("account 2's balance does not match bank2's credits (credited twice?)")
    if books.inbox_rows != len(books.credits):
        problems.append(f"{books.inbox_rows} inbox rows for {len(books.credits)} credits")
    if books.outbox_has_every_message and books.outbox_ids != set(books.transfers):
        problems.append("bank1's outbox messages do not match its transfers")
    if not books.outbox_ids <= set(books.transfers):
        problems.append("bank1's outbox holds messages of no transfer")
    traces = sorted(set(refused) & (set(books.transfers) | books.outbox_ids | set(books.credits)))
    if traces:
        problems.append(f"refused transfers left a trace: {', '.join(traces)}")
    if books.outbox.get("pending") or books.outbox.get("dead"):
        problems.append(f"bank1's outbox is not drained: {books.outbox}")
    if books.transport_pending or books.dead_letters:
        problems.append(f"transport: {books.transport_pending} pending, "
                        f"{books.dead_letters} dead-lettered for {CONSUMER_GROUP}")
    return problems
