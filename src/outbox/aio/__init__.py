"""The asyncio forms of outbox's parts: they run in the service's event loop and
share the SQL and the decisions of the sync parts.

- :class:`AsyncOutbox`: ``@transactional_message`` on ``async def`` functions, and
  ``await send(session, ...)`` on the caller's own AsyncSession;
- :class:`AsyncRelay`, :class:`AsyncIdempotentConsumer`, :class:`AsyncSqlTransport`;
- :func:`create_async_engine`: an AsyncEngine set up as ``outbox.create_engine`` sets
  up a sync one (a sync URL gets its asyncio driver).
"""

from .app import AsyncOutbox
from .consumer import AsyncHandler, AsyncIdempotentConsumer
from .db import async_url, create_async_engine
from .relay import AsyncRelay
from .sql_transport import AsyncSqlPublisher, AsyncSqlSubscriber, AsyncSqlTransport

__all__ = [
    "AsyncHandler",
    "AsyncIdempotentConsumer",
    "AsyncOutbox",
    "AsyncRelay",
    "AsyncSqlPublisher",
    "AsyncSqlSubscriber",
    "AsyncSqlTransport",
    "async_url",
    "create_async_engine",
]
