"""Transactional half messages: the seed's flow as an outbox delivery adapter, for the
sync :class:`outbox.Outbox` (``prepare``) and the asyncio :class:`outbox.AsyncOutbox`
(``aprepare``) alike."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime as dt
import functools
import threading
from collections.abc import Iterable
from typing import Any, cast

from outbox import instrument
from outbox.aio.app import AsyncOutbox
from outbox.app import BaseOutbox, LocalOutbox, Outbox
from outbox.envelope import delivery_time
from outbox.errors import BrokerUnavailableError, ConfigurationError, MessageError, OutboxError
from outbox.log import get_logger
from outbox.message import Message, TransactionState
from outbox.schema import outbox_messages, transaction_log, utcnow
from outbox.scope import Ticket
from outbox.storage import settle_guard
from outbox.transaction import message_created_at

from ._aio import DEFAULT_WORKERS, BlockingCalls, FollowUps
from ._client import wrap_error
from .config import RocketMQConfig
from .halfsend import GrpcHalfSender, HalfSender, half_sender
from .mapping import MESSAGE_ID_PROPERTY, Received, to_message
from .tickets import AsyncHalfMessageTicket, HalfMessageTicket
from .topics import accepted_types, allows_normal, type_name

log = get_logger("outbox.rocketmq")

#: The broker's default ``transactionCheckMax``: it discards a half message after
#: that many check-backs without an answer.
DEFAULT_CHECK_LIMIT = 15
#: The property carrying how many times the broker has checked a half message.
CHECK_TIMES_PROPERTY = "TRANSACTION_CHECK_TIMES"
#: How many message ids ``near_limit`` keeps.
NEAR_LIMIT_KEPT = 1000
#: The guard row's delay unless the producer is given another: past the time a
#: broker with default settings keeps checking a half message back
#: (``transactionTimeOut`` + ``transactionCheckMax`` x ``transactionCheckInterval``,
#: about 15 minutes), so the relay sends a guard row only for a message the broker
#: no longer has.
DEFAULT_GUARD_AFTER = dt.timedelta(minutes=20)


class _Default:
    """``guard_after`` not given: the guard row is on, with :data:`DEFAULT_GUARD_AFTER`."""

    def __repr__(self) -> str:
        return "DEFAULT_GUARD_AFTER"


_GUARD_DEFAULT = _Default()


class RocketMQTransactionalProducer:
    """Delivery adapter: half message, local transaction, then commit or rollback.

    1. The message (built before the transaction) is sent as a half message.
    2. The local transaction runs the user's function and writes the transaction-log
       row keyed by the message id, and commits.
    3. The half message is committed (or rolled back if the function raised).

    If the process dies between 2 and 3, or the end-transaction call is lost, the
    broker asks any producer of the topic; the checker answers from the log of the
    database that registered the topic. ``topics`` lists every topic this producer
    sends to: the proxy learns a producer's topics only when it starts.

    With ``fallback_to_outbox``, a half send that fails because the broker cannot be
    reached writes the message as a local outbox row instead (the business call
    succeeds); a relay with :class:`RocketMQPublisher` delivers it later. That topic
    must then be of type MIXED, since the relay's send is a normal one.

    The guard row (on unless ``guard_after=None``): the local transaction also
    writes the message as an outbox row due ``guard_after`` later (by default
    :data:`DEFAULT_GUARD_AFTER`), settled as soon as the broker takes the commit. If
    the producer dies before that, and the broker then gives up on the half message
    (it sends check-backs to dead clients too, and discards a message after
    ``transactionCheckMax`` unanswered checks), a relay publishes the guard row: at
    worst the consumer sees the message twice and its inbox drops the second copy.
    This costs one more INSERT in the transaction and one UPDATE after it, and
    needs a topic that takes normal sends too (MIXED on 5.x; any topic on 4.x) and
    a relay, as the fallback does: :meth:`start` refuses a 5.x topic that takes
    no normal sends (a TRANSACTION topic), unless the guard is turned off explicitly.

    The same object serves an :class:`outbox.AsyncOutbox`: the client's blocking
    calls then run on a pool of ``workers`` threads owned by the producer, the
    end-transaction after the local outcome is a task of the event loop (``await
    producer.aclose()`` waits for those), and check-backs for its topics are
    answered through that loop (``await producer.astart()`` after a restart).
    """

    def __init__(
        self,
        config: RocketMQConfig,
        topics: Iterable[str],
        *,
        fallback_to_outbox: bool = False,
        guard_after: dt.timedelta | _Default | None = _GUARD_DEFAULT,
        workers: int = DEFAULT_WORKERS,
        check_limit: int = DEFAULT_CHECK_LIMIT,
    ) -> None:
        if check_limit < 1:
            raise ConfigurationError(
                "check_limit must be the broker's transactionCheckMax (15 by default)")
        self.check_limit = check_limit
        #: Half messages whose check-backs passed two thirds of ``check_limit``, by
        #: message id: the broker discards one at the limit (the last few, newest last).
        self.near_limit: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.config = config
        self.topics = tuple(dict.fromkeys(topics))
        if not self.topics:
            raise ConfigurationError("name at least one topic the producer sends to")
        if isinstance(guard_after, _Default):
            guard_after = DEFAULT_GUARD_AFTER
        elif guard_after is not None and (not isinstance(guard_after, dt.timedelta)
                                          or guard_after <= dt.timedelta(0)):
            raise ConfigurationError(
                f"guard_after must be a positive timedelta (or None to go without the guard "
                f"row), got {guard_after!r}")
        self.fallback_to_outbox = fallback_to_outbox
        self.guard_after = guard_after
        self._outboxes: dict[str, BaseOutbox] = {}
        self._loops: dict[BaseOutbox, asyncio.AbstractEventLoop] = {}
        self._loops_lock = threading.Lock()  # not _lock: a startup holds that for seconds
        #: The tables a send writes (named when one is missing).
        self.tables = (transaction_log,) if guard_after is None and not fallback_to_outbox \
            else (transaction_log, outbox_messages)
        self._producer: HalfSender | None = None
        self._lock = threading.Lock()
        self._calls = BlockingCalls("outbox-rocketmq-producer", workers)
        self._follow_ups = FollowUps()

    # -- topics and check-back ----------------------------------------------------

    def register(self, topic: str, outbox: BaseOutbox) -> None:
        """Route check-backs for ``topic`` to ``outbox``'s transaction log. Called
        by ``@transactional_message`` when it decorates a function."""
        if topic not in self.topics:
            raise ConfigurationError(
                f"topic {topic!r} is not among this RocketMQ producer's topics "
                f"{list(self.topics)}; add it to RocketMQTransactionalProducer(topics=...)"
            )
        known = self._outboxes.setdefault(topic, outbox)
        if known is not outbox:
            raise ConfigurationError(
                f"topic {topic!r} is already produced from another database; one topic's "
                "check-backs must be answered from one transaction log"
            )

    def _remember_loop(self, outbox: BaseOutbox, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that answers ``outbox``'s check-backs: the first one it used us in,
        until that loop stops."""
        with self._loops_lock:
            known = self._loops.get(outbox)
            if known is None or known.is_closed() or not known.is_running():
                self._loops[outbox] = loop

    def check(self, message: Message) -> TransactionState:
        """Answer a check-back for ``message`` from the right transaction log (called on
        the client's checker thread; an AsyncOutbox's log is read in its event loop)."""
        outbox = self._outboxes.get(message.topic)
        if outbox is None:
            log.error("check_back_unknown_topic", **message.log_fields())
            return TransactionState.UNKNOWN
        if isinstance(outbox, AsyncOutbox):
            return self._check_in_loop(outbox, message)
        return cast(Outbox, outbox).listener.check(message)

    def _check_in_loop(self, outbox: AsyncOutbox, message: Message) -> TransactionState:
        loop = self._loops.get(outbox)
        if loop is None or loop.is_closed() or not loop.is_running():
            log.warning("check_back_no_event_loop", **message.log_fields())
            return TransactionState.UNKNOWN  # ask again: a running loop may answer
        coro = outbox.listener.acheck(message)
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # closed meanwhile
            coro.close()
            log.warning("check_back_no_event_loop", **message.log_fields())
            return TransactionState.UNKNOWN
        try:
            return future.result(timeout=self.config.request_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.warning("check_back_timed_out", seconds=self.config.request_timeout,
                        **message.log_fields())
            return TransactionState.UNKNOWN

    def _answer(self, received: Received, tag: str | None) -> TransactionState:
        """A check-back's answer, for either client: UNKNOWN means "ask again"."""
        checks = self._count_check(received)
        if not instrument.observers:
            return self._resolve(received, tag)
        message_id = received.properties.get(MESSAGE_ID_PROPERTY)
        with instrument.span("outbox.check_back", topic=received.topic, message_id=message_id,
                             links=[received.properties]):
            state = self._resolve(received, tag)
        instrument.emit(instrument.CHECK_BACK, topic=received.topic, message_id=message_id,
                        answer=state.name, checks=checks, headers=received.properties)
        return state

    def _resolve(self, received: Received, tag: str | None) -> TransactionState:
        try:
            message = to_message(received, tag)
        except MessageError as exc:
            # Not one of ours (no outbox id): another producer of the topic's group
            # (a Java service, say) wrote it, and only it can tell. The broker asks
            # again, and sooner or later asks that producer: never roll back a
            # transaction we know nothing about.
            log.warning("check_back_foreign_message", topic=received.topic, error=str(exc),
                        rocketmq_id=received.rocketmq_id,
                        answer="unknown: left to its producer")
            return TransactionState.UNKNOWN
        try:
            return self.check(message)
        except Exception as exc:  # the database may be down: ask again later
            log.error("check_back_failed", error=f"{type(exc).__name__}: {exc}",
                      **message.log_fields())
            return TransactionState.UNKNOWN

    def _count_check(self, received: Received) -> int | None:
        """The broker's count of checks of this half message (it sends the count it is
        at with each check); warns when it is so high that the broker will soon discard
        the message."""
        try:
            checks = int(received.properties.get(CHECK_TIMES_PROPERTY, "0"))
        except ValueError:
            return None
        if checks * 3 < self.check_limit * 2:
            return checks
        message_id = received.properties.get(MESSAGE_ID_PROPERTY) or received.rocketmq_id or "?"
        log.warning("check_back_near_limit", message_id=message_id, topic=received.topic,
                    checks=checks, limit=self.check_limit,
                    hint="the broker discards the half message at the limit; the guard row "
                         "(guard_after) or outbox recovery delivers it then")
        with self._loops_lock:
            self.near_limit[message_id] = checks
            self.near_limit.move_to_end(message_id)
            while len(self.near_limit) > NEAR_LIMIT_KEPT:
                self.near_limit.popitem(last=False)
        return checks

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> RocketMQTransactionalProducer:
        """Connect now, so that check-backs reach this process before its first send."""
        self._started()
        return self

    async def astart(self) -> RocketMQTransactionalProducer:
        """:meth:`start` from an event loop, which then answers the check-backs of every
        registered AsyncOutbox (call it at startup of a service that may have left
        half messages behind)."""
        loop = asyncio.get_running_loop()
        for outbox in set(self._outboxes.values()):
            if isinstance(outbox, AsyncOutbox):
                self._remember_loop(outbox, loop)
        await self._calls.run(self._started)
        return self

    def _started(self) -> HalfSender:
        with self._lock:
            if self._producer is not None:
                return self._producer
            producer = half_sender(self.config, self.topics, self._answer)
            try:
                self._check_topic_types(producer)
            except ConfigurationError:
                producer.shutdown()
                raise
            self._producer = producer
            log.info("rocketmq_producer_started", at=self.config.where,
                     topics=list(self.topics))
            return producer

    def _check_topic_types(self, producer: HalfSender) -> None:
        """Refuse a topic that takes transactional messages only, when the guard row or
        the fallback will send normal messages to it (5.x topics have a type; on 4.x
        every topic takes every message)."""
        if self.guard_after is None and not self.fallback_to_outbox:
            return
        for topic in self.topics:
            kind = self._refuses_normal(producer, topic)
            if kind is not None:
                uses = "the guard row" if self.guard_after is not None else "the fallback"
                raise ConfigurationError(
                    f"RocketMQ topic {topic!r} ({kind}) takes no normal sends, but {uses} "
                    "sends a message the broker lost as a normal one through the relay: make "
                    f"the topic MIXED (mqadmin updateTopic -t {topic} -a +message.type=MIXED, "
                    "with enableMixedMessageType=true on the broker), or pass "
                    "guard_after=None to go without the guard row (a half message the broker "
                    "drops after transactionCheckMax checks is then lost; outbox "
                    "rocketmq-recover reports it)")

    def _refuses_normal(self, producer: HalfSender, topic: str) -> str | None:
        """The type of ``topic`` if it refuses normal sends (a 5.x TRANSACTION topic,
        say), else None."""
        if not isinstance(producer, GrpcHalfSender):
            return None
        try:
            types = accepted_types(producer.producer, topic)
        except OutboxError:
            raise
        except Exception as exc:
            raise wrap_error(exc, self.config, f"reading the type of topic {topic}") from None
        return None if allows_normal(types) else type_name(types)

    def _shutdown_client(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.shutdown()

    def close(self) -> None:
        """Let queued end-transaction calls finish, then disconnect."""
        self._calls.shutdown(wait=True)
        self._shutdown_client()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until the end-transaction calls (and guard settles) scheduled in this
        event loop have finished; False if ``timeout`` passed first."""
        return await self._follow_ups.wait(timeout)

    async def aclose(self, timeout: float | None = 30.0) -> None:
        """:meth:`flush`, then disconnect without blocking the event loop. A follow-up
        still running after ``timeout`` is left to the broker's check-back."""
        if not await self.flush(timeout):
            log.warning("rocketmq_follow_ups_left_to_check_back",
                        pending=self._follow_ups.pending)
        await self._calls.run(self._shutdown_client)
        self._calls.shutdown(wait=False)

    # -- the send path ---------------------------------------------------------------

    def prepare(self, outbox: Outbox, message: Message) -> Ticket:
        """Send ``message`` as a half message; the ticket writes its transaction-log row
        in the local transaction and commits or rolls back the half message after it.
        A message with a delivery time still ahead goes through the local outbox."""
        self.register(message.topic, outbox)
        when = delivery_time(message.headers)
        if when is not None and when > utcnow():
            self._delay_via_outbox(message, when)
            return LocalOutbox().prepare(outbox, message)
        try:
            transaction = self._send_half(message)
        except OutboxError as error:
            if self._falls_back(error, message):
                return LocalOutbox().prepare(outbox, message)
            raise
        return HalfMessageTicket(self, outbox, message, transaction, self._guard_until())

    async def aprepare(self, outbox: AsyncOutbox, message: Message) -> Ticket:
        """:meth:`prepare` for an AsyncOutbox: the half send runs on the producer's pool.
        A caller cancelled while it is in flight gets the half message rolled back."""
        self.register(message.topic, outbox)
        loop = asyncio.get_running_loop()
        self._remember_loop(outbox, loop)
        when = delivery_time(message.headers)
        if when is not None and when > utcnow():  # rare: the check may block
            await self._calls.run(self._delay_via_outbox, message, when)
            return await LocalOutbox().aprepare(outbox, message)
        sending = self._calls.submit(self._send_half, message)
        try:
            transaction = await asyncio.shield(asyncio.wrap_future(sending))
        except asyncio.CancelledError:
            sending.add_done_callback(functools.partial(self._abandon, message))
            raise
        except OutboxError as error:
            if self._falls_back(error, message):
                return await LocalOutbox().aprepare(outbox, message)
            raise
        return AsyncHalfMessageTicket(self, outbox, message, transaction, self._guard_until(),
                                      loop)

    def _delay_via_outbox(self, message: Message, when: dt.datetime) -> None:
        """``message`` asks to be delivered at ``when``: RocketMQ cannot delay a
        transactional message, so it becomes an outbox row due then (written in the
        same local transaction), and a relay sends it on time as a normal message.
        Refused before anything is written when the topic takes no normal sends."""
        kind = self._refuses_normal(self._started(), message.topic)
        if kind is not None:
            raise ConfigurationError(
                f"message {message.id} asks to be delivered at {when:%Y-%m-%d %H:%M:%S} UTC, "
                "and RocketMQ cannot delay a transactional message: it goes through the "
                f"outbox and a relay's normal send, which topic {message.topic!r} ({kind}) "
                "refuses; make the topic MIXED, or send it without a delay")
        log.info("rocketmq_delayed_via_outbox", deliver_at=when.isoformat() + "Z",
                 **message.log_fields())

    def _send_half(self, message: Message) -> Any:
        """Send the half message (blocking); returns the client's handle of it."""
        handle = self._started().send_half(message)
        log.debug("rocketmq_half_message_sent", **message.log_fields())
        return handle

    def _falls_back(self, error: OutboxError, message: Message) -> bool:
        """Whether a failed half send becomes a local outbox row instead."""
        if isinstance(error, BrokerUnavailableError) and self.fallback_to_outbox:
            log.warning("rocketmq_unreachable_using_outbox", error=str(error),
                        **message.log_fields())
            return True
        return False

    def _guard_until(self) -> dt.datetime | None:
        return utcnow() + self.guard_after if self.guard_after is not None else None

    def _abandon(self, message: Message, sending: concurrent.futures.Future[Any]) -> None:
        # The caller was cancelled while the half message was on its way: nothing
        # local will ever commit it, so roll it back once it is out.
        if sending.cancelled() or sending.exception() is not None:
            return
        try:
            self._calls.submit(self._end, sending.result(), TransactionState.ROLLBACK, message)
        except RuntimeError:  # shutting down: the check-back answers ROLLBACK
            log.warning("rocketmq_transaction_left_to_check_back", **message.log_fields())

    # -- after the local outcome -----------------------------------------------------

    def _end(self, transaction: Any, state: TransactionState, message: Message) -> bool:
        """Commit or roll back the half message; True when the broker took a commit."""
        fields = message.log_fields()
        try:
            self._started().end(transaction, state is TransactionState.COMMIT)
        except Exception as exc:
            # The local outcome is durable; the broker's check-back will match it.
            log.warning("rocketmq_end_transaction_failed", state=state.value,
                        error=f"{type(exc).__name__}: {exc}", **fields)
            return False
        log.info("rocketmq_transaction_ended", state=state.value, **fields)
        return state is TransactionState.COMMIT

    def _follow_up(self, ticket: HalfMessageTicket, state: TransactionState) -> None:
        """After the local outcome, in the sync model: end the half message, then settle
        the guard row once the broker has the commit."""
        if self._end(ticket.transaction, state, ticket.message) and ticket.guarded \
                and self._ended_in_time(ticket):
            self._settle_guard(ticket.outbox, ticket.message)

    def _schedule(self, ticket: AsyncHalfMessageTicket, state: TransactionState) -> None:
        """:meth:`_follow_up` for the asyncio model: a task, so nothing blocks the loop."""
        self._follow_ups.schedule(ticket.loop, self._afollow_up(ticket, state),
                                  f"{state.value} of {ticket.message.id}")

    async def _afollow_up(self, ticket: AsyncHalfMessageTicket, state: TransactionState
                          ) -> None:
        try:
            took = await self._calls.run_to_end(self._end, ticket.transaction, state,
                                                ticket.message)
            if took and ticket.guarded and self._ended_in_time(ticket):
                await self._asettle_guard(ticket.outbox, ticket.message)
        except Exception as exc:  # the pool is gone: the check-back settles it
            log.warning("rocketmq_follow_up_failed", error=f"{type(exc).__name__}: {exc}",
                        **ticket.message.log_fields())

    @staticmethod
    def _ended_in_time(ticket: HalfMessageTicket | AsyncHalfMessageTicket) -> bool:
        """Whether the broker took the commit within the local-transaction timeout of
        the message, so well inside the time it keeps asking about a half message.
        A commit that took longer may have come after the broker gave up on the half
        message (and a broker may acknowledge it all the same): the guard row then
        stays, and the relay delivers it (the consumer's inbox drops a copy)."""
        created = message_created_at(ticket.message)
        timeout = ticket.outbox.listener.timeout
        in_time = created is not None and utcnow() - created < timeout
        if not in_time:
            log.warning("rocketmq_guard_kept_after_late_commit", **ticket.message.log_fields())
        return in_time

    def _settle_guard(self, outbox: Outbox, message: Message) -> None:
        # The broker has the commit: the guard row need not go. If this fails, the
        # relay sends it later and the consumer's inbox drops the second copy.
        try:
            with outbox.engine.begin() as conn:
                settle_guard(conn, message.id, utcnow())
        except Exception as exc:
            _guard_not_settled(exc, message)

    async def _asettle_guard(self, outbox: AsyncOutbox, message: Message) -> None:
        try:
            async with outbox.engine.begin() as conn:
                await conn.run_sync(settle_guard, message.id, utcnow())
        except Exception as exc:
            _guard_not_settled(exc, message)


def _guard_not_settled(exc: Exception, message: Message) -> None:
    log.warning("rocketmq_guard_not_settled", error=f"{type(exc).__name__}: {exc}",
                **message.log_fields())
