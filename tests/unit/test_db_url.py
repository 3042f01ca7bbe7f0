from __future__ import annotations

import pytest

from outbox import ConfigurationError, create_engine
from outbox.db import safe_url

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
