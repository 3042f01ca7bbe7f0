"""Fixtures of the integration tier: the concurrency model a test runs in."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import Model


@pytest.fixture(params=["sync", "async"])
def model(request: pytest.FixtureRequest, engine: Engine, async_engine: AsyncEngine) -> Model:
    """The same test in both models: sync Session code and asyncio AsyncSession code."""
    return Model(str(request.param), engine, async_engine)
