"""bank1's HTTP API: what it accepts, what it refuses, and what a refusal leaves behind,
with either way of writing the message (the decorator, or the route's own session);
and its refund handler."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette

from bank_transfer import REFUND_GROUP, REFUND_TOPIC
from bank_transfer.bank1 import create_app, make_refund
from bank_transfer.models import refunds
from bank_transfer.setup import setup
from outbox import (
    AsyncIdempotentConsumer,
    JsonCodec,
    Message,
    Outcome,
    create_async_engine,
    create_engine,
)
from outbox.schema import outbox_messages
from outbox.testing import InMemoryBroker


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'bank1.db'}")
    setup(engine, "bank1")
    yield engine
    engine.dispose()


class AppClient:
    """Calls the ASGI app in process (starlette's own AppClient wants httpx2)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bank1") as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(call())

    def get(self, url: str) -> httpx.Response:
        return self.request("GET", url)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@pytest.fixture(params=["decorator", "session"])
def client(engine: Engine, request: pytest.FixtureRequest) -> AppClient:
    # Without a pool: every request runs in an event loop of its own.
    async_engine = create_async_engine(engine.url, poolclass=NullPool)
    return AppClient(create_app(async_engine, send_style=str(request.param)))


def transfer(client: AppClient, transfer_no: str = "T-1", amount: Any = "100.00",
             **overrides: Any) -> httpx.Response:
    body = {"transfer_no": transfer_no, "amount": amount, "from_account": "1",
            "to_account": "2", **overrides}
    return client.post("/transfers", json=body)


def balance(client: AppClient) -> str:
    response = client.get("/accounts/1")
    assert response.status_code == 200
    return str(response.json()["balance"])


def outbox_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(outbox_messages)) or 0)


def test_a_transfer_debits_and_writes_its_message(client: AppClient, engine: Engine) -> None:
    response = transfer(client, "T-1", "100.10")
    assert (response.status_code, response.json()) == (201, {"status": "committed"})
    assert balance(client) == "9899.90"
    with engine.connect() as conn:
        row = conn.execute(select(outbox_messages)).one()
    assert (row.message_id, row.topic, row.key) == ("T-1", "bank-transfer", "1")
    body = JsonCodec().decode(row.payload)
    assert body == {"transfer_no": "T-1", "to_account": "2", "amount": "100.10"}


def test_a_json_number_is_an_exact_amount(client: AppClient) -> None:
    response = client.post("/transfers", content=b'{"transfer_no": "T-1", "amount": 0.1, '
                                                 b'"from_account": "1", "to_account": "2"}')
    assert response.status_code == 201
    assert balance(client) == "9999.90"


def test_the_same_transfer_again_is_answered_without_a_second_debit(
    client: AppClient, engine: Engine
) -> None:
    assert transfer(client, "T-1", "100").status_code == 201
    response = transfer(client, "T-1", "100.00")
    assert (response.status_code, response.json()) == (200, {"status": "already committed"})
    assert balance(client) == "9900.00"
    assert outbox_rows(engine) == 1


def test_a_transfer_number_reused_for_another_amount_is_refused(
    client: AppClient, engine: Engine
) -> None:
    assert transfer(client, "T-1", "100").status_code == 201
    response = transfer(client, "T-1", "200")
    assert response.status_code == 409
    assert "already used" in response.json()["error"]
    assert balance(client) == "9900.00"
    assert outbox_rows(engine) == 1


def test_insufficient_funds_writes_nothing_and_sends_nothing(
    client: AppClient, engine: Engine
) -> None:
    response = transfer(client, "T-1", "10000.01")
    assert response.status_code == 409
    assert "insufficient funds" in response.json()["error"]
    assert balance(client) == "10000.00"
    assert outbox_rows(engine) == 0
    # The refused number was not used up: it can still be spent on a possible amount.
    assert transfer(client, "T-1", "10000.00").status_code == 201
    assert balance(client) == "0.00"


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"amount": None}, "amount is required"),
    ({"amount": "-5"}, "greater than zero"),
    ({"amount": -5}, "greater than zero"),
    ({"amount": "0"}, "greater than zero"),
    ({"amount": "0.00"}, "greater than zero"),
    ({"amount": "ten"}, "must be a number"),
    ({"amount": "1e3"}, "must be a number"),
    ({"amount": "NaN"}, "must be a number"),
    ({"amount": True}, "must be a number"),
    ({"amount": "1.005"}, "more than 2 decimal places"),
    ({"amount": "1000000.01"}, "larger than the limit"),
    ({"from_account": "9"}, "bank1 has no account 9"),
    ({"from_account": "x1"}, "from_account must be"),
    ({"to_account": "1"}, "must differ"),
    ({"to_account": None}, "to_account is required"),
    ({"transfer_no": ""}, "transfer_no must not be empty"),
    ({"transfer_no": "T" * 65}, "longer than 64"),
    ({"transfer_no": "T 1"}, "may only contain"),
    ({"transfer_no": 7}, "transfer_no must be a string"),
    ({"extra": 1}, "unknown field(s): extra"),
])
def test_bad_input_is_refused_with_its_reason(
    client: AppClient, engine: Engine, overrides: dict[str, Any], reason: str
) -> None:
    body = {"transfer_no": "T-1", "amount": "100.00", "from_account": "1", "to_account": "2"}
    response = client.post("/transfers", json={**body, **overrides})
    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert balance(client) == "10000.00"
    assert outbox_rows(engine) == 0


@pytest.mark.parametrize("content", [b"{", b"[]", b"", b"\xff"])
def test_a_body_that_is_not_a_json_object_is_refused(client: AppClient, content: bytes) -> None:
    response = client.post("/transfers", content=content)
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


def test_accounts_and_health(client: AppClient) -> None:
    assert client.get("/accounts/1").json() == {
        "account_no": "1", "account_name": "Zhang San", "balance": "10000.00"}
    assert client.get("/accounts/2").status_code == 404
    assert client.get("/health").json() == {"status": "ok"}


def test_balances_stay_exact_over_many_cents(client: AppClient) -> None:
    for n in range(30):
        assert transfer(client, f"T-{n}", "0.10").status_code == 201
    assert Decimal(balance(client)) == Decimal("10000.00") - 30 * Decimal("0.10")


# -- refunds: bank2 sent a transfer back ----------------------------------------------


def refund_message(transfer_no: str, amount: str) -> Message:
    return Message(topic=REFUND_TOPIC, id=transfer_no, payload=JsonCodec().encode(
        {"transfer_no": transfer_no, "amount": amount, "reason": "account 3 is frozen"}))


def consume_refunds(engine: Engine, broker: InMemoryBroker) -> list[Outcome]:
    async def run() -> list[Outcome]:
        async_engine = create_async_engine(engine.url, poolclass=NullPool)
        consumer = AsyncIdempotentConsumer(
            async_engine, broker.async_subscriber(REFUND_TOPIC, REFUND_GROUP), REFUND_GROUP,
            make_refund())
        subscriber = consumer.subscriber
        return [await consumer.handle(d) for d in await subscriber.fetch(10, 0.0)]

    return asyncio.run(run())


def test_a_refund_credits_account_1_once(client: AppClient, engine: Engine) -> None:
    assert transfer(client, "T-1", "100.00", to_account="3").status_code == 201
    broker = InMemoryBroker()
    broker.publish(refund_message("T-1", "100.00"))
    broker.deliver_again("T-1")
    assert consume_refunds(engine, broker) == [Outcome.PROCESSED, Outcome.DUPLICATE]
    assert balance(client) == "10000.00"
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(select(refunds.c.transfer_no, refunds.c.amount))
                ] == [("T-1", Decimal("100.00"))]


@pytest.mark.parametrize(("message", "reason"), [
    (refund_message("T-9", "100.00"), "matches no transfer"),
    (refund_message("T-1", "100.01"), "matches no transfer"),
    (refund_message("T-1", "-1"), "greater than zero"),
    (Message(topic=REFUND_TOPIC, id="T-1", payload=b'{"transfer_no": "T-2"}'),
     "its message id"),
])
def test_a_refund_bank1_never_owed_is_dead_lettered(
    client: AppClient, engine: Engine, message: Message, reason: str
) -> None:
    assert transfer(client, "T-1", "100.00", to_account="3").status_code == 201
    broker = InMemoryBroker()
    broker.publish(message)
    assert consume_refunds(engine, broker) == [Outcome.DEAD]
    [(_, dead_reason)] = broker.dead_letters(REFUND_TOPIC, REFUND_GROUP)
    assert dead_reason is not None and reason in dead_reason
    assert balance(client) == "9900.00"
