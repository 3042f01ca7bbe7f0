"""bank2: credits account 2 once per transfer number, from the transfer messages.

Run with ``python -m bank_transfer.bank2 --db URL --transport-db URL``; it stops
on SIGTERM or SIGINT after the batch in hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
from decimal import Decimal, InvalidOperation

import structlog
from sqlalchemy import update
from sqlalchemy.orm import Session

from outbox import (
    ConsumerConfig,
    IdempotentConsumer,
    ReceivedMessage,
    Reject,
    SqlTransport,
    create_engine,
)
from outbox.db import safe_url

from . import CONSUMER_GROUP, TOPIC
from .models import CENT, credits
from .models import bank2_accounts as accounts
from .runtime import configure_logging, stop_on_signals, url_option

log = structlog.get_logger("bank_transfer.bank2")


def _amount(value: object) -> Decimal:
    if not isinstance(value, str):
        raise Reject(f"amount must be a decimal string, got {type(value).__name__}")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise Reject(f"amount {value!r} is not a number") from None
    if not amount.is_finite() or amount <= 0 or amount != amount.quantize(CENT):
        raise Reject(f"amount {value!r} is not a positive amount in cents")
    return amount


def credit(session: Session, message: ReceivedMessage) -> None:
    """Credit the transfer. Runs in the consumer's transaction, after the inbox row
    for this message id (the transfer number) was inserted, so it runs once."""
    body = message.body
    if not isinstance(body, dict):
        raise Reject("message body must be a JSON object")
    if body.get("transfer_no") != message.id:
        raise Reject("transfer_no in the body differs from the message id")
    amount = _amount(body.get("amount"))
    to_account = body.get("to_account")
    if not isinstance(to_account, str):
        raise Reject("to_account must be a string")
    conn = session.connection()
    credited = conn.execute(
        update(accounts).where(accounts.c.account_no == to_account)
        .values(balance=accounts.c.balance + amount)
    ).rowcount
    if credited != 1:
        # Retrying cannot help; the dead letter keeps it for an operator.
        raise Reject(f"bank2 has no account {to_account!r}")
    conn.execute(credits.insert().values(
        transfer_no=message.id, amount=amount,
        credited_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
    ))
    log.info("credited", transfer_no=message.id, account=to_account, amount=str(amount))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bank_transfer.bank2", description=__doc__)
    url_option(parser, "--db", "bank2's database URL")
    url_option(parser, "--transport-db", "the SQL transport's database URL")
    parser.add_argument("--poll-interval", type=float, default=0.05, help="seconds (default 0.05)")
    args = parser.parse_args(argv)
    configure_logging("bank2")
    stop = stop_on_signals()
    bank2 = create_engine(args.db)
    transport = SqlTransport(create_engine(args.transport_db), poll_interval=args.poll_interval)
    consumer = IdempotentConsumer(
        bank2, transport.subscriber(TOPIC, CONSUMER_GROUP), CONSUMER_GROUP, credit,
        # A short fetch wait so that a stop request is noticed quickly.
        config=ConsumerConfig(wait_seconds=0.5),
    )
    log.info("bank2_started", db=safe_url(args.db), transport=safe_url(args.transport_db),
             topic=TOPIC, group=CONSUMER_GROUP)
    try:
        consumer.run(stop)
    finally:
        bank2.dispose()
        transport.engine.dispose()
    stats = consumer.stats
    log.info("bank2_stopped", processed=stats.processed, duplicates=stats.duplicates,
             retried=stats.retried, dead_lettered=stats.dead_lettered)


if __name__ == "__main__":
    main()
