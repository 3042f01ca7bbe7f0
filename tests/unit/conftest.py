"""The unit tier does no I/O: opening a Python socket or an SQLite database fails the
test (a best-effort guard: libpq, under psycopg, opens its sockets in C)."""

from __future__ import annotations

import socket
import sqlite3
from typing import Any, NoReturn

import pytest


@pytest.fixture(autouse=True)
def _no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise AssertionError("unit tests must not do I/O; move this test to tests/integration")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(sqlite3, "connect", refuse)
    monkeypatch.setattr(sqlite3.dbapi2, "connect", refuse)  # what SQLAlchemy calls
