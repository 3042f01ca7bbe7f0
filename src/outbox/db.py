"""Database helpers shared by every SQL part: engines, dialect differences, errors."""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import quote, quote_plus

from sqlalchemy import Connection, Engine, Insert, Table, event, make_url
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError

from .errors import ConfigurationError

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0

_DRIVER_HINTS = {
    "postgresql": 'pip install "outbox[postgres]" (psycopg)',
    "mysql": 'pip install "outbox[mysql]" (PyMySQL)',
    "mariadb": 'pip install "outbox[mysql]" (PyMySQL)',
}


#: Query parameters whose value is a secret (``?password=...``), matched on the
#: lower-cased name: these words anywhere in it, or a name ending in ``_key``.
_SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token", "credential", "apikey")
_HIDDEN = "***"
# Inside free text (a driver's message, a log value): the password of user info,
# and the value of a secret-looking query parameter.
_USERINFO_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^\s:/@?#]*:)[^\s@/]*(?=@)")
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[\w.-]+)=)(?P<value>[^&#\s'\"]*)")


def is_secret_parameter(name: str) -> bool:
    """Whether a URL query parameter of this name carries a secret."""
    n = name.lower().replace("-", "_")
    return n == "key" or n.endswith("_key") or any(w in n for w in _SECRET_WORDS)


def safe_url(url: str | URL) -> str:
    """The URL as text with any password hidden, for logs and error messages.

    Hides the password of the user info and the value of every query parameter
    that looks secret (``password``, ``sslpassword``, ``token``, ``secret_key``, ...).
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        return "<unparseable database URL>"
    if not parsed.query:
        return parsed.render_as_string(hide_password=True)
    base = parsed.set(query={}).render_as_string(hide_password=True)
    parts = []
    for name in sorted(parsed.query):
        value = parsed.query[name]
        for item in (value,) if isinstance(value, str) else value:
            shown = _HIDDEN if is_secret_parameter(name) else quote_plus(item)
            parts.append(f"{quote_plus(name)}={shown}")
    return f"{base}?{'&'.join(parts)}"


def url_secrets(url: str | URL) -> list[str]:
    """The secret values a URL carries (password, secret query values), as written
    in it and decoded, longest first: what :func:`hide_secrets` scrubs from text."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return []
    found = [parsed.password] if parsed.password else []
    for name, value in parsed.query.items():
        if is_secret_parameter(name):
            found.extend((value,) if isinstance(value, str) else value)
    out = {v for s in found if s for v in (str(s), quote_plus(str(s)), quote(str(s), safe=""))}
    return sorted(out, key=len, reverse=True)


def hide_secrets(text: str, url: str | URL | None = None) -> str:
    """``text`` with URL passwords and secret query values hidden, and, given the
    ``url`` the text is about, every secret of that URL wherever it appears."""
    if url is not None:
        for secret in url_secrets(url):
            text = text.replace(secret, _HIDDEN)
    if "://" in text:
        text = _USERINFO_PASSWORD.sub(lambda m: m["head"] + _HIDDEN, text)
    if "=" in text:
        text = _QUERY_PARAM.sub(
            lambda m: m["head"] + _HIDDEN if is_secret_parameter(m["name"]) else m[0], text
        )
    return text


#: A pooled connection idle for longer than this is pinged before it is handed out.
DEFAULT_PING_AFTER_IDLE = 10.0
_IDLE_SINCE = "outbox.idle_since"


def check_after_idle(engine: Engine, seconds: float | None) -> None:
    """Ping a pooled connection before handing it out only when it sat unused for
    more than ``seconds``: a server restart or a firewall's idle timeout is found
    before the transaction starts, while a busy service pays no round trip.

    A connection that fails the ping is replaced (the pool tries a fresh one). A
    connection lost in the middle of a transaction fails that transaction, as it
    would with any ping, and the pool then replaces every connection older than the
    failure. ``pool_pre_ping=True`` still pings on every checkout if you want that.
    """
    if seconds is None:
        return
    if seconds < 0:
        raise ConfigurationError("ping_after_idle must be at least 0 seconds (or None)")
    dialect = engine.dialect

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since <= seconds:
            return
        record.info[_IDLE_SINCE] = None
        try:
            alive = dialect.do_ping(dbapi_connection)
        except Exception:
            alive = False
        if not alive:
            raise DisconnectionError("idle pooled connection failed its ping")

    event.listen(engine, "checkin", checkin)
    event.listen(engine, "checkout", checkout)


def create_engine(
    url: str | URL, *, ping_after_idle: float | None = DEFAULT_PING_AFTER_IDLE, **kwargs: Any
) -> Engine:
    """An engine set up the way outbox expects; any SQLAlchemy engine also works.

    For SQLite it turns on WAL and a busy timeout so that several processes (a
    service and its relay) can share one file. Elsewhere a pooled connection is
    pinged only after ``ping_after_idle`` seconds unused (see
    :func:`check_after_idle`), not on every transaction; ``None`` turns that off.
    Other keyword arguments go to :func:`sqlalchemy.create_engine`.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigurationError(
            f"not a database URL: {safe_url(url)!r}; expected e.g. sqlite:///bank1.db or "
            "postgresql+psycopg://user:password@127.0.0.1:5432/bank1"
        ) from None  # the parser's message may quote the password
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_SECONDS)
    try:
        engine = sa_create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as exc:
        hint = _DRIVER_HINTS.get(backend, "install the SQLAlchemy driver for it")
        raise ConfigurationError(
            f"no driver for {safe_url(parsed)}: {exc}; {hint}"
        ) from None
    if backend == "sqlite":
        if parsed.database not in (None, "", ":memory:"):
            event.listen(engine, "connect", _sqlite_on_connect)
    elif not kwargs.get("pool_pre_ping"):
        check_after_idle(engine, ping_after_idle)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def dialect_name(bind: Connection | Engine) -> str:
    name = bind.dialect.name
    return "mysql" if name == "mariadb" else name


def supports_skip_locked(bind: Connection | Engine) -> bool:
    """PostgreSQL, and MySQL 8 / MariaDB 10.6 and later, can skip rows others lock."""
    name = dialect_name(bind)
    if name == "postgresql":
        return True
    if name == "mysql":
        version = bind.dialect.server_version_info or ()
        if getattr(bind.dialect, "is_mariadb", False):
            return tuple(version[:2]) >= (10, 6)
        return tuple(version[:1]) >= (8,)
    return False


#: For a connection about to claim rows (``FOR UPDATE SKIP LOCKED``): the execution
#: options to set before its transaction begins (:func:`claiming_options`).
_CLAIMING = {"mysql": {"isolation_level": "READ COMMITTED"}}


def claiming_options(bind: Connection | Engine) -> dict[str, str]:
    """Execution options for a transaction that claims rows others may claim at once.

    InnoDB's default REPEATABLE READ puts next-key locks on the ranges a claim scans,
    and concurrent claims deadlock on each other's ranges; row locks are all a claim
    needs (rows another claim holds are skipped), so on MariaDB/MySQL it runs at READ
    COMMITTED. The connection gets its usual level back when it returns to the pool.
    """
    return _CLAIMING.get(dialect_name(bind), {})


def insert_ignore(bind: Connection | Engine, table: Table) -> Insert:
    """An INSERT that silently skips a row whose primary key already exists."""
    return insert_ignore_for(dialect_name(bind), table)


def insert_ignore_for(name: str, table: Table) -> Insert:
    """:func:`insert_ignore` for a database kind (``dialect_name``) rather than a bind."""
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    if name == "mysql":
        return mysql.insert(table).prefix_with("IGNORE")
    raise ConfigurationError(
        f"database {name!r} is not supported; use SQLite, PostgreSQL or MySQL/MariaDB"
    )


def lock_for_writing(conn: Connection, table: Table) -> None:
    """On SQLite, take the database's write lock now rather than at the first write.

    SQLite has one writer and no row locks, and its Python driver begins a
    transaction only at the first write, so reads before it see no consistent
    snapshot: a relay's claim could hand one row to two relays, and a decorated
    function could check a balance that another process changes before its UPDATE.
    A no-op UPDATE as the first statement makes the whole transaction one
    serialized write transaction. Other databases lock rows instead (SELECT ... FOR
    UPDATE), so this does nothing there.
    """
    if dialect_name(conn) == "sqlite":
        first_col = next(iter(table.primary_key.columns))
        conn.execute(table.update().where(first_col.is_(None)).values({first_col.name: first_col}))
