"""Run outbox's shipped Alembic chain from Python (or ``outbox migrate``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from .errors import ConfigurationError


def script_location() -> Path:
    """The folder holding env.py and versions/: inside the installed package, or the
    ``migrations/`` folder of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError("outbox's migrations folder is missing from this installation")


def versions_location() -> Path:
    """Add this to your own Alembic ``version_locations`` to run the chain beside yours."""
    return script_location() / "versions"


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    return cfg


def upgrade(engine: Engine, revision: str = "head", *,
            on_step: Callable[..., None] | None = None) -> None:
    """Bring ``engine``'s database to ``revision`` of the outbox chain; ``on_step`` is
    called after each revision is applied (keyword ``step_revision``: its id)."""
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        if on_step is not None:
            cfg.attributes["on_version_apply"] = (
                lambda ctx, step, heads, run_args: on_step(step_revision=step.up_revision_id))
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Take ``engine``'s database down to ``revision`` (``base`` drops the tables)."""
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current(engine: Engine) -> str | None:
    """The outbox chain's revision in ``engine``'s database, or None."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": "outbox_alembic_version"})
        return ctx.get_current_revision()
