"""bank1: an asyncio service that debits account 1 and writes the transfer message in
one local transaction, and refunds account 1 when bank2 sends a transfer back.

Run with ``python -m bank_transfer.bank1 --db URL --transport-db URL --port N``. A
relay process (``bank_transfer.relay``) publishes the committed messages.

It is a Starlette application on an ``AsyncSession`` (SQLAlchemy asyncio). A
transfer is made in one of two ways, both keeping the promise (``--send-style``):
the decorated ``async def`` (the framework opens the session), or a session of the
route's own, to which ``AsyncOutbox.send`` adds the message (the way a service with
a session per request does it); ``alternate`` (the default) takes turns.

Refunds: bank2 answers a transfer to a frozen account with a refund message; an
``AsyncIdempotentConsumer`` in this event loop credits account 1 once per refund.

With ``--transport rocketmq`` the message leaves as a RocketMQ transactional half
message instead, committed once the local transaction has committed; the broker's
check-back is answered from the transaction log. If the broker cannot be reached
the transfer still succeeds: the message falls back to an outbox row, which the
relay (run with ``--transport rocketmq`` as well) publishes once the broker is back.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import structlog
import uvicorn
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from outbox import (
    AsyncIdempotentConsumer,
    AsyncOutbox,
    BrokerUnavailableError,
    ConsumerConfig,
    ReceivedMessage,
    Reject,
    create_async_engine,
)
from outbox.aio import AsyncSqlTransport
from outbox.brokers import open_broker
from outbox.db import safe_url
from outbox.transaction import DEFAULT_LOCAL_TRANSACTION_TIMEOUT
from outbox.typing import AsyncSubscriber
from outbox_rocketmq import AsyncRocketMQSubscriber, RocketMQTransactionalProducer

from . import REFUND_DEAD_LETTER_TOPIC, REFUND_GROUP, REFUND_TOPIC, TOPIC
from .chaos import faults
from .models import bank1_accounts as accounts
from .models import refunds, transfers
from .observability import TRACE_DIR_VAR, TracingMiddleware, observe
from .runs import RUN_ID, AsyncOnlyRun
from .runtime import configure_logging, url_option
from .transports import (
    BROKER,
    ROCKETMQ,
    add_transport_options,
    check_transport_options,
    rocketmq_config,
)
from .validation import BadRequest, TransferRequest, parse_amount, parse_transfer

log = structlog.get_logger("bank_transfer.bank1")

MAX_BODY_BYTES = 16 * 1024
SEND_STYLES = ("decorator", "session", "alternate")

Transfer = Callable[[str, str, str, Decimal], Awaitable[Decimal]]
RefundHandler = Callable[[AsyncSession, ReceivedMessage], Awaitable[None]]


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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


async def debit(
    session: AsyncSession, transfer_no: str, from_account: str, to_account: str, amount: Decimal
) -> Decimal:
    """The business change of a transfer, on whichever session it is given."""
    # Writing first takes the account's row lock (SQLite: the write lock) before
    # anything is read, so concurrent transfers cannot both spend the same money.
    result: Any = await session.execute(
        update(accounts)
        .where(accounts.c.account_no == from_account, accounts.c.balance >= amount)
        .values(balance=accounts.c.balance - amount)
    )
    debited = result.rowcount
    earlier = (await session.execute(
        select(transfers.c.from_account, transfers.c.to_account, transfers.c.amount)
        .where(transfers.c.transfer_no == transfer_no)
    )).first()
    if earlier is not None:
        if tuple(earlier) == (from_account, to_account, amount):
            raise AlreadyCommitted(transfer_no)
        raise TransferNumberReused(
            f"transfer_no {transfer_no} was already used for a different transfer"
        )
    if debited != 1:
        if await session.scalar(select(accounts.c.id).where(accounts.c.account_no == from_account)):
            raise InsufficientFunds(f"insufficient funds in account {from_account} for {amount}")
        raise UnknownAccount(f"bank1 has no account {from_account}")
    await session.execute(transfers.insert().values(
        transfer_no=transfer_no, from_account=from_account, to_account=to_account,
        amount=amount, created_at=_now(),
    ))
    return Decimal((await session.execute(
        select(accounts.c.balance).where(accounts.c.account_no == from_account)
    )).scalar_one())


def make_transfer(outbox_app: AsyncOutbox, style: str = "decorator") -> Transfer:
    """The transfer operation of bank1, bound to ``outbox_app``'s database.

    ``decorator``: ``@transactional_message`` opens the session and writes the message.
    ``session``: a session of the caller's own, as a web framework's dependency would
    give it, with ``AsyncOutbox.send`` on it. ``alternate`` takes turns.
    """
    if style not in SEND_STYLES:
        raise ValueError(f"send style must be one of {SEND_STYLES}, got {style!r}")

    @outbox_app.transactional_message(
        topic=TOPIC, key="from_account", message_id="transfer_no", payload=transfer_message
    )
    async def decorated(
        session: AsyncSession, transfer_no: str, from_account: str, to_account: str,
        amount: Decimal,
    ) -> Decimal:
        return await debit(session, transfer_no, from_account, to_account, amount)

    async def in_session(
        transfer_no: str, from_account: str, to_account: str, amount: Decimal
    ) -> Decimal:
        async with AsyncSession(outbox_app.engine) as session, session.begin():
            balance = await debit(session, transfer_no, from_account, to_account, amount)
            await outbox_app.send(
                session, topic=TOPIC, key=from_account, message_id=transfer_no,
                payload=transfer_message(transfer_no, from_account, to_account, amount),
            )
        return balance

    turns = itertools.cycle([decorated, in_session])
    fixed = {"decorator": decorated, "session": in_session}.get(style)

    async def transfer(
        transfer_no: str, from_account: str, to_account: str, amount: Decimal
    ) -> Decimal:
        how = fixed or next(turns)
        return await how(transfer_no, from_account, to_account, amount)

    return transfer


def make_refund() -> RefundHandler:
    """The refund handler: account 1 gets back a transfer bank2 refused, once.

    It runs in the consumer's transaction after the inbox row for the refund (whose
    id is the transfer number) was inserted.
    """

    async def refund(session: AsyncSession, message: ReceivedMessage) -> None:
        body = message.body
        if not isinstance(body, dict) or body.get("transfer_no") != message.id:
            raise Reject("a refund names its transfer_no, which is its message id")
        try:
            amount = parse_amount(str(body.get("amount")))
        except BadRequest as exc:
            raise Reject(str(exc)) from None
        reason = str(body.get("reason") or "sent back")[:200]
        sent = (await session.execute(
            select(transfers.c.from_account, transfers.c.amount)
            .where(transfers.c.transfer_no == message.id)
        )).first()
        if sent is None or sent.amount != amount:
            raise Reject(f"refund {message.id} for {amount} matches no transfer of bank1")
        await session.execute(update(accounts).where(accounts.c.account_no == sent.from_account)
                              .values(balance=accounts.c.balance + amount))
        await session.execute(refunds.insert().values(
            transfer_no=message.id, amount=amount, reason=reason, refunded_at=_now()))
        log.info("refunded", transfer_no=message.id, account=sent.from_account,
                 amount=str(amount), reason=reason)

    return refund


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


async def _same_as_committed(engine: AsyncEngine, req: TransferRequest) -> bool | None:
    """After a key clash: True if ``req`` repeats the committed transfer, None if none."""
    async with engine.connect() as conn:
        row = (await conn.execute(
            select(transfers.c.from_account, transfers.c.to_account, transfers.c.amount)
            .where(transfers.c.transfer_no == req.transfer_no)
        )).first()
    if row is None:
        return None
    return tuple(row) == (req.from_account, req.to_account, req.amount)


def create_app(
    engine: AsyncEngine, delivery: Any = None, *,
    refund_subscriber: AsyncSubscriber | None = None, send_style: str = "decorator",
    local_transaction_timeout: dt.timedelta = DEFAULT_LOCAL_TRANSACTION_TIMEOUT,
) -> Starlette:
    """The HTTP API of bank1 on ``engine`` (tables must exist: see ``setup``).

    ``delivery`` is how the transfer message leaves: the local outbox by default.
    With ``refund_subscriber``, the app consumes bank2's refunds in its event loop
    while it runs.
    """
    outbox_app = AsyncOutbox(engine, delivery=delivery,
                             local_transaction_timeout=local_transaction_timeout)
    transfer = make_transfer(outbox_app, send_style)

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
            balance = await transfer(req.transfer_no, req.from_account, req.to_account,
                                     req.amount)
        except AlreadyCommitted:
            log.info("transfer_repeated", **fields)
            return JSONResponse({"status": "already committed"}, status_code=200)
        except TransferRefused as exc:
            log.info("transfer_refused", reason=str(exc), **fields)
            return _error(exc.status_code, str(exc))
        except IntegrityError:
            # A concurrent request with the same transfer_no committed first.
            same = await _same_as_committed(engine, req)
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
        async with engine.connect() as conn:
            row = (await conn.execute(
                select(accounts.c.account_no, accounts.c.account_name, accounts.c.balance)
                .where(accounts.c.account_no == account_no)
            )).first()
        if row is None:
            return _error(404, f"bank1 has no account {account_no}")
        return JSONResponse({"account_no": row.account_no, "account_name": row.account_name,
                             "balance": str(row.balance)})

    async def health(_request: Request) -> JSONResponse:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            return JSONResponse({"status": "database unavailable", "error": type(exc).__name__},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if isinstance(delivery, RocketMQTransactionalProducer):
            try:
                # Now, in this loop: check-backs (of half messages sent before a
                # restart, too) are answered from this database through it.
                await delivery.astart()
            except BrokerUnavailableError as exc:
                # Each transfer tries again; until the broker answers they use the outbox.
                log.warning("rocketmq_unreachable_at_start", error=str(exc))
        consumer = None
        if refund_subscriber is not None:
            consumer = AsyncIdempotentConsumer(
                engine, refund_subscriber, REFUND_GROUP, make_refund(),
                config=ConsumerConfig(wait_seconds=0.5)).start()
        try:
            yield
        finally:
            if consumer is not None:
                await consumer.stop()  # the refund in hand finishes first
            if refund_subscriber is not None:
                await refund_subscriber.close()  # leaves its consumer group at once
            if isinstance(delivery, RocketMQTransactionalProducer):
                await delivery.aclose()  # ends the half messages still in hand
            await engine.dispose()

    # While tracing (see bank_transfer.observability), each request is a span.
    middleware = [Middleware(TracingMiddleware)] if os.environ.get(TRACE_DIR_VAR) else []
    return Starlette(middleware=middleware, routes=[
        Route("/transfers", post_transfer, methods=["POST"]),
        Route("/accounts/{account_no}", get_account, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bank_transfer.bank1", description=__doc__)
    url_option(parser, "--db", "bank1's database URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    add_transport_options(parser, transport_db_help="the SQL transport's database URL "
                                                    "(bank2's refunds come from there)")
    parser.add_argument("--outbox-only", action="store_true",
                        help="with --transport rocketmq: no half messages, every message is "
                             "an outbox row that the relay publishes")
    parser.add_argument("--send-style", choices=SEND_STYLES, default="alternate",
                        help="how a transfer writes its message (default %(default)s)")
    parser.add_argument("--run-id", help="refund only transfers numbered RUN_ID-... (a demo "
                                         "run on a shared broker)")
    parser.add_argument("--refund-group", default=REFUND_GROUP,
                        help="the transport's consumer group for refunds (default "
                             f"{REFUND_GROUP}); the inbox de-duplicates under {REFUND_GROUP}")
    parser.add_argument("--local-transaction-timeout", type=float,
                        default=DEFAULT_LOCAL_TRANSACTION_TIMEOUT.total_seconds(),
                        help="seconds after which a check-back finding no transaction-log row "
                             "answers ROLLBACK (default %(default)s)")
    args = parser.parse_args(argv)
    check_transport_options(parser, args)
    configure_logging("bank1")
    faults.install_commit_hooks()  # chaos runs only: see bank_transfer.chaos.faults
    engine = create_async_engine(args.db)
    producer: RocketMQTransactionalProducer | None = None
    subscriber: AsyncSubscriber
    if args.transport == ROCKETMQ:
        config = rocketmq_config(args.rocketmq_endpoints, args.rocketmq_namesrv)
        subscriber = AsyncRocketMQSubscriber(config, REFUND_TOPIC, args.refund_group,
                                             dead_letter_topic=REFUND_DEAD_LETTER_TOPIC)
        if not args.outbox_only:
            # The guard row: if bank1 dies before the broker takes the commit and the
            # broker then gives up on the half message, the relay sends the message.
            producer = faults.producer_class()(
                config, [TOPIC], fallback_to_outbox=True,
                guard_after=dt.timedelta(seconds=2 * args.local_transaction_timeout),
            )
    elif args.transport == BROKER:
        # No half messages: every transfer's message is an outbox row, published by
        # the relay.
        subscriber = open_broker(args.broker).async_subscriber(REFUND_TOPIC, args.refund_group)
    else:
        subscriber = AsyncSqlTransport(create_async_engine(args.transport_db)).subscriber(
            REFUND_TOPIC, args.refund_group)
    if args.run_id is not None:
        if not RUN_ID.fullmatch(args.run_id):
            parser.error("--run-id must be 1 to 20 letters or digits")
        # Other runs' refunds on the shared topic are acknowledged unprocessed.
        subscriber = AsyncOnlyRun(subscriber, args.run_id)
    # Decorating makes the producer learn the topic.
    app = create_app(engine, delivery=producer, refund_subscriber=subscriber,
                     send_style=args.send_style,
                     local_transaction_timeout=dt.timedelta(
                         seconds=args.local_transaction_timeout))
    log.info("bank1_starting", db=safe_url(args.db), host=args.host, port=args.port,
             transport=args.transport, send_style=args.send_style)
    # uvicorn stops gracefully on SIGTERM and SIGINT by itself. The lifespan starts
    # the producer and the refund consumer, and stops them at the end.
    stop_observing = observe("bank1")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_config=None)
    finally:
        stop_observing()
    log.info("bank1_stopped")


if __name__ == "__main__":
    main()
