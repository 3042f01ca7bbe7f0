"""Acceptance tests run the bank_transfer example end to end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))  # makes `import bank_transfer` work


def _server_url(variable: str) -> str:
    url = os.environ.get(variable)
    if not url:
        reason = f'{variable} is not set (scripts/services up; eval "$(scripts/services env)")'
        if os.environ.get("CI"):
            pytest.fail(reason)  # on CI a missing server is a broken build, not a skip
        pytest.skip(reason)
    return url


@pytest.fixture
def postgres_server() -> str:
    """Base URL of the PostgreSQL test server, from OUTBOX_TEST_POSTGRES_URL."""
    return _server_url("OUTBOX_TEST_POSTGRES_URL")


@pytest.fixture
def mariadb_server() -> str:
    """Base URL of the MariaDB test server, from OUTBOX_TEST_MARIADB_URL."""
    return _server_url("OUTBOX_TEST_MARIADB_URL")
