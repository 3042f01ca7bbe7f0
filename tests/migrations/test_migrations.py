"""The shipped Alembic chain: up and down on every database, and it builds exactly
the tables that outbox.schema defines."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, MetaData, inspect, make_url, text
from sqlalchemy.engine import URL

import outbox
from outbox import migrations

ROOT = Path(__file__).resolve().parents[2]
OUTBOX_TABLES = {"outbox_messages", "outbox_transaction_log", "outbox_inbox"}
SCRATCH_DB = "outbox_migrations_test"


def _fresh_database(base_url: str) -> str:
    """Recreate a scratch database on the server so each run starts from nothing."""
    admin = outbox.create_engine(base_url, isolation_level="AUTOCOMMIT")
    quote = '"' if admin.dialect.name == "postgresql" else "`"
    try:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {quote}{SCRATCH_DB}{quote}"))
            conn.execute(text(f"CREATE DATABASE {quote}{SCRATCH_DB}{quote}"))
    finally:
        admin.dispose()
    return make_url(base_url).set(database=SCRATCH_DB).render_as_string(hide_password=False)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    # The root conftest's server fixtures skip on a laptop and fail in CI.
    server: URL = request.getfixturevalue(f"{request.param}_url")
    return _fresh_database(server.render_as_string(hide_password=False))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = outbox.create_engine(db_url)
    yield eng
    eng.dispose()


def _schema_diff(engine: Engine, target: MetaData | list[MetaData]) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, target)
    # The chain's own version table is not part of the models.
    return [
        d for d in diff
        if not (d[0] == "remove_table" and d[1].name.endswith("alembic_version"))
    ]


def test_upgrade_builds_exactly_the_models(engine: Engine) -> None:
    migrations.upgrade(engine)
    assert migrations.current(engine) == "outbox_0004"
    assert set(inspect(engine).get_table_names()) >= OUTBOX_TABLES
    assert _schema_diff(engine, outbox.metadata) == []


def test_downgrade_removes_everything_and_upgrade_again(engine: Engine) -> None:
    migrations.upgrade(engine)
    migrations.downgrade(engine, "base")
    assert migrations.current(engine) is None
    assert not OUTBOX_TABLES & set(inspect(engine).get_table_names())
    migrations.upgrade(engine)
    assert set(inspect(engine).get_table_names()) >= OUTBOX_TABLES


def test_alembic_command_line_runs_the_chain(db_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for args in (["upgrade", "head"], ["current"], ["downgrade", "base"]):
        done = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"),
             "-x", f"db={db_url}", *args],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "outbox:outbox@" not in done.stderr + done.stdout  # no password echoed
    eng = outbox.create_engine(db_url)
    try:
        assert not OUTBOX_TABLES & set(inspect(eng).get_table_names())
    finally:
        eng.dispose()


def test_user_autogenerate_sees_outbox_tables_in_sync(engine: Engine) -> None:
    """A user's Alembic with target_metadata=[own, outbox.metadata] finds nothing to
    add once the outbox chain ran, but does see the user's own missing table."""
    from sqlalchemy import Column, Integer, Table

    own = MetaData()
    Table("user_things", own, Column("id", Integer, primary_key=True))
    migrations.upgrade(engine)
    diff = _schema_diff(engine, [own, outbox.metadata])
    assert [(d[0], d[1].name) for d in diff] == [("add_table", "user_things")]


def test_versions_location_is_shipped() -> None:
    files = {p.name for p in migrations.versions_location().glob("*.py")}
    assert "0001_outbox_tables.py" in files


def test_migrated_ids_compare_exactly(engine: Engine) -> None:
    """Ids differing only in case are two rows, as with the models' own tables
    (MySQL's default collation would call them equal)."""
    migrations.upgrade(engine)
    now = outbox.schema.utcnow()
    with engine.begin() as conn:
        for message_id in ("tx-a", "TX-A"):
            conn.execute(outbox.schema.inbox.insert().values(
                consumer_group="g", message_id=message_id, processed_at=now))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT message_id FROM outbox_inbox")).scalars().all()
    assert sorted(rows) == ["TX-A", "tx-a"]
