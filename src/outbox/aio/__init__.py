"""The asyncio forms of outbox's parts: they run in the service's event loop and
share the SQL and the decisions of the sync parts."""

from .db import async_url, create_async_engine

__all__ = ["async_url", "create_async_engine"]
