"""Normal sends, for a relay that publishes outbox rows to RocketMQ (``Relay`` with
:class:`RocketMQPublisher`, ``AsyncRelay`` with :class:`AsyncRocketMQPublisher`).

Both publish a relay's batch with concurrent ``send_async`` calls and return only
once the broker acknowledged every message of it. Messages of one key go one after
the other, in the batch's order, each once the one before it is acknowledged (the
broker keeps them in that order); different keys, and messages without a key, go
concurrently. On 4.x (a config with a name server) a batch goes instead as
SEND_BATCH_MESSAGE requests: one per queue (a key's messages in its hash's queue, in
the batch's order), cut to the broker's 4 MiB limit, the queues concurrently; a
message due later goes alone with its delay level. A batch with any failure raises,
and the relay publishes its rows again one by one: the ones that did go out may
then reach the broker twice, which the consumer's inbox drops (at-least-once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from outbox.errors import ConfigurationError, OutboxError, PublishError
from outbox.message import Message

from ._aio import BlockingCalls
from ._client import client_configuration, for_topic, rocketmq, shutdown_quietly, wrap_error
from .config import RocketMQConfig
from .halfsend import BatchPart, RemotingPlainSender
from .mapping import properties_of
from .remoting.protocol import encode_properties

#: Attempts the client makes for one send before its future fails (its default).
CLIENT_SEND_ATTEMPTS = 3


def default_batch_timeout(config: RocketMQConfig) -> float:
    """How long one batch may wait for its receipts: every attempt the client makes
    for a send timing out, and a little more. The client's own timeouts end a send
    before that; this bound is for a client that never answers at all."""
    return CLIENT_SEND_ATTEMPTS * max(1, math.ceil(config.request_timeout)) + 2.0


Outgoing = tuple[Message, Any]


def waves(outgoing: Sequence[Outgoing]) -> list[list[Outgoing]]:
    """The batch as rounds of concurrent sends: round ``i`` holds the ``i``-th message
    of every key, in the batch's order, so a key's message goes only after the one
    before it was acknowledged; messages without a key all go in the first round."""
    rounds: list[list[Outgoing]] = [[]]
    seen: dict[str, int] = {}
    for item in outgoing:
        key = item[0].key
        if key is None:
            rounds[0].append(item)
            continue
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(item)
    return rounds


def chains(outgoing: Sequence[Outgoing]) -> list[list[Outgoing]]:
    """The batch as chains sent concurrently: one per key (its messages in the
    batch's order, each sent once the one before it is acknowledged) and one per
    message without a key."""
    by_key: dict[str, list[Outgoing]] = {}
    result: list[list[Outgoing]] = []
    for item in outgoing:
        key = item[0].key
        if key is None:
            result.append([item])
        elif key in by_key:
            by_key[key].append(item)
        else:
            by_key[key] = chain = [item]
            result.append(chain)
    return result


class BatchOutcome:
    """What became of one batch's sends: acknowledged, failed (the first failure
    kept), and not sent because a failure came first."""

    __slots__ = ("acked", "failed", "first", "first_message", "total")

    def __init__(self, total: int) -> None:
        self.total = total
        self.acked = 0
        self.failed = 0
        self.first: BaseException | None = None
        self.first_message: Message | None = None

    def fail(self, message: Message, exc: BaseException) -> None:
        self.failed += 1
        if self.first is None:
            self.first, self.first_message = exc, message

    @property
    def ok(self) -> bool:
        return self.first is None and self.acked == self.total

    def error(self, config: RocketMQConfig) -> OutboxError:
        """The batch's error: how many of how many failed, and the first failure."""
        unsent = self.total - self.acked - self.failed
        what = f"publishing a batch: {self.failed} of {self.total} messages failed"
        if unsent:
            what += f" ({unsent} more not sent after that)"
        first = self.first
        if first is None:  # cannot happen: a short batch always records why
            first = RuntimeError("some messages got no receipt")
        if self.first_message is not None:
            what += f"; the first, message {self.first_message.id}"
        if isinstance(first, OutboxError):
            return type(first)(f"{what}: {first}")
        return wrap_error(first, config, what)


class RocketMQPublisher:
    """Publisher of normal messages, for :class:`outbox.Relay`; through the 5.x proxy,
    or straight to 4.x brokers when the config names a name server.

    A topic that also receives transactional half messages (the fallback path)
    must be of type MIXED: the proxy refuses a normal send to a TRANSACTION topic.

    :meth:`publish_batch` (which the relay uses for a whole claimed batch) waits at
    most ``batch_timeout`` seconds for the receipts; by default long enough for every
    attempt of the client's to time out (:func:`default_batch_timeout`).
    """

    def __init__(self, config: RocketMQConfig, topics: Iterable[str], *,
                 batch_timeout: float | None = None) -> None:
        self.config = config
        self.topics = tuple(dict.fromkeys(topics))
        if not self.topics:
            raise ConfigurationError("name at least one topic the publisher sends to")
        if batch_timeout is not None and batch_timeout <= 0:
            raise ConfigurationError("batch_timeout must be positive")
        self.batch_timeout = (default_batch_timeout(config) if batch_timeout is None
                              else batch_timeout)
        self._producer: Any = None
        self._lock = threading.Lock()

    def _started(self) -> Any:
        with self._lock:
            if self._producer is None and self.config.namesrv is not None:
                self._producer = RemotingPlainSender(self.config, self.topics)
            if self._producer is None:
                producer = rocketmq().Producer(client_configuration(self.config), self.topics)
                try:
                    producer.startup()
                except Exception as exc:
                    raise wrap_error(exc, self.config, "starting the RocketMQ publisher") from None
                self._producer = producer
            return self._producer

    @staticmethod
    def _check(messages: Sequence[Message]) -> None:
        """Refuse a batch holding something that is not a sendable message (a row
        decoded wrongly, say) before any of it is sent."""
        for message in messages:
            try:
                if not isinstance(message.payload, bytes | bytearray):
                    raise TypeError(f"its payload is {type(message.payload).__name__}, "
                                    "not bytes")
                encode_properties(properties_of(message))
            except (AttributeError, TypeError, ValueError, UnicodeError) as exc:
                raise PublishError(f"message {getattr(message, 'id', None)!r} cannot be sent "
                                   f"to RocketMQ: {exc}; nothing of the batch was sent"
                                   ) from None

    def _outgoing(self, message: Message) -> Any:
        """The client's message for ``message``; refuses a topic not named at start.

        On the 5.x proxy the topic's type (the started client's route) decides what it
        carries (:func:`._client.for_topic`): on a FIFO topic its key as message group
        (the broker keeps a key's messages in order; a message without key is a group
        of its own); a delivery time still ahead as delivery timestamp on a topic that
        takes delayed messages, a ConfigurationError on one that does not."""
        if message.topic not in self.topics:
            raise ConfigurationError(
                f"topic {message.topic!r} is not among this publisher's topics {list(self.topics)}"
            )
        if self.config.namesrv is not None:
            return message  # the remoting sender maps it itself
        return for_topic(message, self._started(), self.config)

    def _failed(self, exc: Exception, message: Message) -> OutboxError:
        if isinstance(exc, OutboxError):
            return exc
        return wrap_error(exc, self.config, f"publishing message {message.id}")

    def publish(self, message: Message) -> None:
        """Send ``message``; raises PublishError (BrokerUnavailableError) when it cannot."""
        outgoing = self._outgoing(message)
        try:
            self._started().send(outgoing)
        except Exception as exc:
            raise self._failed(exc, message) from None

    def publish_batch(self, messages: Sequence[Message]) -> None:
        """Send every message concurrently (a key's messages one after the other, in
        order) and return once the broker acknowledged each. Raises PublishError
        (BrokerUnavailableError) naming how many failed if any did, or if receipts
        are still missing after ``batch_timeout``; after a failure no further
        message of the batch is sent. On 4.x: batch requests, see the module."""
        if not messages:
            return
        self._check(messages)
        outgoing = [(m, self._outgoing(m)) for m in messages]
        try:
            producer = self._started()
        except Exception as exc:
            raise self._failed(exc, messages[0]) from None
        if isinstance(producer, RemotingPlainSender):
            return self._publish_remoting_batch(producer, messages)
        outcome = BatchOutcome(len(outgoing))
        deadline = time.monotonic() + self.batch_timeout
        for wave in waves(outgoing):
            if not wave:
                continue
            pending: dict[concurrent.futures.Future[Any], Message] = {}
            for message, out in wave:
                try:
                    pending[producer.send_async(out)] = message
                except Exception as exc:  # refused before it left (no route, not running)
                    outcome.fail(message, exc)
            done, late = concurrent.futures.wait(
                pending, timeout=max(0.0, deadline - time.monotonic()))
            for future in done:
                error = future.exception()
                if error is None:
                    outcome.acked += 1
                else:
                    outcome.fail(pending[future], error)
            for future in late:
                outcome.fail(pending[future], TimeoutError(
                    f"no receipt within {self.batch_timeout:g} s"))
            if outcome.first is not None:
                break  # the rest goes one by one; a key's later message must not lead
        if not outcome.ok:
            raise outcome.error(self.config) from None

    def _publish_remoting_batch(self, producer: RemotingPlainSender,
                                messages: Sequence[Message]) -> None:
        """On 4.x: SEND_BATCH_MESSAGE requests, one queue's share after the other
        (see :meth:`RemotingPlainSender.send_batch`), all awaited."""
        try:
            parts = producer.send_batch(messages)
        except Exception as exc:  # refused before anything left (no route)
            raise self._failed(exc, messages[0]) from None
        concurrent.futures.wait([p.future for p in parts], timeout=self.batch_timeout)
        outcome = remoting_outcome(parts, len(messages), self.batch_timeout)
        if not outcome.ok:
            raise outcome.error(self.config) from None

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        shutdown_quietly(producer)


def remoting_outcome(parts: Sequence[BatchPart], total: int, timeout: float) -> BatchOutcome:
    """What became of a 4.x batch's parts: a part not done by now timed out in the
    chunk it was sending; a failed part's whole chunk failed (a batch request is
    stored whole or not at all); the rest of a part that stopped was not sent."""
    outcome = BatchOutcome(total)
    for part in parts:
        part.stop.set()  # late parts send nothing more: the rest goes one by one
        outcome.acked += part.sent
        if part.sent >= len(part.messages):
            continue
        if part.error is not None:
            error: BaseException = part.error
        elif not part.future.done():
            error = TimeoutError(f"no receipt within {timeout:g} s")
        else:
            continue  # stopped after another part failed, or the publisher closed
        for message in part.current or part.messages[part.sent:part.sent + 1]:
            outcome.fail(message, error)
    return outcome


class AsyncRocketMQPublisher:
    """:class:`RocketMQPublisher` for :class:`outbox.AsyncRelay`: each send is the
    client's ``send_async`` future, awaited; startup and shutdown (blocking in the
    client) run on a small pool of ``workers`` threads. :meth:`publish_batch` sends
    one chain per key concurrently, as the sync form does."""

    def __init__(self, config: RocketMQConfig, topics: Iterable[str], *,
                 workers: int = 2, batch_timeout: float | None = None) -> None:
        self._sync = RocketMQPublisher(config, topics, batch_timeout=batch_timeout)
        self._calls = BlockingCalls("outbox-rocketmq-publisher", workers)

    @property
    def batch_timeout(self) -> float:
        return self._sync.batch_timeout

    @property
    def config(self) -> RocketMQConfig:
        return self._sync.config

    @property
    def topics(self) -> tuple[str, ...]:
        return self._sync.topics

    async def publish(self, message: Message) -> None:
        """Send ``message`` without blocking the event loop."""
        sync = self._sync
        outgoing = await self._calls.run(sync._outgoing, message)  # may start the client
        try:
            producer = await self._calls.run(sync._started)
            await asyncio.wrap_future(producer.send_async(outgoing))
        except Exception as exc:
            # Telling a missing topic from a proxy that is down probes a TCP connection.
            raise await self._calls.run(sync._failed, exc, message) from None

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        """:meth:`RocketMQPublisher.publish_batch` in the event loop: each key's chain
        of sends is a task, all awaited (at most ``batch_timeout`` seconds); after a
        failure no chain sends anything more."""
        if not messages:
            return
        sync = self._sync
        sync._check(messages)
        outgoing = await self._calls.run(  # may start the client, read a route
            lambda: [(m, sync._outgoing(m)) for m in messages])
        try:
            producer = await self._calls.run(sync._started)
        except Exception as exc:
            raise await self._calls.run(sync._failed, exc, messages[0]) from None
        if isinstance(producer, RemotingPlainSender):
            try:
                parts = await self._calls.run(producer.send_batch, messages)
            except Exception as exc:
                raise await self._calls.run(sync._failed, exc, messages[0]) from None
            try:
                await asyncio.wait([asyncio.wrap_future(p.future) for p in parts],
                                   timeout=self.batch_timeout)
            finally:
                for part in parts:
                    part.stop.set()  # a timeout, or our caller cancelled: send nothing more
            remoting = remoting_outcome(parts, len(messages), self.batch_timeout)
            if not remoting.ok:
                raise await self._calls.run(remoting.error, sync.config) from None
            return
        outcome = BatchOutcome(len(outgoing))
        in_flight: dict[asyncio.Task[None], Message] = {}

        async def send_chain(chain: list[Outgoing]) -> None:
            task = asyncio.current_task()
            assert task is not None
            for message, out in chain:
                if outcome.first is not None:
                    return  # a failure: the rest goes one by one
                in_flight[task] = message
                try:
                    await asyncio.wrap_future(producer.send_async(out))
                except Exception as exc:
                    outcome.fail(message, exc)
                    return
                finally:
                    del in_flight[task]
                outcome.acked += 1

        tasks = [asyncio.ensure_future(send_chain(c)) for c in chains(outgoing)]
        try:
            _, late = await asyncio.wait(tasks, timeout=self.batch_timeout)
        finally:
            for task in tasks:
                task.cancel()  # a timeout, or our caller cancelled: send nothing more
        for task in late:
            message = in_flight.get(task)
            if message is not None:
                outcome.fail(message, TimeoutError(
                    f"no receipt within {self.batch_timeout:g} s"))
        if late:
            await asyncio.wait(late)  # let the cancelled chains end
        if not outcome.ok:
            # Telling a missing topic from a proxy that is down probes a TCP connection.
            raise await self._calls.run(outcome.error, sync.config) from None

    async def close(self) -> None:
        await self._calls.run(self._sync.close)
        self._calls.shutdown(wait=False)
