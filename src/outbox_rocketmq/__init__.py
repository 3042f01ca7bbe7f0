"""RocketMQ 5 adapter for outbox: transactional half messages with check-back,
a publisher for relays, and a subscriber for the idempotent consumer.

Install with ``pip install "outbox[rocketmq]"``; it uses the official gRPC client
(``rocketmq-python-client``), imported only when first needed.
"""

from .config import RocketMQConfig
from .producer import RocketMQTransactionalProducer
from .publisher import RocketMQPublisher
from .subscriber import RocketMQSubscriber

__all__ = [
    "RocketMQConfig",
    "RocketMQPublisher",
    "RocketMQSubscriber",
    "RocketMQTransactionalProducer",
]
