"""bank2's handler under the idempotent consumer: credit once, reject the impossible,
send a transfer to a frozen account back (once) in the handler's transaction."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from bank_transfer import CONSUMER_GROUP, REFUND_TOPIC, TOPIC
from bank_transfer.bank2 import make_credit
from bank_transfer.models import bank2_accounts, credits, returns
from bank_transfer.setup import setup, setup_transport
from outbox import IdempotentConsumer, JsonCodec, Message, Outbox, SqlTransport, create_engine
from outbox.schema import outbox_messages
from outbox.storage import read_messages


@dataclass
class Bank2:
    engine: Engine
    transport: SqlTransport
    consumer: IdempotentConsumer

    def send(self, transfer_no: str, body: dict[str, Any]) -> None:
        self.transport.publisher().publish(
            Message(topic=TOPIC, id=transfer_no, key="1", payload=JsonCodec().encode(body)))

    def balance(self, account: str = "2") -> str:
        with self.engine.connect() as conn:
            return str(conn.scalar(select(bank2_accounts.c.balance)
                                   .where(bank2_accounts.c.account_no == account)))

    def refunds(self) -> list[tuple[str, Any]]:
        """bank2's outbox: the refund messages it wrote, with their bodies."""
        with self.engine.connect() as conn:
            return [(m.id, JsonCodec().decode(m.payload))
                    for m in read_messages(conn, status="pending")]

    def credited(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {r.transfer_no: str(r.amount) for r in conn.execute(select(credits))}


@pytest.fixture
def bank2(tmp_path: Path) -> Iterator[Bank2]:
    engine = create_engine(f"sqlite:///{tmp_path / 'bank2.db'}")
    setup(engine, "bank2")
    transport = SqlTransport(create_engine(f"sqlite:///{tmp_path / 'broker.db'}"))
    setup_transport(transport.engine)
    consumer = IdempotentConsumer(
        engine, transport.subscriber(TOPIC, CONSUMER_GROUP), CONSUMER_GROUP,
        make_credit(Outbox(engine)))
    yield Bank2(engine, transport, consumer)
    engine.dispose()
    transport.engine.dispose()


def transfer(no: str, amount: Any = "100.00", to_account: Any = "2") -> dict[str, Any]:
    return {"transfer_no": no, "to_account": to_account, "amount": amount}


def test_each_transfer_is_credited_once_however_often_it_arrives(bank2: Bank2) -> None:
    bank2.send("T-1", transfer("T-1", "100.10"))
    bank2.send("T-2", transfer("T-2", "0.01"))
    bank2.send("T-1", transfer("T-1", "100.10"))
    stats = bank2.consumer.run_once(wait_seconds=0)
    assert (stats.processed, stats.duplicates) == (2, 1)
    bank2.send("T-2", transfer("T-2", "0.01"))
    assert bank2.consumer.run_once(wait_seconds=0).duplicates == 1
    assert bank2.credited() == {"T-1": "100.10", "T-2": "0.01"}
    assert bank2.balance() == "100.11"


@pytest.mark.parametrize(("body", "reason"), [
    (transfer("T-1", to_account="9"), "bank2 has no account '9'"),
    (transfer("T-1", to_account=None), "to_account must be a string"),
    (transfer("T-1", amount="-1.00"), "amount must be greater than zero"),
    (transfer("T-1", amount="1.001"), "more than 2 decimal places"),
    (transfer("T-1", amount="lots"), "amount must be a number"),
    (transfer("T-1", amount=100), "must be a decimal string"),
    (transfer("T-other"), "differs from the message id"),
    # Found by the chaos run's hostile messages: these used to fail inside Decimal
    # or the database, look retryable, and dead-letter only after every retry.
    (transfer("T-1", amount="1e400"), "amount must be a number"),
    (transfer("T-1", amount="99999999999999999999999999.99"), "larger than the limit"),
    (transfer("T-1", to_account="2\u0000"), "to_account must be 1 to"),
    (transfer("T-1", to_account="2' OR '1'='1"), "to_account must be 1 to"),
])
def test_an_impossible_transfer_is_dead_lettered_with_its_reason(
    bank2: Bank2, body: dict[str, Any], reason: str
) -> None:
    bank2.send("T-1", body)
    stats = bank2.consumer.run_once(wait_seconds=0)
    assert (stats.dead_lettered, stats.retried) == (1, 0)
    [dead] = bank2.transport.dead_letters(CONSUMER_GROUP)
    assert dead.message_id == "T-1"
    assert reason in (dead.reason or "")
    assert bank2.balance() == "0.00"
    assert bank2.credited() == {}


def test_a_well_formed_message_with_a_number_bank1_never_issues_is_not_credited(
    bank2: Bank2,
) -> None:
    # Found by the chaos run: this forged message used to be credited (money made).
    no = "T-1'; DELETE FROM credits; --"
    bank2.send(no, transfer(no))
    assert bank2.consumer.run_once(wait_seconds=0).dead_lettered == 1
    [dead] = bank2.transport.dead_letters(CONSUMER_GROUP)
    assert "transfer_no may only contain" in (dead.reason or "")
    assert bank2.balance() == "0.00"


def test_a_transfer_to_a_frozen_account_is_sent_back_once(bank2: Bank2) -> None:
    bank2.send("T-1", transfer("T-1", "100.10", to_account="3"))
    bank2.send("T-1", transfer("T-1", "100.10", to_account="3"))
    stats = bank2.consumer.run_once(wait_seconds=0)
    assert (stats.processed, stats.duplicates) == (1, 1)
    assert bank2.balance("3") == "0.00" and bank2.credited() == {}
    assert bank2.refunds() == [("T-1", {"transfer_no": "T-1", "amount": "100.10",
                                        "reason": "account 3 is frozen"})]
    with bank2.engine.connect() as conn:
        [row] = conn.execute(select(returns)).all()
        [refund_row] = conn.execute(select(outbox_messages)).all()
    assert (row.transfer_no, str(row.amount), row.to_account) == ("T-1", "100.10", "3")
    assert (refund_row.topic, refund_row.key) == (REFUND_TOPIC, None)
