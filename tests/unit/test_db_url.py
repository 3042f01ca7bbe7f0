from __future__ import annotations

import pytest
from sqlalchemy import make_url

from outbox import ConfigurationError, create_engine
from outbox.db import hide_secrets, is_secret_parameter, safe_url

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg://bank:{SECRET}@127.0.0.1:5432/bank1",
        f"mysql+pymysql://bank:{SECRET}@db.example/bank2?charset=utf8mb4",
    ],
)
def test_safe_url_hides_the_password(url: str) -> None:
    shown = safe_url(url)
    assert SECRET not in shown
    assert "***" in shown
    assert "bank:***@" in shown


def test_safe_url_of_an_unparseable_url() -> None:
    assert safe_url(f"not a url {SECRET}") == "<unparseable database URL>"


def test_safe_url_without_password_is_unchanged() -> None:
    assert safe_url("sqlite:///bank1.db") == "sqlite:///bank1.db"


def test_create_engine_refuses_a_bad_url_without_quoting_the_password() -> None:
    with pytest.raises(ConfigurationError, match="not a database URL") as info:
        create_engine(f"::{SECRET}::")
    assert SECRET not in str(info.value)


def test_create_engine_names_the_missing_driver_without_the_password() -> None:
    with pytest.raises(ConfigurationError, match="no driver") as info:
        create_engine(f"postgresql+nosuchdriver://u:{SECRET}@127.0.0.1/db")
    assert SECRET not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg://u@h/db?password={SECRET}",
        f"postgresql+psycopg://u@h/db?sslmode=require&sslpassword={SECRET}",
        f"sqlite:///x.db?password={SECRET}",
        f"sqlite:///file:x.db?uri=true&key={SECRET}",
        f"mysql+pymysql://u@h/db?passwd={SECRET}&charset=utf8mb4",
        f"mysql+pymysql://u@h/db?PWD={SECRET}",
        f"postgresql+psycopg://u@h/db?auth_token={SECRET}",
        f"postgresql+psycopg://u@h/db?client_secret={SECRET}",
        f"postgresql+psycopg://u@h/db?secret_key={SECRET}&secret_key=other",
        f"postgresql+psycopg://u:{SECRET}@h/db?password={SECRET}",
    ],
)
def test_safe_url_hides_secret_query_parameters(url: str) -> None:
    shown = safe_url(url)
    assert SECRET not in shown
    assert "other" not in shown
    assert "=***" in shown


def test_safe_url_keeps_ordinary_query_parameters() -> None:
    shown = safe_url(f"mysql+pymysql://u@db/bank?charset=utf8mb4&password={SECRET}&a=1&a=2")
    assert shown == "mysql+pymysql://u@db/bank?a=1&a=2&charset=utf8mb4&password=***"


def test_safe_url_of_a_url_object_hides_the_query_password() -> None:
    assert safe_url(make_url(f"sqlite:///x.db?password={SECRET}")) == "sqlite:///x.db?password=***"


def test_safe_url_of_a_port_that_is_not_a_number() -> None:
    assert safe_url(f"postgresql://u:{SECRET}@h:notaport/x") == "<unparseable database URL>"


@pytest.mark.parametrize("name", ["password", "sslpassword", "passwd", "pwd", "token",
                                  "api_key", "secret", "Access-Key", "key", "apikey"])
def test_secret_parameter_names(name: str) -> None:
    assert is_secret_parameter(name)


@pytest.mark.parametrize("name", ["charset", "sslmode", "host", "user", "keepalives", "mode"])
def test_ordinary_parameter_names(name: str) -> None:
    assert not is_secret_parameter(name)


def test_hide_secrets_in_free_text() -> None:
    text = (f"cannot reach postgresql://bob:{SECRET}@db:5432/x?sslpassword={SECRET}&sslmode=a "
            f"(tried mysql://u:{SECRET}@h/y?charset=utf8&token={SECRET})")
    shown = hide_secrets(text)
    assert SECRET not in shown
    assert "postgresql://bob:***@db:5432/x?sslpassword=***&sslmode=a" in shown
    assert "mysql://u:***@h/y?charset=utf8&token=***" in shown


def test_hide_secrets_of_a_given_url_anywhere_in_the_text() -> None:
    url = "postgresql+psycopg://u@h/db?password=p%26ss-w0rd"
    shown = hide_secrets("driver said: password p&ss-w0rd (p%26ss-w0rd) is wrong", url)
    assert shown == "driver said: password *** (***) is wrong"


def test_create_engine_error_hides_a_query_password() -> None:
    with pytest.raises(ConfigurationError, match="no driver") as info:
        create_engine(f"postgresql+nosuchdriver://u@127.0.0.1/db?password={SECRET}")
    assert SECRET not in str(info.value)
    assert "password=***" in str(info.value)
