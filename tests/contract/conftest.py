from __future__ import annotations

import pytest

from .transports import MemoryUnderTest, SqlUnderTest, TransportUnderTest


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("sqlite", id="sql-sqlite"),
        pytest.param("postgres", id="sql-postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", id="sql-mariadb", marks=pytest.mark.mariadb),
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    """Overrides the root fixture: the contract also runs without any database."""
    return str(request.param)


@pytest.fixture
def transport(backend: str, request: pytest.FixtureRequest) -> TransportUnderTest:
    if backend == "memory":
        return MemoryUnderTest()
    return SqlUnderTest(request.getfixturevalue("engine"), request.getfixturevalue("db_url"))
