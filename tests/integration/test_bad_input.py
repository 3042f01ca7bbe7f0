"""Bad input at the decorator and in configuration: each gets an error of the
project's own that says what is wrong, and nothing is written or lost.

The other entry points have their catalogues beside their tests: the HTTP transfer
API in tests/acceptance/test_bank1_api.py, messages arriving at a consumer in
tests/integration/test_consumer.py (dead-lettered with their reason), broker
addresses, topics and credentials in tests/integration/test_rocketmq.py and
tests/unit/test_rocketmq_adapter.py.
"""

from __future__ import annotations

import decimal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, func, make_url, select

import outbox
from outbox import (
    ConfigurationError,
    ConsumerConfig,
    DuplicateMessageError,
    MessageError,
    Outbox,
    Relay,
    RelayConfig,
    SqlTransport,
)
from outbox.codec import DEFAULT_MAX_PAYLOAD_BYTES
from outbox.schema import outbox_messages


def rows(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


def debit_with(engine: Engine, tables: SimpleNamespace, **options: Any) -> Any:
    app = Outbox(engine)
    options = {"topic": "transfers", **options}

    @app.transactional_message(**options)
    def debit(session: Any, no: Any, amount: Any) -> None:
        session.execute(tables.ledger.insert().values(account="a", amount=amount))

    return debit


@pytest.mark.parametrize(
    ("options", "args", "error", "words"),
    [
        ({"payload": lambda no, amount: {"x": object()}}, ("t1", 1), MessageError,
         "cannot encode a object"),
        ({"payload": lambda no, amount: "x" * (DEFAULT_MAX_PAYLOAD_BYTES + 1)}, ("t1", 1),
         MessageError, "the limit is"),
        ({"payload": lambda no, amount: {"a": decimal.Decimal("NaN")}}, ("t1", 1),
         MessageError, "non-finite"),
        ({"message_id": lambda no, amount: None}, ("t1", 1), MessageError, "id is required"),
        ({"message_id": "no"}, ("T" * 65, 1), MessageError, "the limit is 64"),
        ({"message_id": "no"}, (" t1", 1), MessageError, "whitespace"),
        ({"message_id": "no"}, ("t\x001", 1), MessageError, "NUL"),
        ({"message_id": "no"}, (["t1"], 1), MessageError, "must be a str or int"),
        ({"key": "no"}, ("k" * 201, 1), MessageError, "the limit is 200"),
        ({"key": lambda no, amount: 1.5}, ("t1", 1), MessageError, "must be a str or int"),
    ],
)
def test_a_message_that_cannot_be_built_writes_nothing(
    engine: Engine, tables: SimpleNamespace, options: dict[str, Any], args: tuple[Any, ...],
    error: type[Exception], words: str,
) -> None:
    debit = debit_with(engine, tables, **options)
    with pytest.raises(error, match=words):
        debit(*args)
    assert rows(engine, tables.ledger) == 0
    assert rows(engine, outbox_messages) == 0


def test_quotes_and_sql_metacharacters_travel_as_data(
    engine: Engine, tables: SimpleNamespace
) -> None:
    text = "O'Brien\"; DROP TABLE outbox_messages; --"
    debit = debit_with(engine, tables, key="no", message_id="no",
                       payload=lambda no, amount: {"note": text})
    debit("t-'1';--", 1)
    with engine.connect() as conn:
        row = conn.execute(select(outbox_messages)).one()
    assert row.key == "t-'1';--"
    assert outbox.JsonCodec().decode(bytes(row.payload)) == {"note": text}


def test_a_reused_message_id_is_refused_and_undone(
    engine: Engine, tables: SimpleNamespace
) -> None:
    debit = debit_with(engine, tables, message_id="no")
    debit("t1", 1)
    with pytest.raises(DuplicateMessageError, match="already used"):
        debit("t1", 2)
    assert rows(engine, tables.ledger) == 1
    assert rows(engine, outbox_messages) == 1


def test_wrong_call_arguments_name_the_function(engine: Engine, tables: SimpleNamespace) -> None:
    debit = debit_with(engine, tables)
    with pytest.raises(TypeError, match="debit"):
        debit("t1")
    assert rows(engine, tables.ledger) == 0


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"topic": ""}, "non-empty topic"),
        ({"key": "account"}, "names no parameter"),
        ({"message_id": 42}, "parameter name or a callable"),
        ({"payload": "body"}, "payload must be a callable"),
    ],
)
def test_decorator_configuration_errors(
    engine: Engine, tables: SimpleNamespace, options: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigurationError, match=words):
        debit_with(engine, tables, **options)


def test_missing_outbox_tables_say_how_to_create_them(tmp_path: Path) -> None:
    engine = outbox.create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    app = Outbox(engine)

    @app.transactional_message(topic="t")
    def noop(session: Any) -> None:
        pass

    with pytest.raises(ConfigurationError, match="outbox migrate"):
        noop()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: outbox.create_engine("not a url"), "not a database URL"),
        (lambda: outbox.create_engine("nosuchdb://u:pw@h/d"), "no driver"),
        (lambda: Outbox("sqlite:///x.db"), "Engine or sessionmaker"),  # type: ignore[arg-type]
        (lambda: RelayConfig(batch_size=0), "batch_size"),
        (lambda: RelayConfig(max_attempts=0), "max_attempts"),
        (lambda: RelayConfig(poll_interval=0), "poll_interval"),
        (lambda: ConsumerConfig(max_attempts=0), "max_attempts"),
        (lambda: SqlTransport(outbox.create_engine("sqlite://")).subscriber(
            "t", "g", visibility_timeout=0), "visibility_timeout"),
    ],
)
def test_configuration_errors_say_what_is_wrong(make: Any, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        make()


def test_consumer_group_must_be_named(engine: Engine) -> None:
    transport = SqlTransport(engine)
    with pytest.raises(ConfigurationError, match="consumer group"):
        outbox.IdempotentConsumer(engine, transport.subscriber("t", "g"), "", lambda s, m: None)


def test_transport_in_the_outbox_sqlite_file_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    with pytest.raises(ConfigurationError, match="file of its own"):
        Relay(outbox.create_engine(url), SqlTransport(outbox.create_engine(url)).publisher())


@pytest.mark.parametrize("server", [
    pytest.param("postgres_url", marks=pytest.mark.postgres),
    pytest.param("mariadb_url", marks=pytest.mark.mariadb),
])
def test_wrong_database_password_is_not_echoed(
    server: str, request: pytest.FixtureRequest
) -> None:
    wrong = make_url(request.getfixturevalue(server)).set(password="Wr0ng-Secret-Pw")
    done = subprocess.run(
        [sys.executable, "-m", "outbox.cli", "status", "--db",
         wrong.render_as_string(hide_password=False)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "database error" in done.stderr
    assert "Wr0ng-Secret-Pw" not in done.stderr + done.stdout
