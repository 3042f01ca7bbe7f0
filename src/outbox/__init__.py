"""outbox: a database change and its message commit together, and the receiving
service applies every message exactly once.

Start with :class:`Outbox` and :func:`transactional_message` on the producing
side, :class:`Relay` to publish (:class:`RelayGroup` for many databases in one
process), and :class:`IdempotentConsumer` on the receiving side; their asyncio
forms are :class:`AsyncOutbox`, :class:`AsyncRelay` and
:class:`AsyncIdempotentConsumer` (see :mod:`outbox.aio`). :mod:`outbox.testing`
has an in-memory broker for unit tests.
"""

from .aio import AsyncIdempotentConsumer, AsyncOutbox, AsyncRelay, create_async_engine
from .app import DeliveryAdapter, LocalOutbox, Outbox, transactional_message
from .codec import JsonCodec
from .consumer import (
    ConsumerConfig,
    ConsumerStats,
    IdempotentConsumer,
    Outcome,
    ReceivedMessage,
    Reject,
)
from .db import create_engine
from .errors import (
    BrokerUnavailableError,
    ConfigurationError,
    DecodeError,
    DuplicateMessageError,
    MessageError,
    MissingTableError,
    MisuseError,
    OutboxError,
    PublishError,
    TransactionOutcomeUnknown,
    TransactionRolledBack,
)
from .message import Message, TransactionState
from .relay import BatchResult, Relay, RelayConfig
from .relay_group import RelayGroup
from .schema import metadata
from .scope import Ticket
from .sql_transport import SqlTransport
from .transaction import LocalWork, SqlAlchemyTransactionListener
from .transport import Delivery

__version__ = "0.1.0"

__all__ = [
    "AsyncIdempotentConsumer",
    "AsyncOutbox",
    "AsyncRelay",
    "BatchResult",
    "BrokerUnavailableError",
    "ConfigurationError",
    "ConsumerConfig",
    "ConsumerStats",
    "DecodeError",
    "Delivery",
    "DeliveryAdapter",
    "DuplicateMessageError",
    "IdempotentConsumer",
    "JsonCodec",
    "LocalOutbox",
    "LocalWork",
    "Message",
    "MessageError",
    "MissingTableError",
    "MisuseError",
    "Outbox",
    "OutboxError",
    "Outcome",
    "PublishError",
    "ReceivedMessage",
    "Reject",
    "Relay",
    "RelayConfig",
    "RelayGroup",
    "SqlAlchemyTransactionListener",
    "SqlTransport",
    "Ticket",
    "TransactionOutcomeUnknown",
    "TransactionRolledBack",
    "TransactionState",
    "create_async_engine",
    "create_engine",
    "metadata",
    "transactional_message",
]
