"""The two banks' tables, their seed accounts, and the Money column type."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    TypeDecorator,
)
from sqlalchemy.types import TypeEngine

CENT = Decimal("0.01")
ACCOUNT_NO_LENGTH = 32
TRANSFER_NO_LENGTH = 64

BankName = Literal["bank1", "bank2"]


class Money(TypeDecorator[Decimal]):
    """NUMERIC(18, 2) read and written as Decimal.

    SQLite has no exact decimal type (its NUMERIC stores binary floats), so there
    the amount is kept as whole cents in an integer column instead.
    """

    impl = Numeric(18, 2)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(18, 2, asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal | int):
            raise TypeError(f"money must be a Decimal, got {type(value).__name__}")
        amount = Decimal(value)
        if amount != amount.quantize(CENT):
            raise ValueError(f"{amount} has more than two decimals")
        return int(amount.scaleb(2)) if dialect.name == "sqlite" else amount.quantize(CENT)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)).scaleb(-2).quantize(CENT)
        return Decimal(value).quantize(CENT)


def _accounts(metadata: MetaData) -> Table:
    return Table(
        "accounts",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("account_name", String(100), nullable=False),
        Column("account_no", String(ACCOUNT_NO_LENGTH), nullable=False, unique=True),
        Column("balance", Money(), nullable=False),
        # A frozen account takes no credit: bank2 sends the money back instead.
        Column("frozen", Boolean(), nullable=False, default=False),
        # Last line of defence: no bug may take an account below zero.
        CheckConstraint("balance >= 0", name="ck_accounts_balance_not_negative"),
    )


bank1_metadata = MetaData()
bank1_accounts = _accounts(bank1_metadata)
transfers = Table(
    "transfers",
    bank1_metadata,
    Column("transfer_no", String(TRANSFER_NO_LENGTH), primary_key=True),
    Column("from_account", String(ACCOUNT_NO_LENGTH), nullable=False),
    Column("to_account", String(ACCOUNT_NO_LENGTH), nullable=False),
    Column("amount", Money(), nullable=False),
    Column("created_at", DateTime(timezone=False), nullable=False),
)
#: Transfers bank2 sent back (a refund message), credited to account 1 once each.
refunds = Table(
    "refunds",
    bank1_metadata,
    Column("transfer_no", String(TRANSFER_NO_LENGTH), primary_key=True),
    Column("amount", Money(), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("refunded_at", DateTime(timezone=False), nullable=False),
)

bank2_metadata = MetaData()
bank2_accounts = _accounts(bank2_metadata)
credits = Table(
    "credits",
    bank2_metadata,
    Column("transfer_no", String(TRANSFER_NO_LENGTH), primary_key=True),
    Column("amount", Money(), nullable=False),
    Column("credited_at", DateTime(timezone=False), nullable=False),
)
#: Transfers bank2 refused to credit (a rule of bank2's) and sent back to bank1.
returns = Table(
    "returns",
    bank2_metadata,
    Column("transfer_no", String(TRANSFER_NO_LENGTH), primary_key=True),
    Column("to_account", String(ACCOUNT_NO_LENGTH), nullable=False),
    Column("amount", Money(), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("returned_at", DateTime(timezone=False), nullable=False),
)


@dataclass(frozen=True)
class Seed:
    id: int
    account_name: str
    account_no: str
    balance: Decimal
    frozen: bool = False


#: Account 3 (Wang Wu, bank2) is frozen: transfers to it come back to account 1.
FROZEN_ACCOUNT = "3"

BANKS: dict[BankName, tuple[MetaData, Table, tuple[Seed, ...]]] = {
    "bank1": (bank1_metadata, bank1_accounts,
              (Seed(1, "Zhang San", "1", Decimal("10000.00")),)),
    "bank2": (bank2_metadata, bank2_accounts,
              (Seed(2, "Li Si", "2", Decimal("0.00")),
               Seed(3, "Wang Wu", FROZEN_ACCOUNT, Decimal("0.00"), frozen=True))),
}
