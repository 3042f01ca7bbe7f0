"""Parsing a transfer request; every refusal says what is wrong."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .models import ACCOUNT_NO_LENGTH, CENT, TRANSFER_NO_LENGTH

#: The most one transfer may move; larger amounts are refused as bad input.
MAX_AMOUNT = Decimal("1000000.00")

FIELDS = ("transfer_no", "amount", "from_account", "to_account")
TRANSFER_NO = re.compile(r"[A-Za-z0-9_.:-]+")
ACCOUNT_NO = re.compile(r"[0-9]+")
# Plain decimal notation only: no exponent, "+", spaces, underscores or "NaN".
AMOUNT_TEXT = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?")


class BadRequest(ValueError):
    """The request cannot be a transfer; the message is the reason shown to the client."""


@dataclass(frozen=True)
class TransferRequest:
    transfer_no: str
    from_account: str
    to_account: str
    amount: Decimal


def parse_transfer(body: bytes) -> TransferRequest:
    """Check a ``POST /transfers`` body and return the transfer it asks for."""
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}; expected {', '.join(FIELDS)}")
    transfer_no = parse_transfer_no(data.get("transfer_no"))
    from_account = parse_account("from_account", data.get("from_account"))
    to_account = parse_account("to_account", data.get("to_account"))
    if from_account == to_account:
        raise BadRequest("from_account and to_account must differ")
    return TransferRequest(transfer_no, from_account, to_account, parse_amount(data.get("amount")))


def parse_transfer_no(value: Any) -> str:
    if value is None:
        raise BadRequest("transfer_no is required")
    if not isinstance(value, str):
        raise BadRequest("transfer_no must be a string")
    if not value:
        raise BadRequest("transfer_no must not be empty")
    if len(value) > TRANSFER_NO_LENGTH:
        raise BadRequest(f"transfer_no is longer than {TRANSFER_NO_LENGTH} characters")
    if not TRANSFER_NO.fullmatch(value):
        raise BadRequest("transfer_no may only contain letters, digits and - _ . :")
    return value


def parse_account(field: str, value: Any) -> str:
    if value is None:
        raise BadRequest(f"{field} is required")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{field} must be an account number such as \"1\"")
    if len(value) > ACCOUNT_NO_LENGTH or not ACCOUNT_NO.fullmatch(value):
        raise BadRequest(f"{field} must be 1 to {ACCOUNT_NO_LENGTH} digits")
    return value


def parse_amount(value: Any) -> Decimal:
    """A positive amount with at most two decimals, from a JSON number or string."""
    if value is None:
        raise BadRequest("amount is required")
    if isinstance(value, bool):
        raise BadRequest("amount must be a number such as \"100.00\"")
    if isinstance(value, str):
        if not AMOUNT_TEXT.fullmatch(value):
            raise BadRequest("amount must be a number such as \"100.00\"")
        amount = Decimal(value)
    elif isinstance(value, int | Decimal):  # JSON numbers arrive as int or Decimal
        amount = Decimal(value)
    else:
        raise BadRequest("amount must be a number such as \"100.00\"")
    if not amount.is_finite():
        raise BadRequest("amount must be a number such as \"100.00\"")
    if amount <= 0:
        raise BadRequest("amount must be greater than zero")
    if amount > MAX_AMOUNT:
        raise BadRequest(f"amount is larger than the limit of {MAX_AMOUNT} per transfer")
    try:
        exact = amount == amount.quantize(CENT)
    except InvalidOperation:
        exact = False
    if not exact:
        raise BadRequest("amount has more than 2 decimal places")
    return amount.quantize(CENT)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
