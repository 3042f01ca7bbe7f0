"""The benchmark's reference broker: a Redis list per topic, through the public
:class:`outbox.typing.Publisher` protocol (and its batch ability), the way a user
would plug in a broker of their own."""

from __future__ import annotations

import os
from collections.abc import Sequence

import redis

from outbox import Message
from outbox.errors import BrokerUnavailableError


def redis_url() -> str:
    url = os.environ.get("OUTBOX_TEST_REDIS_URL")
    if not url:
        raise SystemExit("bench: OUTBOX_TEST_REDIS_URL is not set; run  scripts/services up redis  "
                         "and  eval \"$(scripts/services env)\"  (make bench does both)")
    return url


def client() -> redis.Redis:
    return redis.Redis.from_url(redis_url())


def encode(message: Message) -> bytes:
    """The value pushed: the message id, a newline, the payload."""
    return message.id.encode() + b"\n" + message.payload


class RedisListPublisher:
    """RPUSH each message on the list named by its topic; a batch in one pipeline."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn

    def publish(self, message: Message) -> None:
        try:
            self.conn.rpush(message.topic, encode(message))
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"redis: {exc}") from None

    def publish_batch(self, messages: Sequence[Message]) -> None:
        try:
            pipe = self.conn.pipeline(transaction=False)
            for m in messages:
                pipe.rpush(m.topic, encode(m))
            pipe.execute()
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"redis: {exc}") from None

    def close(self) -> None:
        self.conn.close()


class PerMessagePublisher:
    """The same broker without the batch ability: the relay publishes one by one."""

    def __init__(self, conn: redis.Redis) -> None:
        self._inner = RedisListPublisher(conn)

    def publish(self, message: Message) -> None:
        self._inner.publish(message)

    def close(self) -> None:
        self._inner.close()
