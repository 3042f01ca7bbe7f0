"""Redis Streams as a broker: publisher and subscriber, sync (``redis``) and asyncio
(``redis.asyncio``), on the entry format of :mod:`outbox_redis.mapping`.

A consumer group is a Redis consumer group on the topic's stream, created at the
stream's start (``0``): a new group reads everything the stream still holds. Each
subscriber is a consumer of its own in the group (a random name), and a fetch first
claims (``XAUTOCLAIM``) entries that another consumer took and left unacknowledged
for longer than ``visibility_timeout`` (it crashed), then reads new ones
(``XREADGROUP ... >``). ``Delivery.attempt`` is the entry's delivery count from the
group's pending list, which Redis keeps across crashes (the subscriber declares
``counts_deliveries``). ``ack`` is ``XACK``; ``dead_letter`` adds the entry, with the
group and the reason, to the stream ``<prefix><topic>:dead`` and acknowledges the
original in one ``MULTI``. There is no per-message delay in Redis Streams, so the
subscriber has no ``retry``: the idempotent consumer holds a failed delivery and
tries it again in place.

Trimming: by default nothing is trimmed, since an entry trimmed before a slow group
read it is lost to that group. ``maxlen=N`` makes every ``XADD`` trim the stream to
about N entries (``MAXLEN ~ N``): choose N far above any group's backlog.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from outbox.brokers import masked
from outbox.errors import BrokerUnavailableError, ConfigurationError, PublishError
from outbox.message import Message
from outbox.transport import Delivery

from .mapping import (
    dead_fields,
    dead_letter_key,
    delivery_fields,
    stream_key,
    to_delivery,
    to_fields,
)

T = TypeVar("T")
DEFAULT_PREFIX = "outbox:"
#: A fetch claims or reads at most this many entries whatever it is asked for.
MAX_FETCH = 1000


class Options:
    """What every client of one broker shares: the URL, the key prefix, trimming."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, maxlen: int | None = None,
                 **client_options: Any) -> None:
        if maxlen is not None and maxlen < 1:
            raise ConfigurationError("maxlen must be at least 1 (or None: no trimming)")
        self.url = url
        self.where = masked(url)
        self.prefix = prefix
        self.maxlen = maxlen
        self.client_options = client_options

    @contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Redis errors as the framework's, saying what to do (no password shown)."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BrokerUnavailableError(
                f"Redis at {self.where} cannot be reached while {doing} ({type(exc).__name__}:"
                f" {exc}); is the server running? (scripts/services up redis starts the test "
                "server)") from exc
        except RedisError as exc:
            raise PublishError(f"Redis at {self.where} refused {doing}: "
                               f"{type(exc).__name__}: {exc}") from exc

    def check_group(self, topic: str, group: str) -> None:
        if not topic or not group:
            raise ConfigurationError("a Redis subscriber needs a topic and a group")


def _encode_all(messages: Sequence[Message]) -> list[tuple[str, dict[bytes, bytes]]]:
    return [(m.topic, to_fields(m)) for m in messages]


def _claimed(reply: Any) -> tuple[list[tuple[bytes, Any]], list[bytes]]:
    """XAUTOCLAIM's entries, and the ids of entries deleted meanwhile (to drop)."""
    entries = [(i, f) for i, f in (reply[1] if len(reply) > 1 else []) if f is not None]
    gone = [i for i, f in (reply[1] if len(reply) > 1 else []) if f is None]
    if len(reply) > 2:
        gone.extend(reply[2])
    return entries, gone


def _read(reply: Any) -> list[tuple[bytes, Any]]:
    """XREADGROUP's entries of the one stream read."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        return [e for entries in reply.values() for e in (entries[0] if entries else [])]
    return [e for _, entries in reply for e in entries]


class _Subscription:
    """What the sync and asyncio subscribers share: names and timeouts."""

    #: Delivery.attempt is the group's own delivery count (outbox.typing.CountsDeliveries).
    counts_deliveries = True

    def __init__(self, options: Options, topic: str, group: str, visibility_timeout: float,
                 consumer: str | None) -> None:
        options.check_group(topic, group)
        if visibility_timeout <= 0:
            raise ConfigurationError("visibility_timeout must be positive (seconds)")
        self.options = options
        self.topic = topic
        self.group = group
        self.key = stream_key(options.prefix, topic)
        self.dead_key = dead_letter_key(options.prefix, topic)
        self.consumer = consumer or f"consumer-{uuid.uuid4().hex[:12]}"
        self.min_idle_ms = max(1, int(visibility_timeout * 1000))

    def count(self, max_messages: int) -> int:
        return max(1, min(max_messages, MAX_FETCH))

    def slice(self, deadline: float) -> float:
        """How long one blocking read may wait: a claimable entry (idle past the
        visibility timeout) is noticed within a second or a visibility timeout."""
        return max(0.0, min(deadline - time.monotonic(), 1.0, self.min_idle_ms / 1000))

    @staticmethod
    def block_ms(wait_seconds: float) -> int | None:
        return max(1, int(wait_seconds * 1000)) if wait_seconds > 0 else None

    def deliveries(self, entries: list[tuple[bytes, Any]], counts: dict[bytes, int]
                   ) -> list[Delivery]:
        return [to_delivery(self.topic, i, f, counts.get(i, 1)) for i, f in entries]


class RedisPublisher:
    """Publishes to the topic streams; ``publish_batch`` in one MULTI/EXEC."""

    def __init__(self, options: Options, client: redis.Redis) -> None:
        self.options = options
        self.client = client

    def publish(self, message: Message) -> None:
        self.publish_batch([message])

    def publish_batch(self, messages: Sequence[Message]) -> None:
        """Every message or none: all are encoded first, then added in one transaction."""
        encoded = _encode_all(messages)
        if not encoded:
            return
        with self.options.errors(f"adding {len(encoded)} message(s)"):
            pipe = self.client.pipeline(transaction=True)
            for topic, fields in encoded:
                pipe.xadd(stream_key(self.options.prefix, topic), fields,  # type: ignore[arg-type]
                          maxlen=self.options.maxlen, approximate=True)
            pipe.execute()

    def close(self) -> None:
        pass  # the broker owns the connection pool


class AsyncRedisPublisher:
    """:class:`RedisPublisher` for asyncio."""

    def __init__(self, options: Options, client: aioredis.Redis) -> None:
        self.options = options
        self.client = client

    async def publish(self, message: Message) -> None:
        await self.publish_batch([message])

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        encoded = _encode_all(messages)
        if not encoded:
            return
        with self.options.errors(f"adding {len(encoded)} message(s)"):
            pipe = self.client.pipeline(transaction=True)
            for topic, fields in encoded:
                pipe.xadd(stream_key(self.options.prefix, topic), fields,  # type: ignore[arg-type]
                          maxlen=self.options.maxlen, approximate=True)
            await pipe.execute()

    async def close(self) -> None:
        pass


class RedisSubscriber(_Subscription):
    """One consumer of ``group`` on ``topic``'s stream (see the module's docstring)."""

    def __init__(self, options: Options, client: redis.Redis, topic: str, group: str, *,
                 visibility_timeout: float = 30.0, consumer: str | None = None) -> None:
        super().__init__(options, topic, group, visibility_timeout, consumer)
        self.client = client
        self._ready = False

    def _ensure_group(self) -> None:
        if self._ready:
            return
        with self.options.errors(f"creating consumer group {self.group!r}"):
            try:
                self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._ready = True

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        self._ensure_group()
        count = self.count(max_messages)
        with self.options.errors(f"reading {self.key}"):
            try:
                return self._fetch(count, wait_seconds)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._ready = False  # the stream was deleted: make it and the group again
                self._ensure_group()
                return self._fetch(count, wait_seconds)

    def _fetch(self, count: int, wait_seconds: float) -> list[Delivery]:
        deadline = time.monotonic() + wait_seconds
        while True:
            found = self._fetch_once(count, self.slice(deadline))
            if found or time.monotonic() >= deadline:
                return found

    def _fetch_once(self, count: int, wait_seconds: float) -> list[Delivery]:
        entries, gone = _claimed(self.client.xautoclaim(
            self.key, self.group, self.consumer, self.min_idle_ms, "0-0", count=count))
        if gone:
            self.client.xack(self.key, self.group, *gone)
        if entries:
            pipe = self.client.pipeline(transaction=False)
            for entry_id, _ in entries:
                pipe.xpending_range(self.key, self.group, entry_id, entry_id, 1)
            counts = {p["message_id"]: p["times_delivered"]
                      for reply in pipe.execute() for p in reply}
            return self.deliveries(entries, counts)
        reply = self.client.xreadgroup(self.group, self.consumer, {self.key: ">"},
                                count=count, block=self.block_ms(wait_seconds))
        return self.deliveries(_read(reply), {})

    def ack(self, delivery: Delivery) -> None:
        with self.options.errors(f"acknowledging {delivery.message_id!r}"):
            self.client.xack(self.key, self.group, delivery.handle)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        fields = dead_fields(delivery_fields(delivery), self.group, delivery.handle, reason)
        with self.options.errors(f"dead-lettering {delivery.message_id!r}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(self.dead_key, fields)  # type: ignore[arg-type]
            pipe.xack(self.key, self.group, delivery.handle)
            pipe.execute()

    def close(self) -> None:
        pass


class AsyncRedisSubscriber(_Subscription):
    """:class:`RedisSubscriber` for asyncio."""

    def __init__(self, options: Options, client: aioredis.Redis, topic: str, group: str, *,
                 visibility_timeout: float = 30.0, consumer: str | None = None) -> None:
        super().__init__(options, topic, group, visibility_timeout, consumer)
        self.client = client
        self._ready = False

    async def _ensure_group(self) -> None:
        if self._ready:
            return
        with self.options.errors(f"creating consumer group {self.group!r}"):
            try:
                await self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._ready = True

    async def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        await self._ensure_group()
        count = self.count(max_messages)
        with self.options.errors(f"reading {self.key}"):
            try:
                return await self._fetch(count, wait_seconds)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._ready = False
                await self._ensure_group()
                return await self._fetch(count, wait_seconds)

    async def _fetch(self, count: int, wait_seconds: float) -> list[Delivery]:
        deadline = time.monotonic() + wait_seconds
        while True:
            found = await self._fetch_once(count, self.slice(deadline))
            if found or time.monotonic() >= deadline:
                return found

    async def _fetch_once(self, count: int, wait_seconds: float) -> list[Delivery]:
        entries, gone = _claimed(await self.client.xautoclaim(
            self.key, self.group, self.consumer, self.min_idle_ms, "0-0", count=count))
        if gone:
            await self.client.xack(self.key, self.group, *gone)
        if entries:
            pipe = self.client.pipeline(transaction=False)
            for entry_id, _ in entries:
                pipe.xpending_range(self.key, self.group, entry_id, entry_id, 1)
            counts = {p["message_id"]: p["times_delivered"]
                      for reply in await pipe.execute() for p in reply}
            return self.deliveries(entries, counts)
        reply = await self.client.xreadgroup(self.group, self.consumer, {self.key: ">"},
                                      count=count, block=self.block_ms(wait_seconds))
        return self.deliveries(_read(reply), {})

    async def ack(self, delivery: Delivery) -> None:
        with self.options.errors(f"acknowledging {delivery.message_id!r}"):
            await self.client.xack(self.key, self.group, delivery.handle)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        fields = dead_fields(delivery_fields(delivery), self.group, delivery.handle, reason)
        with self.options.errors(f"dead-lettering {delivery.message_id!r}"):
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(self.dead_key, fields)  # type: ignore[arg-type]
            pipe.xack(self.key, self.group, delivery.handle)
            await pipe.execute()

    async def close(self) -> None:
        pass


class RedisBroker:
    """Redis Streams at ``url`` (``redis://[:password@]host:port/db``, ``rediss://``
    for TLS): one sync connection pool, one asyncio pool per event loop's first use.

    ``prefix`` names the streams (``outbox:<topic>``); ``maxlen`` trims them (see the
    module's docstring); other keywords go to ``redis.Redis.from_url``.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.options = Options(url, **options)
        kwargs = {"socket_connect_timeout": 5.0, "health_check_interval": 30,
                  **self.options.client_options}
        try:
            self.client: redis.Redis = redis.Redis.from_url(url, **kwargs)
            self._async_factory: Callable[[], aioredis.Redis] = (
                lambda: aioredis.Redis.from_url(url, **kwargs))
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis URL {self.options.where}: {exc}") from None
        self._async: aioredis.Redis | None = None

    def _aclient(self) -> aioredis.Redis:
        if self._async is None:
            self._async = self._async_factory()
        return self._async

    def publisher(self) -> RedisPublisher:
        return RedisPublisher(self.options, self.client)

    def subscriber(self, topic: str, group: str, **options: Any) -> RedisSubscriber:
        return RedisSubscriber(self.options, self.client, topic, group, **options)

    def async_publisher(self) -> AsyncRedisPublisher:
        return AsyncRedisPublisher(self.options, self._aclient())

    def async_subscriber(self, topic: str, group: str, **options: Any) -> AsyncRedisSubscriber:
        return AsyncRedisSubscriber(self.options, self._aclient(), topic, group, **options)

    def dead_letters(self, topic: str, group: str | None = None, count: int = 1000
                     ) -> list[dict[bytes, bytes]]:
        """The dead-letter entries of ``topic`` (of ``group`` only, if given)."""
        with self.options.errors("reading the dead letters"):
            entries: Any = self.client.xrange(dead_letter_key(self.options.prefix, topic),
                                              count=count)
        return [f for _, f in entries or []
                if f and (group is None or f.get(b"dead-group") == group.encode())]

    def close(self) -> None:
        self.client.close()

    async def aclose(self) -> None:
        """Close the asyncio pool (from its event loop), then the sync one."""
        if self._async is not None:
            await self._async.aclose()
            self._async = None
        self.close()


def connect(url: str, **options: Any) -> RedisBroker:
    """The :class:`RedisBroker` for ``url`` (``outbox.brokers.open_broker`` calls it)."""
    return RedisBroker(url, **options)
