"""NATS JetStream for outbox: ``open_broker("nats://user:password@127.0.0.1:4222")`` or
:func:`connect`. See :mod:`outbox_nats.broker` for what the broker does natively and
what the framework adds, and :mod:`outbox_nats.mapping` for the message format."""

from .broker import (
    AsyncNatsPublisher,
    AsyncNatsSubscriber,
    NatsBroker,
    NatsPublisher,
    NatsSubscriber,
    connect,
)
from .mapping import DeadLetter

__all__ = ["AsyncNatsPublisher", "AsyncNatsSubscriber", "DeadLetter", "NatsBroker",
           "NatsPublisher", "NatsSubscriber", "connect"]
