"""Async engines: the same databases through their asyncio drivers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

from ..db import (
    DEFAULT_PING_AFTER_IDLE,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    _sqlite_on_connect,
    check_after_idle,
    safe_url,
)
from ..errors import ConfigurationError

#: The asyncio driver that stands in for each sync one (the URL's ``+driver`` part).
ASYNC_DRIVERS = {
    "sqlite": "aiosqlite",
    "postgresql": "psycopg",  # psycopg 3 has both modes; the async engine picks async
    "mysql": "asyncmy",
    "mariadb": "asyncmy",
}
ASYNC_DRIVER_NAMES = frozenset({"aiosqlite", "psycopg", "psycopg_async", "asyncpg",
                                "aiomysql", "asyncmy"})

_DRIVER_HINTS = {
    "sqlite": 'pip install "outbox[sqlite-async]" (aiosqlite)',
    "postgresql": 'pip install "outbox[postgres]" (psycopg) or asyncpg',
    "mysql": 'pip install "outbox[mysql-async]" (asyncmy)',
    "mariadb": 'pip install "outbox[mysql-async]" (asyncmy)',
}


def async_url(url: str | URL) -> URL:
    """``url`` with its asyncio driver: ``sqlite:///x.db`` becomes
    ``sqlite+aiosqlite:///x.db``, ``mysql+pymysql://...`` ``mysql+asyncmy://...``.
    A URL that already names an asyncio driver is returned as it is."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(
            f"not a database URL: {safe_url(url)!r}; expected e.g. sqlite+aiosqlite:///bank1.db "
            "or postgresql+psycopg://user:password@127.0.0.1:5432/bank1"
        ) from None
    backend = parsed.get_backend_name()
    if parsed.get_driver_name() in ASYNC_DRIVER_NAMES and "+" in parsed.drivername:
        return parsed
    driver = ASYNC_DRIVERS.get(backend)
    if driver is None:
        raise ConfigurationError(
            f"no asyncio driver known for {safe_url(parsed)}; use SQLite, PostgreSQL or "
            "MySQL/MariaDB, or name the driver in the URL"
        )
    return parsed.set(drivername=f"{backend}+{driver}")


def create_async_engine(
    url: str | URL, *, ping_after_idle: float | None = DEFAULT_PING_AFTER_IDLE, **kwargs: Any
) -> AsyncEngine:
    """An :class:`AsyncEngine` set up as :func:`outbox.create_engine` sets up a sync one
    (a pooled connection pinged only after ``ping_after_idle`` seconds unused).

    A sync URL is given its asyncio driver (see :func:`async_url`).
    """
    parsed = async_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_SECONDS)
    try:
        engine = sa_create_async_engine(parsed, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as exc:
        hint = _DRIVER_HINTS.get(backend, "install the SQLAlchemy asyncio driver for it")
        raise ConfigurationError(
            f"no asyncio driver for {safe_url(parsed)}: {exc}; {hint}") from None
    if backend == "sqlite":
        if parsed.database not in (None, "", ":memory:"):
            event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    elif not kwargs.get("pool_pre_ping"):
        check_after_idle(engine.sync_engine, ping_after_idle)
    return engine
