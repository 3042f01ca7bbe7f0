"""The decorator's configuration and message building, with a capturing delivery
adapter in place of a database (the message is built before any I/O)."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from outbox import (
    ConfigurationError,
    JsonCodec,
    Message,
    MessageError,
    Outbox,
    transactional_message,
)
from outbox.transaction import CREATED_AT_HEADER, message_created_at


class CapturingTicket:
    """Writes nothing (the session is bound to no database) and records the outcome."""

    records: tuple[Any, ...] = ()

    def __init__(self) -> None:
        self.outcome: str | None = None

    def before_commit(self) -> None:
        pass

    def committed(self) -> None:
        self.outcome = "committed"

    def rolled_back(self) -> None:
        self.outcome = "rolled back"

    def unknown(self) -> BaseException | None:
        return None

    def duplicate(self) -> BaseException:
        raise AssertionError("nothing is written")


class CapturingDelivery:
    """A DeliveryAdapter that records the messages it was given."""

    def __init__(self) -> None:
        self.sent: list[tuple[Message, CapturingTicket]] = []

    def prepare(self, outbox: Outbox, message: Message) -> CapturingTicket:
        ticket = CapturingTicket()
        self.sent.append((message, ticket))
        return ticket


@pytest.fixture
def delivery() -> CapturingDelivery:
    return CapturingDelivery()


@pytest.fixture
def ob(delivery: CapturingDelivery) -> Outbox:
    return Outbox(sessionmaker(), delivery=delivery)


def test_message_is_built_from_the_call_arguments(ob: Outbox, delivery: CapturingDelivery) -> None:
    calls: list[tuple[object, ...]] = []

    @ob.transactional_message(
        topic="transfers", key="from_account", tag="debit",
        message_id=lambda transfer_no, *_rest: f"tx-{transfer_no}",
        payload=lambda transfer_no, from_account, amount, note="": {
            "no": transfer_no, "amount": amount},
        headers={"source": "bank1"},
    )
    def transfer(session: Session, transfer_no: int, from_account: int, amount: decimal.Decimal,
                 note: str = "") -> str:
        calls.append((session, transfer_no, from_account, amount, note))
        return f"done {transfer_no}"

    before = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert transfer(7, 1, amount=decimal.Decimal("10.25")) == "done 7"

    [(message, ticket)] = delivery.sent
    [(session, *arguments)] = calls
    assert isinstance(session, Session)
    assert arguments == [7, 1, decimal.Decimal("10.25"), ""]
    assert message.topic == "transfers"
    assert message.id == "tx-7"
    assert message.key == "1"  # an int key becomes text
    assert message.tag == "debit"
    assert JsonCodec().decode(message.payload) == {"no": 7, "amount": "10.25"}
    assert message.headers["source"] == "bank1"
    created = message_created_at(message)
    assert created is not None and before <= created <= before + dt.timedelta(seconds=5)
    assert ticket.outcome == "committed"


def test_default_payload_is_the_arguments_by_name_with_defaults(
    ob: Outbox, delivery: CapturingDelivery
) -> None:
    @ob.transactional_message(topic="t")
    def fn(session: Session, a: int, b: str = "x", *, c: decimal.Decimal) -> None:
        pass

    fn(1, c=decimal.Decimal("1.10"))
    [(message, _)] = delivery.sent
    assert JsonCodec().decode(message.payload) == {"a": 1, "b": "x", "c": "1.10"}
    assert message.key is None
    assert len(message.id) == 32
    assert set(message.headers) == {CREATED_AT_HEADER}


def test_exception_of_the_function_reaches_the_caller(
    ob: Outbox, delivery: CapturingDelivery
) -> None:
    class Insufficient(Exception):
        pass

    error = Insufficient("balance too low")

    @ob.transactional_message(topic="t")
    def fn(session: Session) -> None:
        raise error

    with pytest.raises(Insufficient) as info:
        fn()
    assert info.value is error


def test_signature_hides_the_session_and_wrong_calls_send_nothing(
    ob: Outbox, delivery: CapturingDelivery
) -> None:
    @ob.transactional_message(topic="t")
    def fn(session: Session, a: int) -> None:
        pass

    import inspect

    assert list(inspect.signature(fn).parameters) == ["a"]
    assert fn.__name__ == "fn"
    with pytest.raises(TypeError, match=r"fn\(\)"):
        fn(1, 2)
    with pytest.raises(TypeError):
        fn()
    assert delivery.sent == []


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"key": "account"}, "key='account' names no parameter"),
        ({"message_id": "nope"}, "message_id='nope' names no parameter"),
        ({"key": "session"}, "names no parameter"),  # the session is not an argument
        ({"key": 5}, "key must be a parameter name or a callable"),
    ],
)
def test_bad_argument_specs_fail_at_decoration(ob: Outbox, options: dict[str, Any],
                                               match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        @ob.transactional_message(topic="t", **options)
        def fn(session: Session, transfer_no: int) -> None:
            pass


def _no_params() -> None:
    pass


def _var_args(*args: Any) -> None:
    pass


def _keyword_session(*, session: Session) -> None:
    pass


@pytest.mark.parametrize("fn", [_no_params, _var_args, _keyword_session])
def test_function_without_a_session_parameter_is_refused(ob: Outbox, fn: Any) -> None:
    with pytest.raises(ConfigurationError, match="session as its first positional parameter"):
        ob.transactional_message(topic="t")(fn)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"topic": ""}, "non-empty topic"),
        ({"topic": None}, "non-empty topic"),
        ({"topic": "t", "payload": "amount"}, "payload must be a callable"),
    ],
)
def test_bad_decorator_options(ob: Outbox, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        transactional_message(ob, **options)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (1.5, "message key must be a str or int"),
        (True, "message key must be a str or int"),
        ("k" * 201, "message key is 201 characters"),
    ],
)
def test_bad_key_values_fail_at_call_time_and_send_nothing(
    ob: Outbox, delivery: CapturingDelivery, value: object, match: str
) -> None:
    @ob.transactional_message(topic="t", key="k")
    def fn(session: Session, k: object) -> None:
        raise AssertionError("must not run")

    with pytest.raises(MessageError, match=match):
        fn(value)
    assert delivery.sent == []


def test_bad_message_id_and_unencodable_payload_send_nothing(
    ob: Outbox, delivery: CapturingDelivery
) -> None:
    @ob.transactional_message(topic="t", message_id="no")
    def fn(session: Session, no: object, extra: object = None) -> None:
        raise AssertionError("must not run")

    with pytest.raises(MessageError, match="message id"):
        fn("x" * 65)
    with pytest.raises(MessageError, match="message id is required"):
        fn(None)
    with pytest.raises(MessageError, match="message id must be a str or int"):
        fn(b"bytes")
    with pytest.raises(MessageError, match="cannot encode"):
        fn("ok", extra=object())
    assert delivery.sent == []


def test_outbox_needs_an_engine_or_sessionmaker() -> None:
    with pytest.raises(ConfigurationError, match="Engine or sessionmaker"):
        Outbox("sqlite:///x.db")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not bound to an Engine"):
        _ = Outbox(sessionmaker()).engine
