from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid

import pytest

from outbox import ConfigurationError, DecodeError, JsonCodec, MessageError

codec = JsonCodec()


@pytest.mark.parametrize(
    "amount",
    ["0.01", "100.50", "12345678901234567890.123456789", "-0.000000000000000000001", "1E+3"],
)
def test_decimal_round_trips_exactly(amount: str) -> None:
    value = decimal.Decimal(amount)
    data = codec.encode({"amount": value})
    back = codec.decode(data)["amount"]
    # Travels as its string form: every digit and the exponent survive.
    assert back == str(value)
    assert decimal.Decimal(back) == value
    assert decimal.Decimal(back).as_tuple() == value.as_tuple()


def test_json_floats_decode_to_decimal() -> None:
    body = codec.decode(b'{"amount": 0.1, "n": 3, "nested": [2.50]}')
    assert body == {"amount": decimal.Decimal("0.1"), "n": 3, "nested": [decimal.Decimal("2.50")]}
    assert type(body["amount"]) is decimal.Decimal
    assert type(body["n"]) is int
    assert str(body["nested"][0]) == "2.50"


def test_encoded_float_comes_back_as_decimal() -> None:
    assert codec.decode(codec.encode(0.1)) == decimal.Decimal("0.1")


def test_datetimes_and_uuids_are_written_as_strings() -> None:
    when = dt.datetime(2024, 5, 1, 12, 30, 0, 123456)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    body = codec.decode(codec.encode({"when": when, "day": when.date(), "id": ident}))
    assert body == {"when": "2024-05-01T12:30:00.123456", "day": "2024-05-01", "id": str(ident)}


def test_text_is_utf8_not_escaped() -> None:
    data = codec.encode({"name": "张三"})
    assert "张三".encode() in data
    assert codec.decode(data) == {"name": "张三"}


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), -float("inf"), decimal.Decimal("NaN"),
     decimal.Decimal("Infinity"), decimal.Decimal("-Infinity"), {"a": [float("nan")]}],
)
def test_non_finite_numbers_are_refused(value: object) -> None:
    with pytest.raises(MessageError):
        codec.encode(value)


@pytest.mark.parametrize("data", [b"NaN", b'{"a": Infinity}', b"[-Infinity]"])
def test_non_finite_constants_are_refused_when_decoding(data: bytes) -> None:
    with pytest.raises(DecodeError, match="not valid JSON"):
        codec.decode(data)


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", {(1, 2): "tuple key"}, 1j])
def test_unencodable_values_raise_message_error(value: object) -> None:
    with pytest.raises(MessageError, match="cannot"):
        codec.encode(value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"name": "\xe5\xbc"}', "not valid UTF-8"),
        (b"{", "not valid JSON"),
        (b"hello", "not valid JSON"),
        (b'{"a": 1} trailing', "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),  # nesting deeper than the recursion limit
        ("{}", "must be bytes"),
        (None, "must be bytes"),
    ],
)
def test_bad_payloads_raise_decode_error(data: object, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        codec.decode(data)  # type: ignore[arg-type]


def test_size_limit_on_both_sides() -> None:
    small = JsonCodec(max_bytes=16)
    assert small.decode(small.encode("x" * 14)) == "x" * 14  # 16 bytes with quotes
    with pytest.raises(MessageError, match="limit is 16 bytes"):
        small.encode("x" * 15)
    with pytest.raises(DecodeError, match="limit is 16"):
        small.decode(json.dumps("x" * 15).encode())


def test_default_limit_is_one_mebibyte() -> None:
    big = b'"' + b"x" * (1024 * 1024 - 1) + b'"'
    with pytest.raises(DecodeError, match="limit"):
        codec.decode(big)
    assert codec.decode(big[:-2] + b'"') == "x" * (1024 * 1024 - 2)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    assert codec.decode(bytearray(b"[1]")) == [1]
    assert codec.decode(memoryview(b'{"a":null}')) == {"a": None}


def nested(depth: int, *, dicts: bool = False) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"a": value} if dicts else [value]
    return value


@pytest.mark.parametrize("dicts", [False, True], ids=["lists", "dicts"])
def test_a_payload_nested_too_deeply_is_a_message_error(dicts: bool) -> None:
    with pytest.raises(MessageError, match="nested too deeply to encode") as info:
        codec.encode(nested(100_000, dicts=dicts))
    assert "flatten it" in str(info.value)
    assert info.value.__cause__ is None  # not chained to a huge RecursionError traceback


def test_moderate_nesting_still_round_trips() -> None:
    value = nested(200)
    assert codec.decode(codec.encode(value)) == value


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000],
    ids=["lists", "dicts"],
)
def test_a_valid_but_deeply_nested_payload_is_a_decode_error(data: bytes) -> None:
    deep = JsonCodec(max_bytes=len(data))
    with pytest.raises(DecodeError, match="nested too deeply to decode"):
        deep.decode(data)


def test_decimals_as_numbers_keep_their_digits() -> None:
    codec = JsonCodec(decimals="number")
    value = {"amount": decimal.Decimal("100.50"), "tiny": decimal.Decimal("-1E-7"),
             "note": "100.50", "list": [decimal.Decimal("3")]}
    data = codec.encode(value)
    assert data == b'{"amount":100.50,"tiny":-1E-7,"note":"100.50","list":[3]}'
    assert codec.decode(data) == value | {"list": [3]}
    assert JsonCodec().encode(value).startswith(b'{"amount":"100.50"')


def test_decimals_as_numbers_leave_lookalike_strings_alone() -> None:
    # A string that looks like the marker of another call stays a string.
    tricky = '\x00' + "0" * 16 + ":1"
    data = JsonCodec(decimals="number").encode({"s": tricky, "d": decimal.Decimal("2.5")})
    assert json.loads(data) == {"s": tricky, "d": 2.5}


def test_decimals_as_numbers_refuse_non_finite_values() -> None:
    with pytest.raises(MessageError, match="non-finite"):
        JsonCodec(decimals="number").encode({"x": decimal.Decimal("NaN")})


def test_an_unknown_decimals_choice_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="string"):
        JsonCodec(decimals="float")
