"""RabbitMQ for outbox: ``open_broker("amqp://user:password@127.0.0.1:5672/%2F")`` or
:func:`connect`. See :mod:`outbox_rabbitmq.broker` for the topology, what the broker
does natively and what the adapter adds, and :mod:`outbox_rabbitmq.mapping` for the
message format."""

from .broker import (
    AsyncRabbitMQPublisher,
    AsyncRabbitMQSubscriber,
    RabbitMQBroker,
    RabbitMQPublisher,
    RabbitMQSubscriber,
    connect,
)
from .mapping import DeadLetter

__all__ = ["AsyncRabbitMQPublisher", "AsyncRabbitMQSubscriber", "DeadLetter", "RabbitMQBroker",
           "RabbitMQPublisher", "RabbitMQSubscriber", "connect"]
