"""Acceptance tests run the bank_transfer example end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))  # makes `import bank_transfer` work


def _server(url: URL) -> str:
    # The demo picks its own databases (bank1, bank2) on the same server.
    return url.render_as_string(hide_password=False)


@pytest.fixture
def postgres_server(postgres_url: URL) -> str:
    """A URL on the PostgreSQL test server (the root conftest skips or fails if none)."""
    return _server(postgres_url)


@pytest.fixture
def mariadb_server(mariadb_url: URL) -> str:
    """A URL on the MariaDB test server (the root conftest skips or fails if none)."""
    return _server(mariadb_url)
