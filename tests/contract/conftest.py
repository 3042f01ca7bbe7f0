from __future__ import annotations

from collections.abc import Iterator

import pytest

from .transports import (
    AsyncMemoryUnderTest,
    AsyncSqlUnderTest,
    MemoryUnderTest,
    SqlUnderTest,
    TransportUnderTest,
)


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


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    """Which form of the transport: ``sync``, or ``async`` (driven from a private loop)."""
    return str(request.param)


def make_transport(backend: str, flavour: str, request: pytest.FixtureRequest
                   ) -> TransportUnderTest:
    if backend == "memory":
        return MemoryUnderTest() if flavour == "sync" else AsyncMemoryUnderTest()
    engine = request.getfixturevalue("engine")  # clean tables on that database
    url = request.getfixturevalue("db_url")
    return SqlUnderTest(engine, url) if flavour == "sync" else AsyncSqlUnderTest(url)


@pytest.fixture
def contract_transport(backend: str, flavour: str, request: pytest.FixtureRequest
                       ) -> Iterator[TransportUnderTest]:
    under = make_transport(backend, flavour, request)
    yield under
    under.close()
