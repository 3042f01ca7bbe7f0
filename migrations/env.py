"""Alembic environment for outbox's own chain.

The database comes from ``-x db=URL`` on the command line, or from a connection
passed in ``config.attributes["connection"]`` (what :mod:`outbox.migrations` does).
The chain keeps its version in ``outbox_alembic_version`` so it never collides with
an application's own ``alembic_version``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from outbox.db import create_engine
from outbox.errors import ConfigurationError
from outbox.schema import metadata

VERSION_TABLE = "outbox_alembic_version"
config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # outbox.migrations.upgrade(on_step=...): progress, one call per revision
        on_version_apply=config.attributes.get("on_version_apply"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise ConfigurationError("no database given: run  alembic -x db=URL upgrade head")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


def run_offline() -> None:
    url = context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option(
        "sqlalchemy.url"
    )
    context.configure(url=url, target_metadata=metadata, version_table=VERSION_TABLE,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
