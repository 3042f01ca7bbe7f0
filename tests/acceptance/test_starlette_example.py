"""The README's Starlette service is a file that runs: an order placed over HTTP is
committed with its message, and the relay in the app's event loop publishes it."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

import outbox
from outbox import SqlTransport, create_engine

EXAMPLE = Path(__file__).parents[2] / "examples" / "starlette_service" / "app.py"
README = Path(__file__).parents[2] / "README.md"


def test_the_readme_shows_the_example_file_as_it_is() -> None:
    assert EXAMPLE.read_text().rstrip("\n") in README.read_text()


def load_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.chdir(tmp_path)  # its URLs are relative: shop.db and broker.db in here
    spec = importlib.util.spec_from_file_location("starlette_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_places_an_order_and_publishes_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = load_example(tmp_path, monkeypatch)
    shop = create_engine("sqlite:///shop.db")
    outbox.metadata.create_all(shop)
    example.orders.metadata.create_all(shop)
    transport = SqlTransport(create_engine("sqlite:///broker.db"))
    transport.create_tables()
    async def scenario() -> int:
        app = example.app
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://shop"
        ) as client:
            response = await client.post("/orders", json={"order_no": "O-1", "total": "12.50"})
            assert response.status_code == 201
            for _ in range(200):  # the relay publishes in the app's loop, nudged by the commit
                if transport.counts("orders", "g")["unseen"] >= 1:
                    break
                await asyncio.sleep(0.05)
        return transport.counts("orders", "g")["unseen"]

    try:
        assert asyncio.run(scenario()) == 1
        with shop.connect() as conn:
            assert conn.execute(select(example.orders)).all() == [("O-1", 12.5)]
    finally:
        shop.dispose()
        transport.engine.dispose()
