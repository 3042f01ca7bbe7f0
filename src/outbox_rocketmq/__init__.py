"""RocketMQ 5 adapter for outbox: transactional half messages with check-back,
a publisher for relays, and a subscriber for the idempotent consumer, each for sync
code and for asyncio (the producer serves ``Outbox`` and ``AsyncOutbox`` alike).

Install with ``pip install "outbox[rocketmq]"``; it uses the official gRPC client
(``rocketmq-python-client``), imported only when first needed.
"""

from .config import RocketMQConfig
from .mapping import MessageIdFrom
from .producer import RocketMQTransactionalProducer
from .publisher import AsyncRocketMQPublisher, RocketMQPublisher
from .subscriber import AsyncRocketMQSubscriber, RocketMQSubscriber

__all__ = [
    "AsyncRocketMQPublisher",
    "AsyncRocketMQSubscriber",
    "MessageIdFrom",
    "RocketMQConfig",
    "RocketMQPublisher",
    "RocketMQSubscriber",
    "RocketMQTransactionalProducer",
]
