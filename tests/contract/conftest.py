from __future__ import annotations

from collections.abc import Iterator

import pytest

from .transports import (
    AsyncMemoryUnderTest,
    AsyncSqlUnderTest,
    Features,
    MemoryUnderTest,
    SqlUnderTest,
    TransportUnderTest,
)

#: What each (backend, flavour) declares; the async form of a transport declares
#: what its sync twin does.
FEATURES: dict[tuple[str, str], Features] = {
    ("memory", "sync"): MemoryUnderTest.features,
    ("memory", "async"): AsyncMemoryUnderTest.features,
    **{(db, "sync"): SqlUnderTest.features for db in ("sqlite", "postgres", "mariadb")},
    **{(db, "async"): AsyncSqlUnderTest.features for db in ("sqlite", "postgres", "mariadb")},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect a test of a guarantee that a transport does not declare."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("needs")
        callspec = getattr(item, "callspec", None)
        key = (callspec.params.get("backend"), callspec.params.get("flavour")) if callspec else None
        if marker and key in FEATURES and not getattr(FEATURES[key], marker.args[0]):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


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
def transport(backend: str, flavour: str, request: pytest.FixtureRequest
              ) -> Iterator[TransportUnderTest]:
    under = make_transport(backend, flavour, request)
    yield under
    under.close()
