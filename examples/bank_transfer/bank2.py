"""bank2: credits the account once per transfer number, from the transfer messages.

A transfer to a frozen account (account 3) is not credited: bank2 sends it back with
a refund message, written by a decorated function that the handler calls, so it
joins the handler's transaction with the inbox row. A relay thread in this process
publishes the refunds; bank1 refunds account 1 once per refund.

Run with ``python -m bank_transfer.bank2 --db URL --transport-db URL`` (the SQL
transport) or ``--transport rocketmq [--rocketmq-endpoints HOST:PORT]``; it stops
on SIGTERM or SIGINT after the batch in hand.

``--run-id R`` makes it take only transfers numbered ``R-...`` (a demo run's) and
acknowledge every other message unprocessed; ``--report FILE`` keeps a small JSON
file up to date with what the consumer did (the demo reads it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog
import tenacity
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from outbox import (
    ConsumerConfig,
    IdempotentConsumer,
    Outbox,
    ReceivedMessage,
    Reject,
    RelayConfig,
    SqlTransport,
    create_engine,
)
from outbox.brokers import Broker, masked, open_broker
from outbox.consumer import Handler
from outbox.db import safe_url
from outbox.typing import Publisher, Subscriber
from outbox_rocketmq import RocketMQPublisher, RocketMQSubscriber

from . import CONSUMER_GROUP, DEAD_LETTER_TOPIC, REFUND_TOPIC, TOPIC
from .chaos import faults
from .models import bank2_accounts as accounts
from .models import credits, returns
from .observability import observe
from .runs import RUN_ID, OnlyRun
from .runtime import configure_logging, stop_on_signals, url_option
from .transports import (
    BROKER,
    ROCKETMQ,
    add_transport_options,
    check_transport_options,
    rocketmq_config,
)
from .validation import BadRequest, parse_account, parse_amount, parse_transfer_no

log = structlog.get_logger("bank_transfer.bank2")


def _amount(value: object) -> Decimal:
    """The amount as bank1 sends it: a decimal string within bank1's own limits.

    The same rules as a transfer request (``validation.parse_amount``): a message
    that bank1 could never have sent (an exponent, 30 digits, NaN) is refused here
    rather than left to fail in Decimal arithmetic or in a NUMERIC(18, 2) column,
    where the error would look retryable and only dead-letter after every retry.
    """
    if not isinstance(value, str):
        raise Reject(f"amount must be a decimal string, got {type(value).__name__}")
    try:
        return parse_amount(value)
    except BadRequest as exc:
        raise Reject(f"{exc} (got {value[:40]!r})") from None


def _checked(parse: Callable[[Any], str], value: object) -> str:
    try:
        return parse(value)
    except BadRequest as exc:
        raise Reject(str(exc)) from None


def make_credit(bank2_outbox: Outbox) -> Handler:
    """The credit handler of bank2, sending refunds through ``bank2_outbox``."""

    @bank2_outbox.transactional_message(
        topic=REFUND_TOPIC, message_id="transfer_no",  # no key: refunds need no order
        payload=lambda transfer_no, to_account, amount, reason: {
            "transfer_no": transfer_no, "amount": str(amount), "reason": reason},
    )
    def send_back(session: Session, transfer_no: str, to_account: str, amount: Decimal,
                  reason: str) -> None:
        """Record the returned transfer; its refund message commits with this row.

        Called from the handler, it joins the handler's transaction: the refund, the
        ``returns`` row and the inbox row commit together or not at all."""
        session.execute(returns.insert().values(
            transfer_no=transfer_no, to_account=to_account, amount=amount, reason=reason,
            returned_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
        ))

    def credit(session: Session, message: ReceivedMessage) -> None:
        """Credit the transfer, or send it back. Runs in the consumer's transaction,
        after the inbox row for this message id (the transfer number) was inserted,
        so it runs once."""
        body = message.body
        if not isinstance(body, dict):
            raise Reject("message body must be a JSON object")
        if body.get("transfer_no") != message.id:
            raise Reject("transfer_no in the body differs from the message id")
        # Only what bank1 itself accepts (validation.py): quotes, NUL characters or
        # non-numeric accounts are refused before they reach a query.
        _checked(parse_transfer_no, message.id)
        amount = _amount(body.get("amount"))
        to_account = body.get("to_account")
        if not isinstance(to_account, str):
            raise Reject("to_account must be a string")
        _checked(lambda v: parse_account("to_account", v), to_account)
        conn = session.connection()
        frozen = conn.scalar(select(accounts.c.frozen).where(accounts.c.account_no == to_account))
        if frozen is None:
            # Retrying cannot help; the dead letter keeps it for an operator.
            raise Reject(f"bank2 has no account {to_account!r}")
        if frozen:
            send_back(message.id, to_account, amount, f"account {to_account} is frozen")
            log.info("sent_back", transfer_no=message.id, account=to_account,
                     amount=str(amount))
            return
        conn.execute(
            update(accounts).where(accounts.c.account_no == to_account)
            .values(balance=accounts.c.balance + amount)
        )
        conn.execute(credits.insert().values(
            transfer_no=message.id, amount=amount,
            credited_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
        ))
        log.info("credited", transfer_no=message.id, account=to_account, amount=str(amount))

    return credit


# -- the report file --------------------------------------------------------------------


@dataclass(frozen=True)
class ConsumerReport:
    """What bank2's consumer did so far, as written to ``--report``.

    ``ready``: it has received from the transport at least once (so its consumer
    group exists on the broker and new messages will reach it).
    """

    ready: bool = False
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    other_runs_ignored: int = 0
    stopped: bool = False


def write_report(path: Path, report: ConsumerReport) -> None:
    """Replace ``path`` atomically: a reader sees the old file or the new one."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(asdict(report), sort_keys=True) + "\n", encoding="utf-8")
    os.replace(part, path)


def read_report(path: Path) -> ConsumerReport | None:
    """The report in ``path``, or None while there is none (or it is not one)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ConsumerReport(**data)
    except (OSError, ValueError, TypeError):
        return None


class Reporter:
    """Writes ``consumer``'s report every ``interval`` seconds and once at the end."""

    def __init__(self, path: Path, consumer: IdempotentConsumer, filtered: OnlyRun | None,
                 interval: float = 0.2) -> None:
        self.path = path
        self.consumer = consumer
        self.filtered = filtered
        self.interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bank2-report", daemon=True)

    def report(self, *, stopped: bool = False) -> ConsumerReport:
        stats = self.consumer.stats
        return ConsumerReport(
            # Without a filter there is nothing to count fetches with: the demo
            # uses a filter whenever it waits for ``ready``.
            ready=self.filtered is None or self.filtered.fetches > 0,
            processed=stats.processed, duplicates=stats.duplicates, retried=stats.retried,
            dead_lettered=stats.dead_lettered,
            other_runs_ignored=self.filtered.other_runs if self.filtered else 0,
            stopped=stopped,
        )

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            try:
                write_report(self.path, self.report())
            except OSError as exc:
                log.warning("report_not_written", path=str(self.path), error=str(exc))

    def __enter__(self) -> Reporter:
        write_report(self.path, self.report())
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()
        write_report(self.path, self.report(stopped=True))


# -- the process ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bank_transfer.bank2", description=__doc__)
    url_option(parser, "--db", "bank2's database URL")
    add_transport_options(parser, transport_db_help="the SQL transport's database URL")
    parser.add_argument("--group", default=CONSUMER_GROUP,
                        help=f"the transport's consumer group (default {CONSUMER_GROUP}); the "
                             f"inbox de-duplicates under {CONSUMER_GROUP} whatever this is")
    parser.add_argument("--run-id", help="take only transfers numbered RUN_ID-...")
    parser.add_argument("--report", type=Path, help="keep this JSON file up to date")
    parser.add_argument("--poll-interval", type=float, default=0.05, help="seconds (default 0.05)")
    parser.add_argument("--max-attempts", type=int, default=ConsumerConfig.max_attempts,
                        help="deliveries of a failing message before it is dead-lettered "
                             "(default %(default)s)")
    parser.add_argument("--max-backoff", type=float, default=300.0,
                        help="longest wait before a failed message is redelivered, seconds")
    parser.add_argument("--relay-max-attempts", type=int, default=RelayConfig.max_attempts,
                        help="failed publishes of a refund before its row is parked dead "
                             "(default %(default)s)")
    parser.add_argument("--redelivery-seconds", type=int, default=30,
                        help="an unacknowledged delivery comes back after this long "
                             "(default 30; RocketMQ's minimum is 10)")
    args = parser.parse_args(argv)
    check_transport_options(parser, args)
    if args.run_id is not None and not RUN_ID.fullmatch(args.run_id):
        parser.error("--run-id must be 1 to 20 letters or digits")
    configure_logging("bank2")
    stop = stop_on_signals()
    bank2 = create_engine(args.db)
    transport_engine: Engine | None = None
    subscriber: Subscriber
    publisher: Publisher
    rocketmq: RocketMQSubscriber | None = None
    broker: Broker | None = None
    if args.transport == ROCKETMQ:
        config = rocketmq_config(args.rocketmq_endpoints, args.rocketmq_namesrv)
        rocketmq = subscriber = RocketMQSubscriber(
            config, TOPIC, args.group,
            dead_letter_topic=DEAD_LETTER_TOPIC, invisible_seconds=args.redelivery_seconds,
        )
        publisher = RocketMQPublisher(config, [REFUND_TOPIC])
        where = f"rocketmq {config.where}"
    elif args.transport == BROKER:
        broker = open_broker(args.broker)
        subscriber = broker.subscriber(TOPIC, args.group,
                                       visibility_timeout=args.redelivery_seconds)
        publisher = broker.publisher()
        where = masked(args.broker)
    else:
        transport_engine = create_engine(args.transport_db)
        transport = SqlTransport(transport_engine, poll_interval=args.poll_interval)
        subscriber = transport.subscriber(TOPIC, args.group,
                                          visibility_timeout=args.redelivery_seconds)
        publisher = transport.publisher()
        where = safe_url(args.transport_db)
    # bank2's own outbox: the refunds, published by a relay thread of this process
    # (nudged right after each commit that wrote one).
    bank2_outbox = Outbox(bank2)
    credit = make_credit(bank2_outbox)
    relay = bank2_outbox.relay(publisher, RelayConfig(
        poll_interval=args.poll_interval * 4, max_attempts=args.relay_max_attempts,
        backoff=tenacity.wait_exponential(
            multiplier=1, min=min(1.0, args.max_backoff), max=args.max_backoff)))
    filtered = OnlyRun(subscriber, args.run_id) if args.run_id else None
    # Chaos runs only (see bank_transfer.chaos.faults): may die before acknowledging
    # one of this run's messages (other runs' messages are acknowledged unharmed, or a
    # broker's long history would keep bank2 from ever finishing its first fetch).
    consumed = faults.wrap_subscriber(filtered or subscriber)
    backoff = tenacity.wait_exponential(multiplier=1, min=min(1.0, args.max_backoff),
                                        max=args.max_backoff) + tenacity.wait_random(0, 0.5)
    consumer = IdempotentConsumer(
        bank2, consumed, CONSUMER_GROUP, faults.wrap_handler(credit),
        # A short fetch wait so that a stop request is noticed quickly (a RocketMQ
        # proxy holds an empty receive for its minimum long-polling time anyway).
        config=ConsumerConfig(wait_seconds=0.5, max_attempts=args.max_attempts,
                              backoff=backoff),
    )
    log.info("bank2_started", db=safe_url(args.db), transport=where, topic=TOPIC,
             group=args.group, run_id=args.run_id)
    relay.start()
    stop_observing = observe("bank2", {"bank2": bank2})
    try:
        if args.report is not None:
            with Reporter(args.report, consumer, filtered):
                consumer.run(stop)
        else:
            consumer.run(stop)
    finally:
        relay.stop()
        stop_observing()
        publisher.close()
        if rocketmq is not None:
            rocketmq.close()
        if broker is not None:
            subscriber.close()
            broker.close()
        bank2.dispose()
        if transport_engine is not None:
            transport_engine.dispose()
    stats = consumer.stats
    log.info("bank2_stopped", processed=stats.processed, duplicates=stats.duplicates,
             retried=stats.retried, dead_lettered=stats.dead_lettered,
             other_runs_ignored=filtered.other_runs if filtered else 0)


if __name__ == "__main__":
    main()
