"""RabbitMQ as a broker: publisher and subscriber, sync (``pika``) and asyncio
(``aio-pika``), on the message format of :mod:`outbox_rabbitmq.mapping`.

Topology, declared idempotently (durable, and every message persistent)::

    <prefix>                         topic exchange; a message's routing key is its topic
    <prefix>.<topic>.<group>         quorum queue of one consumer group, bound to the
                                     exchange by the topic (its DLX: <prefix>.dead)
    <prefix>.<topic>.<group>.retry.<N>ms
                                     classic queues where retried copies wait N ms, then
                                     go back (dead-lettered by the default exchange) into
                                     that group's queue, and no other
    <prefix>.dead                    direct exchange of the dead letters
    <prefix>.<topic>.<group>.dead    quorum queue of the group's dead letters

Every group gets every message: the exchange puts a copy in each bound queue. A queue
holds only what was published after it was declared, so a group that subscribes late
does not get earlier messages. ``subscriber()`` and ``async_subscriber()`` declare the
group's queues before they return, and :meth:`RabbitMQBroker.declare_group` declares
them ahead of any consumer (at deployment, say).

Unroutable messages: the relay publishes as soon as a row commits, which may be before
any group of the topic exists, and RabbitMQ drops a message that no queue is bound
for. So every publish is ``mandatory``, and a message RabbitMQ returns as unroutable
fails with PublishError naming the topic: the message stays in the outbox, and the
relay's backoff sends it again once a group is declared (or parks it, for ``outbox
replay``). Nothing is dropped without a trace. ``unroutable="drop"`` counts such a
message as sent instead, for topics that may well have no readers. An alternate
exchange into a holding queue would keep the message too, but in a queue that no
group reads.

Publishing: confirms are on. ``publish_batch`` encodes every message first (one that
cannot be encoded fails the batch before anything is sent), publishes them all, then
waits for every confirm: a nack or an unroutable message fails the batch with
PublishError. A batch that failed part-way has reached RabbitMQ in part; the relay
sends it again and the consumer drops the duplicates by message id.

Consuming: a subscriber has a consumer on its group's queue with a prefetch of
``prefetch`` messages (default 64); ``fetch`` hands out what has arrived, waiting up
to ``wait_seconds`` for the first. RabbitMQ gives each message to one consumer of a
queue at a time. ``ack`` is ``basic.ack``.

Delivery counts: a quorum queue counts the deliveries of each message to its group
(``x-delivery-count``), across reconnects and crashes, and a retried copy carries the
count it had (``x-outbox-attempt``): ``Delivery.attempt`` is their sum plus one, and
the subscribers declare ``counts_deliveries``. A message that was prefetched but not
yet handed out when a subscriber closes counts as delivered too.

No visibility timeout: RabbitMQ gives an unacknowledged message back when the channel
that received it closes (``close()``, a crash, a lost connection), or when the server's
``consumer_timeout`` (30 minutes by default, in rabbitmq.conf) closes the channel.
``visibility_timeout`` is accepted for the subscriber interface and checked, nothing
more.

``retry(delivery, delay, error)`` publishes a copy (same message id, the deliveries so
far in ``x-outbox-attempt``) into the group's retry queue for the delay's bucket (see
:func:`~outbox_rabbitmq.mapping.retry_bucket_ms`), waits for its confirm, then
acknowledges the original. A bucket is a classic queue whose queue-wide message TTL
is the bucket's wait: all its copies wait the same, so they expire in order (a
per-message TTL expires only at the head of a queue, so a long delay would hold up a
short one behind it). An idle bucket deletes itself a minute after its TTL. A classic
queue lives on one node of a cluster: a copy in it is lost with that node, and
RabbitMQ moves an expired copy on at most once (lost if the group's queue has no
quorum at that moment). A delay of 0 puts the copy straight back into the group's
queue. ``dead_letter(delivery,
reason)`` publishes a copy with ``x-outbox-dead-reason`` and ``x-outbox-dead-group`` to
``<prefix>.dead``, into the group's dead queue, then acknowledges the original.
:meth:`RabbitMQBroker.dead_letters` lists them without taking them.

Connections: a pika ``BlockingConnection`` is not thread-safe, so every sync publisher
and subscriber has a connection of its own, used under a lock. A lost connection is
opened again on the next call, at once for a call that found it dead. Deliveries
received on the lost channel come back by themselves; their handles are dead: an
``ack``, ``retry`` or ``dead_letter`` of one does nothing (the message comes again,
and the consumer drops it as a duplicate if it had been applied), and never settles
another delivery. pika sends heartbeats only while a call runs, so a subscriber whose
handler takes longer than twice the heartbeat (60 s by default; ``?heartbeat=`` in
the URL) loses its connection and its unacknowledged deliveries. An asyncio publisher
or subscriber belongs to the event loop it first ran in.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import aio_pika
import aiormq.exceptions
import pika
import pika.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from outbox.brokers import masked
from outbox.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    OutboxError,
    PublishError,
)
from outbox.message import Message
from outbox.transport import Delivery

from .mapping import (
    SHORTSTR,
    DeadLetter,
    Outgoing,
    dead_copy,
    dead_exchange_name,
    dead_queue_name,
    exchange_name,
    queue_name,
    retry_bucket_ms,
    retry_copy,
    retry_queue_name,
    to_dead_letter,
    to_delivery,
    to_outgoing,
)

T = TypeVar("T")
DEFAULT_PREFIX = "outbox"
#: A fetch hands out at most this many deliveries whatever it is asked for.
MAX_FETCH = 1000
#: An idle retry bucket deletes itself this long after its TTL.
RETRY_QUEUE_GRACE_MS = 60_000
UNROUTABLE = ("error", "drop")
HINT = "is the server running? (scripts/rabbitmq up starts the test server)"

#: A connection or channel that is gone: open a new one.
SYNC_LOST: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError, OSError)
ASYNC_LOST: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.AMQPChannelError,
    aiormq.exceptions.ChannelInvalidStateError, OSError)
LOST: tuple[type[BaseException], ...] = (*SYNC_LOST, *ASYNC_LOST, TimeoutError)


@dataclass(frozen=True, slots=True)
class Handle:
    """A delivery's receipt: its delivery tag, on the subscriber's ``generation``-th
    channel (a tag means nothing on another channel)."""

    generation: int
    tag: int


class Options:
    """What every client of one broker shares: the URL, the names, the settings, and
    the queues and exchanges declared (for :meth:`RabbitMQBroker.delete_declared`)."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX, unroutable: str = "error",
                 prefetch: int = 64, confirm_timeout: float = 30.0,
                 connect_timeout: float = 5.0, **unknown: Any) -> None:
        self.url = url
        self.where = masked(url)
        if unknown:
            raise ConfigurationError(
                f"unknown RabbitMQ broker option(s) {', '.join(sorted(unknown))}; known: "
                "prefix, unroutable, prefetch, confirm_timeout, connect_timeout (client "
                "settings such as heartbeat go in the URL: ?heartbeat=30)")
        if not isinstance(prefix, str) or not prefix.strip() or prefix.startswith("amq."):
            raise ConfigurationError(f"bad RabbitMQ prefix {prefix!r}: it names the exchanges"
                                     " and queues, and must not start with 'amq.'")
        if unroutable not in UNROUTABLE:
            raise ConfigurationError(f"unroutable must be one of {UNROUTABLE}, not "
                                     f"{unroutable!r}")
        if not isinstance(prefetch, int) or not 1 <= prefetch <= 65535:
            raise ConfigurationError("prefetch must be a whole number from 1 to 65535")
        if not confirm_timeout > 0 or not connect_timeout > 0:
            raise ConfigurationError("confirm_timeout and connect_timeout must be positive "
                                     "(seconds)")
        self.prefix = prefix
        self.unroutable = unroutable
        self.prefetch = prefetch
        self.confirm_timeout = float(confirm_timeout)
        self.connect_timeout = float(connect_timeout)
        try:
            parts = urlsplit(url)
            self._secret = parts.password
            given = set(parse_qs(parts.query))
        except ValueError as exc:
            raise ConfigurationError(f"bad RabbitMQ URL {self.where}: {exc}") from None
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigurationError(f"a RabbitMQ URL starts amqp:// or amqps://, not "
                                     f"{self.where}")
        # The URL's own settings win; these only fill in what it leaves out.
        self._defaults = {name: value for name, value in (
            ("socket_timeout", self.connect_timeout),
            ("stack_timeout", self.connect_timeout * 3),
            ("blocked_connection_timeout", self.confirm_timeout),
            ("connection_attempts", 1)) if name not in given}
        self.parameters()  # a bad URL fails now, not on the first publish
        self.declared: dict[str, str] = {}  # name -> "queue" / "exchange", in order
        self._declared_lock = threading.Lock()
        #: The clients with a connection open, for the broker's close: a publisher the
        #: caller dropped at once still has its connection closed then.
        self.connected: set[object] = set()
        self._connected_lock = threading.Lock()

    def parameters(self) -> Any:
        """pika's connection parameters for the URL (a new object each time)."""
        try:
            params = pika.URLParameters(self.url)
            for name, value in self._defaults.items():
                setattr(params, name, value)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"bad RabbitMQ URL {self.where}: "
                                     f"{self.scrub(str(exc))}") from None
        return params

    def connected_clients(self) -> list[object]:
        with self._connected_lock:
            return list(self.connected)

    def joined(self, client: object) -> None:
        with self._connected_lock:
            self.connected.add(client)

    def left(self, client: object) -> None:
        with self._connected_lock:
            self.connected.discard(client)

    def note(self, kind: str, name: str) -> None:
        with self._declared_lock:
            self.declared.setdefault(name, kind)

    def scrub(self, text: str) -> str:
        """``text`` without the URL's password (a client's message may quote it)."""
        if self._secret:
            text = text.replace(self._secret, "***")
        return text.replace(self.url, self.where)

    def _why(self, exc: BaseException) -> str:
        return self.scrub(f"{type(exc).__name__}: {str(exc) or repr(exc)}")

    @contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """RabbitMQ client errors as the framework's, saying what to do (no password)."""
        try:
            yield
        except OutboxError:
            raise
        except (pika.exceptions.ProbableAuthenticationError,
                pika.exceptions.ProbableAccessDeniedError,
                pika.exceptions.AuthenticationError,
                aiormq.exceptions.ProbableAuthenticationError,
                aiormq.exceptions.AuthenticationError) as exc:
            raise BrokerUnavailableError(
                f"RabbitMQ at {self.where} refused the login while {doing} ({self._why(exc)});"
                " check the user, password and vhost in the URL (scripts/rabbitmq up creates "
                "the test user)") from exc
        except (pika.exceptions.ChannelClosedByBroker,
                aiormq.exceptions.ChannelClosed) as exc:
            raise PublishError(f"RabbitMQ at {self.where} refused {doing}: "
                               f"{self._why(exc)}") from exc
        except LOST as exc:
            raise BrokerUnavailableError(
                f"RabbitMQ at {self.where} cannot be reached while {doing} "
                f"({self._why(exc)}); {HINT}") from exc
        except (pika.exceptions.AMQPError, aiormq.exceptions.AMQPError) as exc:
            raise PublishError(f"RabbitMQ at {self.where} refused {doing}: "
                               f"{self._why(exc)}") from exc

    def unroutable_error(self, returned: Sequence[tuple[str | None, str]]) -> PublishError:
        topics = ", ".join(sorted({repr(topic) for _, topic in returned}))
        ids = ", ".join(repr(i) for i, _ in returned[:5]) + (" ..." if len(returned) > 5 else "")
        return PublishError(
            f"RabbitMQ at {self.where} has no queue bound for topic {topics} on exchange "
            f"{exchange_name(self.prefix)!r}: no consumer group of it is declared yet, and "
            f"RabbitMQ would drop message(s) {ids}. Declare the groups first "
            "(RabbitMQBroker.declare_group(topic, group), or start their consumers); the "
            "relay sends it again later. unroutable='drop' drops such messages instead")

    def check_confirms(self, returned: Sequence[tuple[str | None, str]],
                       nacked: Sequence[str | None], *, must_route: bool) -> None:
        if nacked:
            raise PublishError(f"RabbitMQ at {self.where} refused (nack) message(s) "
                               f"{', '.join(repr(i) for i in nacked[:5])}")
        if returned and (must_route or self.unroutable == "error"):
            raise self.unroutable_error(returned)


class Group:
    """The names and queue arguments of one consumer group on one topic."""

    def __init__(self, options: Options, topic: str, group: str) -> None:
        if not isinstance(topic, str) or not topic or not isinstance(group, str) or not group:
            raise ConfigurationError("a RabbitMQ subscriber needs a topic and a group")
        if "*" in topic or "#" in topic:
            raise ConfigurationError(
                f"topic {topic!r} has '*' or '#', which a topic exchange binding takes for "
                "wildcards: the group would get other topics' messages too")
        prefix = options.prefix
        self.topic = topic
        self.group = group
        self.exchange = exchange_name(prefix)
        self.dead_exchange = dead_exchange_name(prefix)
        self.queue = queue_name(prefix, topic, group)
        self.dead_queue = dead_queue_name(prefix, topic, group)
        longest = retry_queue_name(self.queue, 86_400_000)
        if len(longest.encode()) > SHORTSTR:
            raise ConfigurationError(
                f"the queue names of group {group!r} on topic {topic!r} are too long for "
                f"AMQP ({len(longest.encode())} bytes in UTF-8, e.g. {longest[:60]!r}...; "
                f"the limit is {SHORTSTR}): shorten the prefix, topic or group")
        self.queue_arguments: dict[str, Any] = {
            "x-queue-type": "quorum", "x-dead-letter-exchange": self.dead_exchange,
            "x-dead-letter-routing-key": self.dead_queue}
        self.dead_queue_arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        self.options = options

    def retry_queue(self, delay_seconds: float) -> tuple[str, dict[str, Any] | None]:
        """Where a retry after ``delay_seconds`` goes: the bucket queue and its
        arguments, or the group's own queue (no arguments: no wait)."""
        bucket = retry_bucket_ms(delay_seconds)
        if bucket == 0:
            return self.queue, None
        return retry_queue_name(self.queue, bucket), {
            "x-queue-type": "classic", "x-message-ttl": bucket,
            "x-expires": bucket + RETRY_QUEUE_GRACE_MS,
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.queue}

    def note_all(self) -> None:
        for kind, name in (("exchange", self.exchange), ("exchange", self.dead_exchange),
                           ("queue", self.queue), ("queue", self.dead_queue)):
            self.options.note(kind, name)

    def declare(self, channel: Any) -> None:
        """Declare everything the group needs on a pika channel."""
        self.note_all()
        channel.exchange_declare(self.exchange, "topic", durable=True)
        channel.exchange_declare(self.dead_exchange, "direct", durable=True)
        channel.queue_declare(self.dead_queue, durable=True, arguments=self.dead_queue_arguments)
        channel.queue_bind(self.dead_queue, self.dead_exchange, routing_key=self.dead_queue)
        channel.queue_declare(self.queue, durable=True, arguments=self.queue_arguments)
        channel.queue_bind(self.queue, self.exchange, routing_key=self.topic)

    async def adeclare(self, channel: AbstractChannel) -> tuple[AbstractQueue, AbstractExchange]:
        """Declare everything the group needs on an aio-pika channel; its queue and
        the dead-letter exchange."""
        self.note_all()
        exchange = await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        dead_exchange = await channel.declare_exchange(
            self.dead_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        dead = await channel.declare_queue(self.dead_queue, durable=True,
                                           arguments=self.dead_queue_arguments)
        await dead.bind(dead_exchange, routing_key=self.dead_queue)
        queue = await channel.declare_queue(self.queue, durable=True,
                                            arguments=self.queue_arguments)
        await queue.bind(exchange, routing_key=self.topic)
        return queue, dead_exchange

    def refused(self, exc: BaseException) -> ConfigurationError:
        return ConfigurationError(
            f"RabbitMQ at {self.options.where} refused to declare the queues of group "
            f"{self.group!r} on topic {self.topic!r} ({self.options.scrub(str(exc))}); a "
            "queue or exchange of that name exists with other settings (delete it, or use "
            "another prefix)")


def _properties(message: Outgoing) -> Any:
    return pika.BasicProperties(message_id=message.message_id, delivery_mode=2,
                                headers=message.headers, content_type=message.content_type)


def _aio_message(message: Outgoing) -> aio_pika.Message:
    return aio_pika.Message(message.body, message_id=message.message_id,
                            headers=message.headers, content_type=message.content_type,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


def _nothing() -> None:
    pass


# -- sync (pika) ------------------------------------------------------------------------


class _Link:
    """One pika connection and its channel, in confirm mode; its owner holds a lock.

    Publishes go through pika's own channel (``BlockingChannel._impl``), since the
    blocking channel waits for each confirm in turn: here a batch is published whole,
    then its confirms are awaited together.
    """

    def __init__(self, options: Options) -> None:
        self.options = options
        self.connection = pika.BlockingConnection(options.parameters())
        self._pending: set[int] = set()
        self._nacked: set[int] = set()
        self._returned: list[tuple[str | None, str]] = []
        self._next_tag = 1
        self._closed_by: BaseException | None = None
        try:
            self.channel = self.connection.channel()
            impl = self.channel._impl
            selected: list[bool] = []
            impl.add_on_close_callback(self._on_channel_closed)
            impl.add_on_return_callback(self._on_return)
            impl.confirm_delivery(ack_nack_callback=self._on_confirm,
                                  callback=lambda _frame: self._selected(selected))
            self._wait(lambda: bool(selected), "turning publisher confirms on")
        except BaseException:
            self.close()
            raise

    @property
    def is_open(self) -> bool:
        return bool(self.connection.is_open and self.channel.is_open)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        done = {t for t in self._pending if t <= tag} if method.multiple else {tag}
        self._pending -= done
        if isinstance(method, pika.spec.Basic.Nack):
            self._nacked |= done
        if not self._pending:
            self._wake()

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        # RabbitMQ returns an unroutable message just before it confirms it.
        self._returned.append((properties.message_id, method.routing_key))

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        self._closed_by = reason
        self._wake()

    def _selected(self, flags: list[bool]) -> None:
        flags.append(True)
        self._wake()

    def _wake(self, *_: Any) -> None:
        """Make the running ``process_data_events`` return: it returns early only for
        events of the blocking connection's own, and a confirm on pika's channel is
        not one. Never raises: it runs inside pika's own callbacks, also while pika
        tears a lost connection down (and a raise there would stop that)."""
        with suppress(Exception):
            self.connection.add_callback_threadsafe(_nothing)

    def _wait(self, done: Callable[[], bool], doing: str) -> None:
        deadline = time.monotonic() + self.options.confirm_timeout
        while not done():
            if self._closed_by is not None:
                raise self._closed_by
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise BrokerUnavailableError(
                    f"RabbitMQ at {self.options.where} did not answer within "
                    f"{self.options.confirm_timeout:g}s while {doing} (is it blocked by a "
                    "memory or disk alarm?)")
            self.connection.process_data_events(time_limit=min(left, 1.0))

    def publish(self, exchange: str, messages: Sequence[Outgoing], *, must_route: bool) -> None:
        """Publish all of ``messages``, then wait for every confirm."""
        self._returned.clear()
        self._nacked.clear()
        tags: dict[int, str | None] = {}
        for message in messages:
            self.channel._impl.basic_publish(
                exchange=exchange, routing_key=message.routing_key, body=message.body,
                properties=_properties(message), mandatory=True)
            tags[self._next_tag] = message.message_id
            self._pending.add(self._next_tag)
            self._next_tag += 1
        self._wait(lambda: not self._pending, f"waiting for the confirms of {len(tags)} "
                   "message(s)")
        self.options.check_confirms(list(self._returned),
                                    [tags.get(t) for t in sorted(self._nacked)],
                                    must_route=must_route)

    def close(self) -> None:
        with suppress(Exception):  # closing what may be gone already
            if self.connection.is_open:
                self.connection.close()


class _SyncClient:
    """A client with one connection of its own, used under a lock, opened again when
    lost (see the module's docstring)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._lock = threading.RLock()
        self._link: _Link | None = None
        #: Counts the connections opened: a handle of an earlier one is dead.
        self.generation = 0

    def _open(self) -> _Link:
        return _Link(self.options)

    def _lost(self) -> None:
        """What to forget when the connection goes."""

    def _drop(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
        self.generation += 1
        self._lost()

    def _run(self, doing: str, work: Callable[[_Link], T]) -> T:
        """``work`` on an open connection; once more on a new one if it found the
        connection dead."""
        with self._lock, self.options.errors(doing):
            while True:
                fresh = self._link is None or not self._link.is_open
                if fresh:
                    self._drop()
                    self._link = self._open()
                    self.options.joined(self)
                link = self._link
                assert link is not None
                try:
                    return work(link)
                except SYNC_LOST:
                    self._drop()
                    if fresh:
                        raise
                except BaseException:
                    if not link.is_open:
                        self._drop()
                    raise

    def close(self) -> None:
        with self._lock:
            if self._link is not None:
                self._drop()
            self.options.left(self)


class RabbitMQPublisher(_SyncClient):
    """Publishes to the prefix's topic exchange, with confirms; ``publish_batch``
    waits for the confirms of the whole batch at once."""

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.exchange = exchange_name(options.prefix)

    def _open(self) -> _Link:
        link = _Link(self.options)
        try:
            self.options.note("exchange", self.exchange)
            link.channel.exchange_declare(self.exchange, "topic", durable=True)
        except BaseException:
            link.close()
            raise
        return link

    def publish(self, message: Message) -> None:
        self.publish_batch([message])

    def publish_batch(self, messages: Sequence[Message]) -> None:
        """Every message is encoded first (one that cannot be fails the batch before
        anything is sent), then all are published and their confirms awaited."""
        encoded = [to_outgoing(m) for m in messages]
        if not encoded:
            return
        self._run(f"publishing {len(encoded)} message(s)",
                  lambda link: link.publish(self.exchange, encoded, must_route=False))


class _Subscription:
    """What the sync and asyncio subscribers share: names, checks and limits."""

    #: Delivery.attempt is the broker's own count (outbox.typing.CountsDeliveries).
    counts_deliveries = True

    def __init__(self, options: Options, topic: str, group: str, visibility_timeout: float,
                 prefetch: int | None) -> None:
        if not visibility_timeout > 0:
            raise ConfigurationError("visibility_timeout must be positive (seconds)")
        if prefetch is not None and (not isinstance(prefetch, int) or not 1 <= prefetch <= 65535):
            raise ConfigurationError("prefetch must be a whole number from 1 to 65535")
        self.names = Group(options, topic, group)
        self.topic = topic
        self.group = group
        self.queue = self.names.queue
        #: Not used: RabbitMQ redelivers when a channel closes (see the module's docstring).
        self.visibility_timeout = visibility_timeout
        self.prefetch = prefetch or options.prefetch

    @staticmethod
    def count(max_messages: int) -> int:
        return max(1, min(max_messages, MAX_FETCH))


class RabbitMQSubscriber(_Subscription, _SyncClient):
    """One consumer of ``group``'s queue on ``topic`` (see the module's docstring)."""

    def __init__(self, options: Options, topic: str, group: str, *,
                 visibility_timeout: float = 30.0, prefetch: int | None = None) -> None:
        _Subscription.__init__(self, options, topic, group, visibility_timeout, prefetch)
        _SyncClient.__init__(self, options)
        self._buffer: deque[Delivery] = deque()
        self._in_hand: set[int] = set()
        self._consuming = False
        self._cancelled = False
        # The queues exist from here on: what is published from now on is this group's.
        self._run(f"declaring the queues of group {group!r}", lambda link: None)

    def _open(self) -> _Link:
        link = _Link(self.options)
        try:
            try:
                self.names.declare(link.channel)
            except pika.exceptions.ChannelClosedByBroker as exc:
                raise self.names.refused(exc) from exc
            link.channel.basic_qos(prefetch_count=self.prefetch)
            link.channel.add_on_cancel_callback(self._on_cancel)
        except BaseException:
            link.close()
            raise
        return link

    def _lost(self) -> None:
        self._buffer.clear()
        self._in_hand.clear()
        self._consuming = False
        self._cancelled = False

    def _on_cancel(self, _frame: Any) -> None:
        # RabbitMQ ended the consumer: its queue was deleted (or its node went away).
        self._cancelled = True

    def _on_message(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._buffer.append(to_delivery(self.topic, properties.message_id, properties.headers,
                                        body, Handle(self.generation, method.delivery_tag)))

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        count = self.count(max_messages)
        deadline = time.monotonic() + max(0.0, wait_seconds)
        return self._run(f"reading {self.queue}", lambda link: self._fetch(link, count, deadline))

    def _fetch(self, link: _Link, count: int, deadline: float) -> list[Delivery]:
        if not self._consuming:
            link.channel.basic_consume(self.queue, self._on_message)
            self._consuming = True
        link.connection.process_data_events(time_limit=0)
        while not self._buffer:
            if self._cancelled:  # a new connection declares the queues again
                raise pika.exceptions.ConsumerCancelled(f"RabbitMQ cancelled the consumer of "
                                                        f"{self.queue}")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            link.connection.process_data_events(time_limit=min(left, 1.0))
        handed: list[Delivery] = []
        while self._buffer and len(handed) < count:
            delivery = self._buffer.popleft()
            self._in_hand.add(delivery.handle.tag)
            handed.append(delivery)
        return handed

    def _settle(self, doing: str, delivery: Delivery, work: Callable[[_Link, int], None]
                ) -> None:
        """``work`` with the delivery's tag, if the delivery is alive (handed out on the
        channel still open, not settled yet); else nothing: RabbitMQ gives it back."""
        with self._lock, self.options.errors(doing):
            handle, link = delivery.handle, self._link
            if (link is None or not link.is_open or not isinstance(handle, Handle)
                    or handle.generation != self.generation or handle.tag not in self._in_hand):
                return
            try:
                work(link, handle.tag)
            except SYNC_LOST:
                self._drop()
                raise
            except BaseException:
                if not link.is_open:
                    self._drop()
                raise
            self._in_hand.discard(handle.tag)

    def ack(self, delivery: Delivery) -> None:
        self._settle(f"acknowledging {delivery.message_id!r}", delivery,
                     lambda link, tag: link.channel.basic_ack(tag))

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        """Deliver again after ``delay_seconds``, to this group only (a copy through
        the delay's retry queue); the delivery in hand is acknowledged."""

        def work(link: _Link, tag: int) -> None:
            target, arguments = self.names.retry_queue(delay_seconds)
            if arguments is not None:
                self.options.note("queue", target)
                link.channel.queue_declare(target, durable=True, arguments=arguments)
            link.publish("", [retry_copy(delivery, target, error)], must_route=True)
            link.channel.basic_ack(tag)

        self._settle(f"retrying {delivery.message_id!r}", delivery, work)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Park the delivery in the group's dead queue, with ``reason``; the delivery in
        hand is acknowledged."""

        def work(link: _Link, tag: int) -> None:
            copy = dead_copy(delivery, self.names.dead_queue, self.group, reason)
            link.publish(self.names.dead_exchange, [copy], must_route=True)
            link.channel.basic_ack(tag)

        self._settle(f"dead-lettering {delivery.message_id!r}", delivery, work)


class _Admin(_SyncClient):
    """The broker's own connection: declarations, dead-letter listings, clean-up."""


# -- asyncio (aio-pika) ----------------------------------------------------------------


class _AsyncLink:
    """One aio-pika connection and its channel, with publisher confirms."""

    def __init__(self, options: Options, connection: AbstractConnection,
                 channel: AbstractChannel) -> None:
        self.options = options
        self.connection = connection
        self.channel = channel
        self.exchanges: dict[str, AbstractExchange] = {"": channel.default_exchange}
        #: Set when a confirm did not come in time: the channel is not to be trusted.
        self.broken = False

    @classmethod
    async def open(cls, options: Options) -> _AsyncLink:
        connection = await aio_pika.connect(options.url, timeout=options.connect_timeout)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await connection.close()
            raise
        return cls(options, connection, channel)

    @property
    def is_open(self) -> bool:
        return not self.broken and not self.connection.is_closed and not self.channel.is_closed

    async def publish(self, exchange: str, messages: Sequence[Outgoing], *,
                      must_route: bool) -> None:
        """Publish all of ``messages``, then wait for every confirm."""
        target = self.exchanges[exchange]
        results = await asyncio.gather(
            *(target.publish(_aio_message(m), m.routing_key, mandatory=True,
                             timeout=self.options.confirm_timeout) for m in messages),
            return_exceptions=True)
        returned: list[tuple[str | None, str]] = []
        nacked: list[str | None] = []
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, aiormq.exceptions.PublishError):  # returned unroutable
                returned.append((message.message_id, message.routing_key))
            elif isinstance(result, aiormq.exceptions.DeliveryError):
                nacked.append(message.message_id)
            elif isinstance(result, TimeoutError):
                self.broken = True
                raise BrokerUnavailableError(
                    f"RabbitMQ at {self.options.where} did not confirm within "
                    f"{self.options.confirm_timeout:g}s (is it blocked by a memory or disk "
                    "alarm?)") from result
            elif isinstance(result, BaseException):
                raise result
        self.options.check_confirms(returned, nacked, must_route=must_route)

    async def close(self) -> None:
        with suppress(Exception):  # closing what may be gone already
            await self.connection.close()


class _AsyncClient:
    """:class:`_SyncClient` for asyncio: tasks of one event loop share it."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._link: _AsyncLink | None = None
        self._opening: asyncio.Lock | None = None
        self.generation = 0

    async def _open(self) -> _AsyncLink:
        return await _AsyncLink.open(self.options)

    def _lost(self) -> None:
        """What to forget when the connection goes."""

    async def _drop(self) -> None:
        link, self._link = self._link, None
        self.generation += 1
        self._lost()
        if link is not None:
            await link.close()

    async def _ready(self) -> tuple[_AsyncLink, bool]:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            link = self._link
            if link is not None and link.is_open:
                return link, False
            await self._drop()
            self._link = await self._open()
            self.options.joined(self)
            return self._link, True

    async def _run(self, doing: str, work: Callable[[_AsyncLink], Awaitable[T]]) -> T:
        with self.options.errors(doing):
            while True:
                link, fresh = await self._ready()
                try:
                    return await work(link)
                except ASYNC_LOST:
                    if self._link is link:
                        await self._drop()
                    if fresh:
                        raise
                except BaseException:
                    if not link.is_open and self._link is link:
                        await self._drop()
                    raise

    async def close(self) -> None:
        if self._link is not None:
            await self._drop()
        self.options.left(self)


class AsyncRabbitMQPublisher(_AsyncClient):
    """:class:`RabbitMQPublisher` for asyncio."""

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.exchange = exchange_name(options.prefix)

    async def _open(self) -> _AsyncLink:
        link = await _AsyncLink.open(self.options)
        try:
            self.options.note("exchange", self.exchange)
            link.exchanges[self.exchange] = await link.channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        except BaseException:
            await link.close()
            raise
        return link

    async def publish(self, message: Message) -> None:
        await self.publish_batch([message])

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        encoded = [to_outgoing(m) for m in messages]
        if not encoded:
            return
        await self._run(f"publishing {len(encoded)} message(s)",
                        lambda link: link.publish(self.exchange, encoded, must_route=False))


class AsyncRabbitMQSubscriber(_Subscription, _AsyncClient):
    """:class:`RabbitMQSubscriber` for asyncio. The group's queues are declared when it
    is made (over a short blocking connection, by :meth:`RabbitMQBroker.async_subscriber`)
    and again on each connection."""

    def __init__(self, options: Options, topic: str, group: str, *,
                 visibility_timeout: float = 30.0, prefetch: int | None = None) -> None:
        _Subscription.__init__(self, options, topic, group, visibility_timeout, prefetch)
        _AsyncClient.__init__(self, options)
        self._buffer: deque[Delivery] = deque()
        self._received: dict[int, AbstractIncomingMessage] = {}
        self._in_hand: set[int] = set()
        self._queue: AbstractQueue | None = None
        self._consuming = False
        self._cancelled = False
        self._arrived: asyncio.Event | None = None

    async def _open(self) -> _AsyncLink:
        link = await _AsyncLink.open(self.options)
        try:
            try:
                self._queue, dead_exchange = await self.names.adeclare(link.channel)
            except aiormq.exceptions.ChannelClosed as exc:
                raise self.names.refused(exc) from exc
            link.exchanges[self.names.dead_exchange] = dead_exchange
            await link.channel.set_qos(prefetch_count=self.prefetch)
            link.connection.close_callbacks.add(self._wake)
            underlay = await link.channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
        except BaseException:
            await link.close()
            raise
        return link

    def _lost(self) -> None:
        self._buffer.clear()
        self._received.clear()
        self._in_hand.clear()
        self._consuming = False
        self._cancelled = False
        self._queue = None

    def _on_cancel(self, _frame: Any) -> None:
        self._cancelled = True  # see RabbitMQSubscriber._on_cancel
        self._wake()

    def _wake(self, *_: Any) -> None:
        if self._arrived is not None:
            self._arrived.set()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        tag = message.delivery_tag
        if tag is None:
            return
        self._received[tag] = message
        self._buffer.append(to_delivery(self.topic, message.message_id, message.headers,
                                        message.body, Handle(self.generation, tag)))
        self._wake()

    async def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        count = self.count(max_messages)
        deadline = time.monotonic() + max(0.0, wait_seconds)
        return await self._run(f"reading {self.queue}",
                               lambda link: self._fetch(link, count, deadline))

    async def _fetch(self, link: _AsyncLink, count: int, deadline: float) -> list[Delivery]:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if not self._consuming:
            assert self._queue is not None
            await self._queue.consume(self._on_message)
            self._consuming = True
        await asyncio.sleep(0)  # deliveries already read run their callbacks
        while not self._buffer:
            if not link.is_open or self._cancelled:
                raise aiormq.exceptions.ChannelInvalidStateError(
                    f"the consumer of {self.queue} ended (a lost connection, a deleted queue)")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._arrived.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(left, 1.0))
        handed: list[Delivery] = []
        while self._buffer and len(handed) < count:
            delivery = self._buffer.popleft()
            self._in_hand.add(delivery.handle.tag)
            handed.append(delivery)
        return handed

    async def _settle(self, doing: str, delivery: Delivery,
                      work: Callable[[_AsyncLink, AbstractIncomingMessage], Awaitable[None]]
                      ) -> None:
        """:meth:`RabbitMQSubscriber._settle` for asyncio."""
        with self.options.errors(doing):
            handle, link = delivery.handle, self._link
            if (link is None or not link.is_open or not isinstance(handle, Handle)
                    or handle.generation != self.generation or handle.tag not in self._in_hand):
                return
            received = self._received[handle.tag]
            try:
                await work(link, received)
            except ASYNC_LOST:
                if self._link is link:
                    await self._drop()
                raise
            except BaseException:
                if not link.is_open and self._link is link:
                    await self._drop()
                raise
            self._in_hand.discard(handle.tag)
            self._received.pop(handle.tag, None)

    async def ack(self, delivery: Delivery) -> None:
        async def work(_link: _AsyncLink, received: AbstractIncomingMessage) -> None:
            await received.ack()

        await self._settle(f"acknowledging {delivery.message_id!r}", delivery, work)

    async def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        """:meth:`RabbitMQSubscriber.retry` for asyncio."""

        async def work(link: _AsyncLink, received: AbstractIncomingMessage) -> None:
            target, arguments = self.names.retry_queue(delay_seconds)
            if arguments is not None:
                self.options.note("queue", target)
                await link.channel.declare_queue(target, durable=True, arguments=arguments)
            await link.publish("", [retry_copy(delivery, target, error)], must_route=True)
            await received.ack()

        await self._settle(f"retrying {delivery.message_id!r}", delivery, work)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """:meth:`RabbitMQSubscriber.dead_letter` for asyncio."""

        async def work(link: _AsyncLink, received: AbstractIncomingMessage) -> None:
            copy = dead_copy(delivery, self.names.dead_queue, self.group, reason)
            await link.publish(self.names.dead_exchange, [copy], must_route=True)
            await received.ack()

        await self._settle(f"dead-lettering {delivery.message_id!r}", delivery, work)


# -- the broker -------------------------------------------------------------------------


class RabbitMQBroker:
    """RabbitMQ at ``url`` (``amqp://user:password@host:port/vhost``, the vhost
    URL-quoted: ``%2F`` for ``/``; ``amqps://`` for TLS; client settings as query
    parameters, e.g. ``?heartbeat=30``).

    Every publisher and subscriber it hands out has a connection of its own;
    :meth:`close` (and :meth:`aclose`, for the asyncio ones) closes them all. Options:
    ``prefix`` names the exchanges and queues (``outbox``), ``unroutable`` is
    ``"error"`` or ``"drop"`` (see the module's docstring), ``prefetch`` is a
    subscriber's default prefetch (64), ``confirm_timeout`` bounds the wait for a
    confirm (30 s), ``connect_timeout`` the wait for a connection (5 s).
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.options = Options(url, **options)
        self._admin = _Admin(self.options)

    def publisher(self) -> RabbitMQPublisher:
        return RabbitMQPublisher(self.options)

    def subscriber(self, topic: str, group: str, **options: Any) -> RabbitMQSubscriber:
        """A subscriber of ``group`` on ``topic``; the group's queues exist when it
        returns (BrokerUnavailableError if RabbitMQ cannot be reached)."""
        return RabbitMQSubscriber(self.options, topic, group, **options)

    def async_publisher(self) -> AsyncRabbitMQPublisher:
        return AsyncRabbitMQPublisher(self.options)

    def async_subscriber(self, topic: str, group: str, **options: Any
                         ) -> AsyncRabbitMQSubscriber:
        """:meth:`subscriber` for asyncio. It declares the group's queues before it
        returns, over the broker's blocking connection (a few milliseconds; up to
        ``connect_timeout`` when RabbitMQ is down): make it at start-up."""
        client = AsyncRabbitMQSubscriber(self.options, topic, group, **options)
        self.declare_group(topic, group)
        return client

    def declare_group(self, topic: str, group: str) -> None:
        """Declare the queues of ``group`` on ``topic`` (idempotent): from now on the
        group gets every message of the topic, whether or not a consumer runs."""
        names = Group(self.options, topic, group)

        def declare(link: _Link) -> None:
            try:
                names.declare(link.channel)
            except pika.exceptions.ChannelClosedByBroker as exc:
                raise names.refused(exc) from exc

        self._admin._run(f"declaring the queues of group {group!r}", declare)

    def dead_letters(self, topic: str, group: str, count: int = 1000) -> list[DeadLetter]:
        """The dead letters of ``group`` on ``topic``, oldest first, left in place
        (read on a channel of their own that is closed unacknowledged)."""
        dead_queue = Group(self.options, topic, group).dead_queue

        def browse(link: _Link) -> list[DeadLetter]:
            channel = link.connection.channel()
            found: list[DeadLetter] = []
            try:
                while len(found) < count:
                    method, properties, body = channel.basic_get(dead_queue, auto_ack=False)
                    if method is None:
                        break
                    found.append(to_dead_letter(properties.message_id, properties.headers,
                                                body))
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    return []  # never declared: no dead letters
                raise
            finally:
                if channel.is_open:
                    channel.close()  # every message goes back to the queue
            return found

        return self._admin._run(f"reading the dead letters of {dead_queue}", browse)

    def delete_declared(self) -> None:
        """Delete every queue and exchange this broker's clients declared, with what
        they hold (for tests, and for tearing down a prefix)."""
        with self.options._declared_lock:
            declared = list(self.options.declared.items())

        def delete(link: _Link) -> None:
            for name, kind in reversed(declared):
                channel = link.connection.channel()
                try:
                    if kind == "queue":
                        channel.queue_delete(name)
                    else:
                        channel.exchange_delete(name)
                except pika.exceptions.ChannelClosedByBroker:
                    pass  # gone already
                finally:
                    if channel.is_open:
                        channel.close()

        self._admin._run("deleting the declared queues and exchanges", delete)
        with self.options._declared_lock:
            for name, _ in declared:
                self.options.declared.pop(name, None)

    def close(self) -> None:
        """Close the connection of every sync publisher and subscriber handed out
        (their unacknowledged deliveries go back to their queues) and the broker's own;
        they open new ones if used again."""
        for client in self.options.connected_clients():
            if isinstance(client, _SyncClient):
                client.close()
        self._admin.close()

    async def aclose(self) -> None:
        """Close the asyncio clients' connections (from their event loop), then the
        sync ones."""
        for client in self.options.connected_clients():
            if isinstance(client, _AsyncClient):
                await client.close()
        self.close()


def connect(url: str, **options: Any) -> RabbitMQBroker:
    """The :class:`RabbitMQBroker` for ``url`` (``outbox.brokers.open_broker`` calls it)."""
    return RabbitMQBroker(url, **options)
