"""Redis Streams for outbox: ``open_broker("redis://127.0.0.1:6379/0")`` or
:func:`connect`. See :mod:`outbox_redis.broker` for what the broker does natively and
what the framework adds, and :mod:`outbox_redis.mapping` for the entry format."""

from .broker import (
    AsyncRedisPublisher,
    AsyncRedisSubscriber,
    RedisBroker,
    RedisPublisher,
    RedisSubscriber,
    connect,
)

__all__ = ["AsyncRedisPublisher", "AsyncRedisSubscriber", "RedisBroker", "RedisPublisher",
           "RedisSubscriber", "connect"]
