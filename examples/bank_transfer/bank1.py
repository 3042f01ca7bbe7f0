"""bank1: debits account 1 and writes the transfer message in one local transaction.

Run with ``python -m bank_transfer.bank1 --db URL --port N``. A relay process
(``bank_transfer.relay``) publishes the committed messages.

With ``--transport rocketmq`` the message leaves as a RocketMQ transactional half
message instead, committed once the local transaction has committed; the broker's
check-back is answered from the transaction log. If the broker cannot be reached
the transfer still succeeds: the message falls back to an outbox row, which the
relay (run with ``--transport rocketmq`` as well) publishes once the broker is back.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import structlog
import uvicorn
from sqlalchemy import Engine, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from outbox import BrokerUnavailableError, DeliveryAdapter, Outbox, create_engine
from outbox.db import safe_url
from outbox.transaction import DEFAULT_LOCAL_TRANSACTION_TIMEOUT
from outbox_rocketmq import RocketMQTransactionalProducer

from . import TOPIC
from .chaos import faults
from .models import bank1_accounts as accounts
from .models import transfers
from .runtime import configure_logging, url_option
from .transports import ROCKETMQ, add_transport_options, rocketmq_config
from .validation import BadRequest, TransferRequest, parse_transfer

log = structlog.get_logger("bank_transfer.bank1")

MAX_BODY_BYTES = 16 * 1024

Transfer = Callable[[str, str, str, Decimal], Decimal]


class TransferRefused(Exception):
    """The transfer cannot be made; nothing was written and nothing is sent."""

    status_code = 409


class InsufficientFunds(TransferRefused):
    pass


class TransferNumberReused(TransferRefused):
    pass


class UnknownAccount(TransferRefused):
    status_code = 400


class AlreadyCommitted(Exception):
    """This very transfer committed earlier; raised to roll back the repeat."""


def transfer_message(
    transfer_no: str, from_account: str, to_account: str, amount: Decimal
) -> dict[str, str]:
    """The message body bank2 receives; the amount travels as an exact string."""
    return {"transfer_no": transfer_no, "to_account": to_account, "amount": str(amount)}


def make_transfer(outbox_app: Outbox) -> Transfer:
    """The transfer operation of bank1, bound to ``outbox_app``'s database."""

    @outbox_app.transactional_message(
        topic=TOPIC, key="from_account", message_id="transfer_no", payload=transfer_message
    )
    def transfer(
        session: Session, transfer_no: str, from_account: str, to_account: str, amount: Decimal
    ) -> Decimal:
        conn = session.connection()
        # Writing first takes the account's row lock (SQLite: the write lock) before
        # anything is read, so concurrent transfers cannot both spend the same money.
        debited = conn.execute(
            update(accounts)
            .where(accounts.c.account_no == from_account, accounts.c.balance >= amount)
            .values(balance=accounts.c.balance - amount)
        ).rowcount
        earlier = conn.execute(
            select(transfers.c.from_account, transfers.c.to_account, transfers.c.amount)
            .where(transfers.c.transfer_no == transfer_no)
        ).first()
        if earlier is not None:
            if tuple(earlier) == (from_account, to_account, amount):
                raise AlreadyCommitted(transfer_no)
            raise TransferNumberReused(
                f"transfer_no {transfer_no} was already used for a different transfer"
            )
        if debited != 1:
            if conn.scalar(select(accounts.c.id).where(accounts.c.account_no == from_account)):
                raise InsufficientFunds(
                    f"insufficient funds in account {from_account} for {amount}"
                )
            raise UnknownAccount(f"bank1 has no account {from_account}")
        conn.execute(transfers.insert().values(
            transfer_no=transfer_no, from_account=from_account, to_account=to_account,
            amount=amount, created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
        ))
        return Decimal(conn.execute(
            select(accounts.c.balance).where(accounts.c.account_no == from_account)
        ).scalar_one())

    return transfer


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def _same_as_committed(engine: Engine, req: TransferRequest) -> bool | None:
    """After a key clash: True if ``req`` repeats the committed transfer, None if none."""
    with engine.connect() as conn:
        row = conn.execute(
            select(transfers.c.from_account, transfers.c.to_account, transfers.c.amount)
            .where(transfers.c.transfer_no == req.transfer_no)
        ).first()
    if row is None:
        return None
    return tuple(row) == (req.from_account, req.to_account, req.amount)


def create_app(
    engine: Engine, delivery: DeliveryAdapter | None = None, *,
    local_transaction_timeout: dt.timedelta = DEFAULT_LOCAL_TRANSACTION_TIMEOUT,
) -> Starlette:
    """The HTTP API of bank1 on ``engine`` (tables must exist: see ``setup``).

    ``delivery`` is how the transfer message leaves: the local outbox by default.
    """
    transfer = make_transfer(Outbox(engine, delivery=delivery,
                                    local_transaction_timeout=local_transaction_timeout))

    async def post_transfer(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"body is larger than {MAX_BODY_BYTES} bytes")
        try:
            req = parse_transfer(body)
        except BadRequest as exc:
            return _error(400, str(exc))
        fields: dict[str, Any] = {"transfer_no": req.transfer_no, "amount": str(req.amount)}
        try:
            balance = await run_in_threadpool(
                transfer, req.transfer_no, req.from_account, req.to_account, req.amount
            )
        except AlreadyCommitted:
            log.info("transfer_repeated", **fields)
            return JSONResponse({"status": "already committed"}, status_code=200)
        except TransferRefused as exc:
            log.info("transfer_refused", reason=str(exc), **fields)
            return _error(exc.status_code, str(exc))
        except IntegrityError:
            # A concurrent request with the same transfer_no committed first.
            same = await run_in_threadpool(_same_as_committed, engine, req)
            if same:
                return JSONResponse({"status": "already committed"}, status_code=200)
            if same is False:
                return _error(409, f"transfer_no {req.transfer_no} was already used "
                                   "for a different transfer")
            log.exception("transfer_failed", **fields)
            return _error(500, "transfer failed; retry with the same transfer_no")
        except SQLAlchemyError as exc:
            # The outcome may be unknown; a retry with the same number is safe.
            log.error("transfer_failed", error=type(exc).__name__, **fields)
            return _error(503, "database unavailable; retry with the same transfer_no")
        log.info("transfer_committed", balance=str(balance), **fields)
        return JSONResponse({"status": "committed"}, status_code=201)

    async def get_account(request: Request) -> JSONResponse:
        account_no = request.path_params["account_no"]

        def read() -> Any:
            with engine.connect() as conn:
                return conn.execute(
                    select(accounts.c.account_no, accounts.c.account_name, accounts.c.balance)
                    .where(accounts.c.account_no == account_no)
                ).first()

        row = await run_in_threadpool(read)
        if row is None:
            return _error(404, f"bank1 has no account {account_no}")
        return JSONResponse({"account_no": row.account_no, "account_name": row.account_name,
                             "balance": str(row.balance)})

    async def health(_request: Request) -> JSONResponse:
        def ping() -> None:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(ping)
        except SQLAlchemyError as exc:
            return JSONResponse({"status": "database unavailable", "error": type(exc).__name__},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/transfers", post_transfer, methods=["POST"]),
        Route("/accounts/{account_no}", get_account, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bank_transfer.bank1", description=__doc__)
    url_option(parser, "--db", "bank1's database URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    add_transport_options(parser, transport_db_help=None)
    parser.add_argument("--outbox-only", action="store_true",
                        help="with --transport rocketmq: no half messages, every message is "
                             "an outbox row that the relay publishes")
    parser.add_argument("--local-transaction-timeout", type=float,
                        default=DEFAULT_LOCAL_TRANSACTION_TIMEOUT.total_seconds(),
                        help="seconds after which a check-back finding no transaction-log row "
                             "answers ROLLBACK (default %(default)s)")
    args = parser.parse_args(argv)
    configure_logging("bank1")
    faults.install_commit_hooks()  # chaos runs only: see bank_transfer.chaos.faults
    engine = create_engine(args.db)
    producer: RocketMQTransactionalProducer | None = None
    if args.transport == ROCKETMQ and not args.outbox_only:
        # The guard row: if bank1 dies before the broker takes the commit and the
        # broker then gives up on the half message, the relay sends the message.
        producer = faults.producer_class()(
            rocketmq_config(args.rocketmq_endpoints), [TOPIC], fallback_to_outbox=True,
            guard_after=dt.timedelta(seconds=2 * args.local_transaction_timeout),
        )
    # Decorating makes the producer learn the topic.
    app = create_app(engine, delivery=producer, local_transaction_timeout=dt.timedelta(
        seconds=args.local_transaction_timeout))
    if producer is not None:
        try:
            producer.start()  # now, so that check-backs can reach this process
        except BrokerUnavailableError as exc:
            # Each transfer tries again; until the broker answers they use the outbox.
            log.warning("rocketmq_unreachable_at_start", error=str(exc))
    log.info("bank1_starting", db=safe_url(args.db), host=args.host, port=args.port,
             transport=args.transport)
    try:
        # uvicorn stops gracefully on SIGTERM and SIGINT by itself.
        uvicorn.run(app, host=args.host, port=args.port, log_config=None)
    finally:
        if producer is not None:
            producer.close()
        engine.dispose()
    log.info("bank1_stopped")


if __name__ == "__main__":
    main()
