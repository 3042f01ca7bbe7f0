from __future__ import annotations

import pytest

from .transports import MemoryUnderTest, SqlUnderTest, TransportUnderTest

FEATURES = {
    "memory": MemoryUnderTest.features,
    "sqlite": SqlUnderTest.features,
    "postgres": SqlUnderTest.features,
    "mariadb": SqlUnderTest.features,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect a test of a guarantee that a transport does not declare."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("needs")
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec else None
        if marker and backend in FEATURES and not getattr(FEATURES[backend], marker.args[0]):
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


@pytest.fixture
def transport(backend: str, request: pytest.FixtureRequest) -> TransportUnderTest:
    if backend == "memory":
        return MemoryUnderTest()
    return SqlUnderTest(request.getfixturevalue("engine"), request.getfixturevalue("db_url"))
