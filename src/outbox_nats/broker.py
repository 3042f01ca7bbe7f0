"""NATS JetStream as a broker: publisher and subscriber, asyncio (``nats-py``) and
sync (the same coroutines on a private event loop), on the message format of
:mod:`outbox_nats.mapping`.

Streams: each topic is a stream of its own, named after the topic's subject and
holding just that subject, created on first use with file storage (it survives a
server restart) and a de-duplication window of ``duplicate_window`` seconds (2
minutes by default): a message published again with the same id within the
window is stored once, and its PubAck says ``duplicate``. An existing stream of
that name is used as it is (its limits are the operator's).

Publishing: ``publish_batch`` checks and encodes every message first, so a bad one
fails the batch before anything is sent, then publishes them all, in order, on one
connection, and returns once JetStream has acknowledged every one (a PubAck; a
duplicate counts as stored). JetStream has no transactions: should the server fail
in the middle of a batch, the first messages may be stored and the rest not. The
relay then publishes the whole batch again, and the de-duplication window stores
each message once (the consumer's inbox de-duplicates whatever is older).

Consuming: a consumer group is a durable pull consumer on the topic's stream, named
after the group, delivering the stream from its start (a new group reads everything
the stream still holds), with explicit acknowledgement and ``ack_wait`` =
``visibility_timeout``: a delivery not settled within it is delivered again. The
group's consumer is one, so the latest subscriber to join sets its ``ack_wait``.
There is no ``max_deliver``: the idempotent consumer decides when to give up, and
dead-letters. ``Delivery.attempt`` is the server's count of deliveries to the group
(the subscriber declares ``counts_deliveries``). ``ack`` waits for the server to
confirm it; ``retry`` is a NAK with a delay (JetStream delivers it again after the
delay); ``dead_letter`` publishes a copy, with the group and the reason, to the
subject ``<prefix><topic>.dead`` (a stream of its own, for every group of the topic)
and terminates the original (TERM: never delivered again to that group). A stream
or consumer deleted under a subscriber is made again (noticed on an empty fetch,
within CONSUMER_CHECK_INTERVAL), and the group starts over from the stream's start.

Event loops: nats-py is asyncio only, and a connection belongs to the event loop it
was made on. The asyncio publisher and subscriber use the caller's loop, with a
connection per loop made on first use. The sync ones run the same coroutines on a
private event loop in a daemon thread, one per broker, started on first use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
import uuid
import weakref
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from outbox.brokers import masked
from outbox.errors import BrokerUnavailableError, ConfigurationError, PublishError
from outbox.log import get_logger
from outbox.message import Message
from outbox.transport import Delivery

from .mapping import (
    DeadLetter,
    check_subject,
    consumer_name,
    dead_headers,
    dead_letter_subject,
    stream_name,
    to_dead_letter,
    to_delivery,
    to_nats,
)

T = TypeVar("T")
DEFAULT_PREFIX = "outbox."
#: JetStream's own default: a message id is remembered for two minutes.
DEFAULT_DUPLICATE_WINDOW = 120.0
#: A fetch pulls at most this many messages whatever it is asked for.
MAX_FETCH = 256
#: Messages published before waiting for their acknowledgements (nats-py allows
#: 4000 unacknowledged asynchronous publishes).
PUBLISH_CHUNK = 1000
#: nats-py refuses a pull without a timeout: ``fetch(n, 0)`` waits this long.
MIN_WAIT = 0.05
#: A sync call waits this much longer for the private loop than its work may take.
CALL_MARGIN = 10.0
#: An empty fetch checks at most this often that the group's consumer still exists.
CONSUMER_CHECK_INTERVAL = 5.0
#: A stream of that name exists with another configuration: it is used as it is.
STREAM_NAME_IN_USE = 10058

log = get_logger("outbox.nats")

#: Errors that mean the server cannot be reached (nats' TimeoutError is an OSError).
_UNREACHABLE = (OSError, nats.errors.NoServersError, nats.errors.ConnectionClosedError,
                nats.errors.StaleConnectionError, nats.errors.ConnectionReconnectingError,
                nats.errors.OutboundBufferLimitError)


def _refused_login(exc: BaseException) -> bool:
    """The server refused the user/password (nats-py says so in a plain Error too)."""
    return isinstance(exc, nats.errors.AuthorizationError) or (
        isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower())


class Options:
    """What every client of one broker shares: the URL, the subject prefix, timeouts
    and the options of the connections."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX,
                 duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
                 request_timeout: float = 5.0, connect_timeout: float = 5.0,
                 **connect_options: Any) -> None:
        self.url = url
        self.where = masked(url)
        if not isinstance(prefix, str):
            raise ConfigurationError("prefix must be a string (like 'outbox.')")
        try:
            check_subject(prefix, "topic")
        except ValueError:
            raise ConfigurationError(
                f"prefix {prefix!r} cannot start a NATS subject: use letters, digits, '-' and "
                "'_', ending with a dot (like 'outbox.')") from None
        for name, value in (("duplicate_window", duplicate_window),
                            ("request_timeout", request_timeout),
                            ("connect_timeout", connect_timeout)):
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds")
        self.prefix = prefix
        self.duplicate_window = float(duplicate_window)
        self.request_timeout = float(request_timeout)
        self.connect_timeout = float(connect_timeout)
        self.connect_options = connect_options

    @contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """nats-py errors as the framework's, saying what to do (no password shown)."""
        try:
            yield
        except (nats.errors.Error, OSError) as exc:
            raise self._translated(exc, doing) from exc

    def _translated(self, exc: BaseException, doing: str) -> PublishError:
        if _refused_login(exc):
            return BrokerUnavailableError(
                f"NATS at {self.where} refused the user or password of the URL while "
                f"{doing}: {exc}")
        if isinstance(exc, _UNREACHABLE):
            return BrokerUnavailableError(
                f"NATS at {self.where} cannot be reached while {doing} ({type(exc).__name__}:"
                f" {exc}); is the server running? (scripts/nats up starts the test server)")
        if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
            return PublishError(
                f"NATS at {self.where}: nothing answered while {doing} ({type(exc).__name__}); "
                "is JetStream enabled on the server (nats-server -js)?")
        return PublishError(f"NATS at {self.where} refused {doing}: "
                            f"{type(exc).__name__}: {exc}")

    def subject(self, topic: object, error: type[Exception] = PublishError) -> str:
        """The subject of ``topic``; ``error`` saying what to do if it cannot be one."""
        try:
            return check_subject(self.prefix, topic)
        except (TypeError, ValueError) as exc:
            raise error(str(exc)) from None

    def check_group(self, topic: str, group: str) -> None:
        if not topic or not group:
            raise ConfigurationError("a NATS subscriber needs a topic and a group")
        if not isinstance(group, str) or not group.isprintable():
            raise ConfigurationError(f"group {group!r} must be printable text")


class _Link:
    """One connection and its JetStream context, for the event loop it was made on;
    connects on first use, and again after nats-py gave up reconnecting."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        #: Streams known to exist on this connection's server.
        self.streams: set[str] = set()
        self._lock = asyncio.Lock()

    def _open(self) -> bool:
        return self.js is not None and self.nc is not None and not self.nc.is_closed

    async def jetstream(self) -> JetStreamContext:
        if not self._open():
            async with self._lock:
                if not self._open():
                    self.nc = await self._connect()
                    self.js = self.nc.jetstream(timeout=self.options.request_timeout)
                    self.streams.clear()
        assert self.js is not None
        return self.js

    async def _connect(self) -> NATS:
        """A connection, within ``connect_timeout`` all told: nats-py would go on
        trying an unreachable server for minutes."""
        options = self.options
        nc = NATS()
        kwargs: dict[str, Any] = {"name": "outbox", "error_cb": self._on_error,
                                  "connect_timeout": max(1, math.ceil(options.connect_timeout)),
                                  **options.connect_options}
        try:
            await asyncio.wait_for(nc.connect(servers=[options.url], **kwargs),
                                   options.connect_timeout)
        except TimeoutError as exc:
            last = nc.last_error  # why the attempts failed (refused, bad password ...)
            with suppress(Exception):
                await nc.close()
            raise (last or exc) from None
        except BaseException:
            with suppress(Exception):
                await nc.close()
            raise
        return nc

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats_error", url=self.options.where, error=f"{type(exc).__name__}: {exc}")

    async def ensure_stream(self, subject: str) -> str:
        """The stream of ``subject``, created if it does not exist (idempotently)."""
        name = stream_name(subject)
        if name in self.streams:
            return name
        js = await self.jetstream()
        try:
            await js.add_stream(api.StreamConfig(
                name=name, subjects=[subject], storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                duplicate_window=self.options.duplicate_window))
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
        self.streams.add(name)
        return name

    async def close(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None and not nc.is_closed:
            with suppress(nats.errors.Error, OSError):
                await nc.close()


class _Links:
    """One :class:`_Link` per event loop that uses the broker."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Link] = (
            weakref.WeakKeyDictionary())

    def current(self) -> _Link:
        """The running loop's link (call it from a coroutine)."""
        loop = asyncio.get_running_loop()
        link = self._by_loop.get(loop)
        if link is None:
            link = self._by_loop[loop] = _Link(self.options)
        return link

    async def close_current(self) -> None:
        link = self._by_loop.pop(asyncio.get_running_loop(), None)
        if link is not None:
            await link.close()


class _Runner:
    """The private event loop of a broker's sync clients, on a daemon thread started
    on first use."""

    def __init__(self, options: Options, links: _Links) -> None:
        self.options = options
        self.links = links
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="outbox-nats",
                                          daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def budget(self, work: float = 0.0) -> float:
        """How long a sync call may wait: connecting, ``work`` seconds, a margin."""
        return self.options.connect_timeout + self.options.request_timeout + work + CALL_MARGIN

    def call(self, coro: Coroutine[Any, Any, T], doing: str, work: float = 0.0) -> T:
        """Run ``coro`` on the private loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self._started())
        timeout = self.budget(work)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BrokerUnavailableError(
                f"NATS at {self.options.where} gave no answer within {timeout:.0f}s while "
                f"{doing}; is the server running? (scripts/nats up starts the test server)"
            ) from None

    def close(self) -> None:
        """Close the private loop's connection, then the loop (it starts again on the
        next sync call)."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return

        async def shut_down() -> None:
            await self.links.close_current()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut_down(), loop).result(self.budget())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()


def _encode_all(options: Options, messages: Sequence[Message]
                ) -> list[tuple[str, dict[str, str], bytes]]:
    encoded = []
    for m in messages:
        headers, payload = to_nats(m)
        encoded.append((options.subject(getattr(m, "topic", None)), headers, payload))
    return encoded


def _size(headers: dict[str, str], payload: bytes) -> int:
    """About what a message takes of the server's ``max_payload``."""
    return len(payload) + 64 + sum(len(k.encode()) + len(v.encode()) + 4
                                   for k, v in headers.items())


class AsyncNatsPublisher:
    """Publishes to the topics' streams; ``publish_batch`` waits for every PubAck."""

    def __init__(self, options: Options, links: _Links) -> None:
        self.options = options
        self.links = links
        #: Messages JetStream answered as duplicates (an id already stored within the
        #: stream's duplicate window): acknowledged, stored once.
        self.duplicates = 0

    async def publish(self, message: Message) -> None:
        await self.publish_batch([message])

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        """Every message stored (or known from the duplicate window) on return; the
        batch is checked before anything is sent (see the module's docstring)."""
        encoded = _encode_all(self.options, messages)
        if not encoded:
            return
        link = self.links.current()
        with self.options.errors(f"publishing {len(encoded)} message(s)"):
            js = await link.jetstream()
            assert link.nc is not None
            limit = link.nc.max_payload
            for (_, headers, payload), m in zip(encoded, messages, strict=True):
                if limit and _size(headers, payload) > limit:
                    raise PublishError(
                        f"message {m.id!r} is {_size(headers, payload)} bytes with its headers;"
                        f" NATS at {self.options.where} takes at most {limit} (max_payload)")
            try:
                await self._publish(link, js, encoded)
            except nats.js.errors.NoStreamResponseError:
                # A stream was deleted meanwhile: make it again and publish the batch
                # again (what was stored already is a duplicate).
                link.streams.clear()
                await self._publish(link, js, encoded)

    async def _publish(self, link: _Link, js: JetStreamContext,
                       encoded: list[tuple[str, dict[str, str], bytes]]) -> None:
        for subject in dict.fromkeys(s for s, _, _ in encoded):
            await link.ensure_stream(subject)
        for start in range(0, len(encoded), PUBLISH_CHUNK):
            futures = [await js.publish_async(subject, payload, headers=dict(headers))
                       for subject, headers, payload in encoded[start:start + PUBLISH_CHUNK]]
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                             self.options.request_timeout)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                if getattr(result, "duplicate", False):
                    self.duplicates += 1

    async def close(self) -> None:
        pass  # the broker owns the connections


class AsyncNatsSubscriber:
    """A subscriber of ``group`` on ``topic``'s stream (see the module's docstring)."""

    #: Delivery.attempt is the server's own count (outbox.typing.CountsDeliveries).
    counts_deliveries = True

    def __init__(self, options: Options, links: _Links, topic: str, group: str, *,
                 visibility_timeout: float = 30.0) -> None:
        options.check_group(topic, group)
        if not isinstance(visibility_timeout, int | float) or visibility_timeout <= 0:
            raise ConfigurationError("visibility_timeout must be positive (seconds)")
        self.options = options
        self.links = links
        self.topic = topic
        self.group = group
        self.subject = options.subject(topic, ConfigurationError)
        self.stream = stream_name(self.subject)
        self.durable = consumer_name(group)
        self.dead_subject = dead_letter_subject(self.subject)
        self.visibility_timeout = float(visibility_timeout)
        self._sub: JetStreamContext.PullSubscription | None = None
        self._nc: NATS | None = None  # the connection self._sub lives on
        self._checked = time.monotonic()  # when the consumer was last known to exist

    async def _subscription(self) -> tuple[_Link, JetStreamContext.PullSubscription]:
        """The pull subscription, made (with the stream and the group's consumer) on
        first use and again on a new connection."""
        link = self.links.current()
        js = await link.jetstream()
        if self._sub is not None and self._nc is link.nc:
            return link, self._sub
        await link.ensure_stream(self.subject)
        config = api.ConsumerConfig(
            durable_name=self.durable, deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT, ack_wait=self.visibility_timeout,
            max_deliver=-1, filter_subject=self.subject)
        try:
            await js.add_consumer(self.stream, config)
        except nats.js.errors.BadRequestError:
            # Changed by an operator in a way that cannot be edited: use it as it is.
            await js.consumer_info(self.stream, self.durable)
        self._sub = await js.pull_subscribe_bind(self.durable, stream=self.stream)
        self._nc = link.nc
        self._checked = time.monotonic()
        return link, self._sub

    async def _pull(self, link: _Link, sub: JetStreamContext.PullSubscription, count: int,
                    wait_seconds: float) -> list[Msg]:
        try:
            return await sub.fetch(count, max(wait_seconds, MIN_WAIT))
        except TimeoutError:  # nats.errors.TimeoutError too: nothing came
            if link.nc is not None and not link.nc.is_connected:
                raise nats.errors.ConnectionReconnectingError() from None
            return []

    async def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        count = max(1, min(max_messages, MAX_FETCH))
        with self.options.errors(f"reading {self.subject}"):
            link, sub = await self._subscription()
            msgs: list[Msg] | None
            try:
                msgs = await self._pull(link, sub, count, wait_seconds)
            except nats.js.errors.APIError as exc:
                if exc.code not in (409, 503):  # consumer deleted, no responders
                    raise
                msgs = None
            if msgs is None or (not msgs and await self._lost(link)):
                # The consumer or its stream was deleted: make them again (the group
                # starts over from the stream's start, as a new group does).
                await self._drop()
                link.streams.discard(self.stream)
                link, sub = await self._subscription()
                msgs = await self._pull(link, sub, count, MIN_WAIT)
        return [self._delivery(m) for m in msgs]

    async def _lost(self, link: _Link) -> bool:
        """Whether the group's consumer is gone. nats-py reports a pull from a deleted
        consumer as nothing to fetch, so an empty fetch asks the server, at most every
        CONSUMER_CHECK_INTERVAL seconds."""
        now = time.monotonic()
        if now - self._checked < CONSUMER_CHECK_INTERVAL:
            return False
        self._checked = now
        try:
            await (await link.jetstream()).consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            return True
        return False

    def _delivery(self, msg: Msg) -> Delivery:
        try:
            attempt = msg.metadata.num_delivered
        except (nats.errors.Error, ValueError, IndexError):
            attempt = 1
        return to_delivery(self.topic, msg.headers, msg.data, attempt, handle=msg)

    @staticmethod
    def _msg(delivery: Delivery) -> Msg:
        if not isinstance(delivery.handle, Msg):
            raise ConfigurationError(f"delivery {delivery.message_id!r} was not handed out by "
                                     "a NATS subscriber")
        return delivery.handle

    async def _flush(self) -> None:
        """Wait until the server has what was sent (NAK, TERM: nats-py does not)."""
        if self._nc is not None:
            await self._nc.flush(timeout=max(1, math.ceil(self.options.request_timeout)))

    async def ack(self, delivery: Delivery) -> None:
        msg = self._msg(delivery)
        # Acknowledging twice is no error: it is settled already.
        with (self.options.errors(f"acknowledging {delivery.message_id!r}"),
              suppress(nats.errors.MsgAlreadyAckdError)):
            await msg.ack_sync(timeout=self.options.request_timeout)

    async def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        """Deliver it again to the group after ``delay_seconds`` (a NAK with a delay;
        JetStream keeps no reason, so ``error`` is not sent)."""
        msg = self._msg(delivery)
        with self.options.errors(f"retrying {delivery.message_id!r}"):
            await msg.nak(delay=delay_seconds if delay_seconds > 0 else None)
            await self._flush()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy it, with the group and the reason, to the topic's dead-letter stream,
        then terminate the original for this group."""
        msg = self._msg(delivery)
        with self.options.errors(f"dead-lettering {delivery.message_id!r}"):
            link = self.links.current()
            js = await link.jetstream()
            await link.ensure_stream(self.dead_subject)
            headers = dead_headers(delivery, self.group, msg.metadata.sequence.stream, reason)
            await js.publish(self.dead_subject, bytes(delivery.payload), headers=headers)
            # Dead-lettered again (say, after a crash): one dead letter, the Nats-Msg-Id
            # of group and sequence de-duplicates it; the original is settled already.
            with suppress(nats.errors.MsgAlreadyAckdError):
                await msg.term()
            await self._flush()

    async def _drop(self) -> None:
        sub, self._sub, self._nc = self._sub, None, None
        if sub is not None:
            with suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    async def close(self) -> None:
        """Stop pulling; the group's consumer stays (it is the group's position)."""
        await self._drop()


class NatsPublisher:
    """:class:`AsyncNatsPublisher` for sync code, on the broker's private loop."""

    def __init__(self, runner: _Runner, inner: AsyncNatsPublisher) -> None:
        self.runner = runner
        self.inner = inner

    @property
    def duplicates(self) -> int:
        """See :attr:`AsyncNatsPublisher.duplicates`."""
        return self.inner.duplicates

    def publish(self, message: Message) -> None:
        self.publish_batch([message])

    def publish_batch(self, messages: Sequence[Message]) -> None:
        work = self.runner.options.request_timeout * (1 + len(messages) // PUBLISH_CHUNK)
        self.runner.call(self.inner.publish_batch(messages),
                         f"publishing {len(messages)} message(s)", work)

    def close(self) -> None:
        pass  # the broker owns the connections


class NatsSubscriber:
    """:class:`AsyncNatsSubscriber` for sync code, on the broker's private loop."""

    #: Delivery.attempt is the server's own count (outbox.typing.CountsDeliveries).
    counts_deliveries = True

    def __init__(self, runner: _Runner, inner: AsyncNatsSubscriber) -> None:
        self.runner = runner
        self.inner = inner
        self.topic = inner.topic
        self.group = inner.group

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        return self.runner.call(self.inner.fetch(max_messages, wait_seconds),
                                f"reading {self.inner.subject}", max(wait_seconds, 0.0))

    def ack(self, delivery: Delivery) -> None:
        self.runner.call(self.inner.ack(delivery), f"acknowledging {delivery.message_id!r}")

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        self.runner.call(self.inner.retry(delivery, delay_seconds, error),
                         f"retrying {delivery.message_id!r}")

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.runner.call(self.inner.dead_letter(delivery, reason),
                         f"dead-lettering {delivery.message_id!r}")

    def close(self) -> None:
        self.runner.call(self.inner.close(), "closing a subscriber")


class NatsBroker:
    """NATS JetStream at ``url`` (``nats://[user:password@]host:port``, ``tls://`` for
    TLS): a connection per event loop that uses it, the sync clients' on a private one.

    ``prefix`` starts the subjects (``outbox.<topic>``); ``duplicate_window`` is the
    seconds a new stream remembers message ids (see the module's docstring);
    ``request_timeout`` bounds each request to the server, ``connect_timeout`` the
    making of a connection, all attempts told. Other keywords go to
    ``nats.aio.client.Client.connect`` (``user_credentials``, ``tls``, ...).
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.options = Options(url, **options)
        self.links = _Links(self.options)
        self._runner = _Runner(self.options, self.links)

    def publisher(self) -> NatsPublisher:
        return NatsPublisher(self._runner, self.async_publisher())

    def subscriber(self, topic: str, group: str, **options: Any) -> NatsSubscriber:
        return NatsSubscriber(self._runner, self.async_subscriber(topic, group, **options))

    def async_publisher(self) -> AsyncNatsPublisher:
        return AsyncNatsPublisher(self.options, self.links)

    def async_subscriber(self, topic: str, group: str, **options: Any) -> AsyncNatsSubscriber:
        return AsyncNatsSubscriber(self.options, self.links, topic, group, **options)

    def dead_letters(self, topic: str, group: str | None = None, count: int = 1000
                     ) -> list[DeadLetter]:
        """The dead letters of ``topic`` (of ``group`` only, if given), oldest first;
        at most ``count`` are read."""
        return self._runner.call(self._dead_letters(topic, group, count),
                                 "reading the dead letters", self.options.request_timeout)

    async def _dead_letters(self, topic: str, group: str | None, count: int
                            ) -> list[DeadLetter]:
        subject = dead_letter_subject(self.options.subject(topic, ConfigurationError))
        stream = stream_name(subject)
        with self.options.errors("reading the dead letters"):
            js = await self.links.current().jetstream()
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                return []
            total = min(info.state.messages, count)
            if total <= 0:
                return []
            # A consumer of our own, gone once read (or, should we crash, when idle).
            name = f"outbox-dead-letters-{uuid.uuid4().hex[:12]}"
            await js.add_consumer(stream, api.ConsumerConfig(
                name=name, deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.NONE,
                filter_subject=subject, inactive_threshold=60.0))
            sub = await js.pull_subscribe_bind(name, stream=stream)
            got: list[Msg] = []
            try:
                while len(got) < total:
                    try:
                        msgs = await sub.fetch(min(total - len(got), MAX_FETCH),
                                               self.options.request_timeout)
                    except TimeoutError:
                        break
                    got.extend(msgs)
                    if not msgs or msgs[-1].metadata.num_pending == 0:
                        break
            finally:
                with suppress(nats.errors.Error, OSError):
                    await sub.unsubscribe()
                    await js.delete_consumer(stream, name)
        letters = [to_dead_letter(m.headers, m.data) for m in got]
        return [d for d in letters if group is None or d.group == group]

    def close(self) -> None:
        """Close the sync clients' connection and their private loop."""
        self._runner.close()

    async def aclose(self) -> None:
        """Close the running loop's connection, then the sync one."""
        await self.links.close_current()
        self.close()


def connect(url: str, **options: Any) -> NatsBroker:
    """The :class:`NatsBroker` for ``url`` (``outbox.brokers.open_broker`` calls it)."""
    return NatsBroker(url, **options)
