"""Apache Kafka as a broker: publisher and subscriber on ``confluent-kafka`` (whose
wheel bundles librdkafka), in sync and asyncio forms, on the record format of
:mod:`outbox_kafka.mapping`.

What Kafka gives natively, and what the framework adds:

- **Order per key.** A record's key picks its partition, and a partition is read in
  order by one member of a group, so one key's messages arrive in publish order.
  Messages without a key are spread over the partitions, in no order.
- **Receipts before "sent".** The producer is idempotent (``enable.idempotence``,
  ``acks=all``): retries inside librdkafka never duplicate or reorder a partition's
  records. ``publish_batch`` hands every record to the producer first, then waits for
  every receipt; only then does the relay mark the rows sent. A batch that fails
  part-way raises, its rows stay pending and are sent again, and the consumer's inbox
  drops the copies.
- **Offsets after the inbox.** A consumer group commits a partition's offset only up
  to the last record whose ``ack`` came, with every record before it acknowledged as
  well (the idempotent consumer acknowledges after its inbox transaction commits).
  Commits are asynchronous; on a rebalance and on ``close`` they are made
  synchronously. A record whose commit was lost comes again and the inbox drops it.
- **No delivery count, no per-message delay.** Kafka has neither, so the subscriber
  declares no ``counts_deliveries`` and no ``retry``: the idempotent consumer counts
  failed attempts in its own database and holds a failed record, trying it again in
  place after its backoff (the partition waits, which keeps the key's order). After
  the last attempt the record goes to the dead-letter topic ``<topic>.dead`` with the
  group and the error in its headers (``dead_letter``), its offset is acknowledged,
  and the partition moves on: a poisoned record never stalls it for good.
- **Holding and the poll interval.** A member that does not fetch for longer than
  ``max.poll.interval.ms`` (5 minutes by default) is put out of its group and its
  partitions go to another member, which reads the held record again. Keep the
  consumer's total backoff below it (or raise it through ``config``).
- **A late group sees earlier messages**: a new group starts at the earliest record
  Kafka still keeps (``auto.offset.reset=earliest``); keep retention above any
  group's lag.

Topics are created (``partitions``, ``replication_factor``) by the first publisher
or subscriber that needs them, when they do not exist; a broker that refuses to
create them (no rights) needs them made beforehand.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from outbox.brokers import masked
from outbox.errors import BrokerUnavailableError, ConfigurationError, PublishError
from outbox.log import get_logger
from outbox.message import Message
from outbox.transport import Delivery

from .mapping import (
    dead_headers,
    dead_letter_topic,
    delivery_record,
    to_delivery,
    to_record,
    topic_name,
)

log = get_logger("outbox_kafka")

#: A fetch reads at most this many records whatever it is asked for.
MAX_FETCH = 1000
#: librdkafka settings the adapter owns; ``config`` may not override them.
_OWNED_CONSUMER = frozenset({"enable.auto.commit", "enable.auto.offset.store", "group.id"})


@dataclass(frozen=True)
class Handle:
    """Where a delivered record sits: what ``ack`` commits past."""

    topic: str
    partition: int
    offset: int


def parse_url(url: str) -> dict[str, str]:
    """librdkafka settings from ``kafka://[user:password@]host:port[,host:port]...[?k=v]``.

    A user and password become SASL settings (``PLAIN`` over ``SASL_PLAINTEXT`` unless
    the query says otherwise); query keys are librdkafka's, with ``_`` for ``.``
    (``?security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-512``).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "kafka":
        raise ConfigurationError(f"a Kafka URL starts kafka://, not {masked(url)!r}")
    netloc, _, query = rest.partition("?")
    netloc = netloc.split("/", 1)[0]
    auth, at, hosts = netloc.rpartition("@")
    if not hosts:
        raise ConfigurationError(f"Kafka URL {masked(url)!r} names no host; write it like "
                                 "kafka://127.0.0.1:9092")
    config = {"bootstrap.servers": hosts}
    if at:
        user, _, password = auth.partition(":")
        config.update({"sasl.username": unquote(user), "sasl.password": unquote(password),
                       "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN"})
    for key, value in parse_qsl(query, keep_blank_values=True):
        config[key.replace("_", ".")] = value
    return config


class Options:
    """What every client of one broker shares: settings, names, timeouts."""

    def __init__(self, url: str, *, prefix: str = "", partitions: int = 4,
                 replication_factor: int = 1, timeout: float = 30.0,
                 create_topics: bool = True, config: dict[str, Any] | None = None) -> None:
        if partitions < 1 or replication_factor < 1:
            raise ConfigurationError("partitions and replication_factor must be at least 1")
        if timeout <= 0:
            raise ConfigurationError("timeout must be positive (seconds)")
        self.where = masked(url)
        # Back on a restarted broker within a second (librdkafka's default backoff
        # grows to 10 s, as long as a group member's session on the test broker).
        self.base = {"reconnect.backoff.max.ms": 1000, **parse_url(url), **(config or {})}
        self.prefix = prefix
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.timeout = timeout
        self.create_topics = create_topics
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self._admin: AdminClient | None = None

    def unavailable(self, doing: str, detail: object) -> BrokerUnavailableError:
        return BrokerUnavailableError(
            f"Kafka at {self.where} did not answer while {doing} ({detail}); is it running? "
            "(scripts/kafka up starts the test broker)")

    def refused(self, doing: str, error: object) -> PublishError:
        return PublishError(f"Kafka at {self.where} refused {doing}: {error}")

    def wrap(self, doing: str, exc: KafkaException) -> PublishError:
        error = exc.args[0] if exc.args else exc
        if isinstance(error, KafkaError) and error.code() in (
                KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                KafkaError._MSG_TIMED_OUT):
            return self.unavailable(doing, error.str())
        return self.refused(doing, error.str() if isinstance(error, KafkaError) else error)

    def admin(self) -> AdminClient:
        with self._lock:
            if self._admin is None:
                self._admin = AdminClient({**self.base, "socket.timeout.ms": 10000})
            return self._admin

    def ensure_topics(self, names: Sequence[str]) -> None:
        """Create those of ``names`` that do not exist yet (once per broker object)."""
        missing = sorted(set(names) - self._known)
        if not missing:
            return
        if self.create_topics:
            futures = self.admin().create_topics(
                [NewTopic(n, num_partitions=self.partitions,
                          replication_factor=self.replication_factor) for n in missing],
                operation_timeout=self.timeout, request_timeout=self.timeout)
            for name, future in futures.items():
                try:
                    future.result(timeout=self.timeout)
                except KafkaException as exc:
                    error = exc.args[0] if exc.args else None
                    if isinstance(error, KafkaError) and \
                            error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                        continue
                    raise self.wrap(f"creating topic {name!r}", exc) from exc
                except TimeoutError as exc:
                    raise self.unavailable(f"creating topic {name!r}", "no answer") from exc
            self._wait_for_leaders(missing)
        with self._lock:
            self._known.update(missing)

    def _wait_for_leaders(self, names: Sequence[str]) -> None:
        """Until every partition of ``names`` has a leader: a topic just created has
        none for a moment, and reading its offsets then fails (NOT_LEADER)."""
        deadline = time.monotonic() + self.timeout
        for name in names:
            while True:
                try:
                    meta = self.admin().list_topics(name, timeout=self.timeout).topics.get(name)
                except KafkaException as exc:
                    raise self.wrap(f"reading the metadata of topic {name!r}", exc) from exc
                if meta is not None and meta.error is None and meta.partitions and all(
                        p.leader >= 0 for p in meta.partitions.values()):
                    break
                if time.monotonic() >= deadline:
                    raise self.unavailable(f"waiting for the leaders of topic {name!r}",
                                           "none elected yet")
                time.sleep(0.05)

    def close(self) -> None:
        self._admin = None


class KafkaPublisher:
    """Publishes records; ``publish_batch`` waits for every receipt before it returns."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.producer = Producer({
            **options.base, "enable.idempotence": True, "acks": "all", "linger.ms": 2,
            "message.timeout.ms": int(options.timeout * 1000),
        })

    def publish(self, message: Message) -> None:
        self.publish_batch([message])

    def publish_batch(self, messages: Sequence[Message]) -> None:
        """Every record is encoded first (a message that cannot be one refuses the whole
        batch before anything is sent), then produced; returns once Kafka has
        acknowledged all of them, and raises if any failed."""
        if not messages:
            return
        prefix = self.options.prefix
        records = [(topic_name(prefix, m.topic), *to_record(m)) for m in messages]
        self.options.ensure_topics([r[0] for r in records])
        failures: list[str] = []

        def receipt(error: KafkaError | None, _record: Any) -> None:
            if error is not None:
                failures.append(error.str())

        doing = f"publishing {len(records)} message(s)"
        for topic, key, value, headers in records:
            while True:
                try:
                    self.producer.produce(topic, value=value, key=key, headers=headers,
                                          on_delivery=receipt)
                    break
                except BufferError:
                    self.producer.poll(0.1)  # the local queue is full: let it drain
                except KafkaException as exc:
                    raise self.options.wrap(doing, exc) from exc
        left = self.producer.flush(self.options.timeout)
        if left:
            raise self.options.unavailable(doing, f"{left} receipt(s) still missing after "
                                                  f"{self.options.timeout:g} s")
        if failures:
            raise self.options.refused(doing, failures[0])

    def close(self) -> None:
        self.producer.flush(min(self.options.timeout, 10.0))


#: Errors of a partition that exists but is not served yet.
_NOT_READY = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                        KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION})


def _watermarks(reader: Consumer, tp: TopicPartition, timeout: float) -> tuple[int, int]:
    """A partition's low and high offsets, asked again while the error is retriable
    (a topic just created: the controller names a leader a moment before the broker
    serves the partition, NOT_LEADER_FOR_PARTITION)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = reader.get_watermark_offsets(tp, timeout=timeout)
            return low, high
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not (isinstance(error, KafkaError) and (
                    error.retriable() or error.code() in _NOT_READY)) or \
                    time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _delivery(topic: str, record: Any) -> Delivery:
    """The delivery of a consumed record (the framework's topic name, without prefix)."""
    handle = Handle(record.topic() or "", record.partition() or 0, record.offset() or 0)
    return to_delivery(topic, record.key(), record.value(), record.headers(), handle)


class _Offsets:
    """A partition's records handed out, in order, and which were acknowledged: the
    offset to commit is the one after the last of an unbroken run of acks."""

    def __init__(self) -> None:
        self.pending: dict[int, bool] = {}  # offset -> acknowledged, in fetch order
        self.commit_at: int | None = None

    def handed_out(self, offset: int) -> None:
        self.pending.setdefault(offset, False)

    def acked(self, offset: int) -> bool:
        """Mark ``offset``; True when the commit point moved."""
        if offset not in self.pending:
            return False
        self.pending[offset] = True
        moved = False
        while self.pending:
            first = next(iter(self.pending))
            if not self.pending[first]:
                break
            del self.pending[first]
            self.commit_at = first + 1
            moved = True
        return moved


class KafkaSubscriber:
    """One member of consumer group ``group`` on ``topic`` (see the module's docstring).

    ``visibility_timeout`` is accepted for the common signature and ignored: Kafka
    hands a record out again only after a rebalance or a restart, not after a time.
    """

    def __init__(self, options: Options, topic: str, group: str, *,
                 visibility_timeout: float = 30.0, config: dict[str, Any] | None = None
                 ) -> None:
        if not topic or not group:
            raise ConfigurationError("a Kafka subscriber needs a topic and a group")
        extra = dict(config or {})
        owned = _OWNED_CONSUMER & set(extra)
        if owned:
            raise ConfigurationError(f"{sorted(owned)} are set by the subscriber itself")
        del visibility_timeout
        self.options = options
        self.topic = topic
        self.group = group
        self.name = topic_name(options.prefix, topic)
        self.dead_name = dead_letter_topic(options.prefix, topic)
        options.ensure_topics([self.name])
        self._lock = threading.Lock()
        self._offsets: dict[int, _Offsets] = {}
        self._closed = False
        self.consumer = Consumer({
            **options.base, "group.id": group, "enable.auto.commit": False,
            "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
            # The consumer protocol of Kafka 4 (KIP-848): members join and leave
            # without stopping the others, so a member that holds a record (and does
            # not poll) never stalls a rebalance of the whole group.
            "group.protocol": "consumer",
            "client.id": f"outbox-{uuid.uuid4().hex[:8]}", **extra,
        })
        self.consumer.subscribe([self.name], on_assign=self._assigned,
                                on_revoke=self._revoked, on_lost=self._lost)
        self._dead_producer: Producer | None = None

    # -- rebalances (called inside poll, on the fetching thread) ------------------------

    def _assigned(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._offsets[tp.partition] = _Offsets()

    def _revoked(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._commit([tp.partition for tp in partitions], asynchronous=False)
        with self._lock:
            for tp in partitions:
                self._offsets.pop(tp.partition, None)

    def _lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._offsets.pop(tp.partition, None)

    def _commit(self, partitions: Sequence[int] | None, *, asynchronous: bool) -> None:
        with self._lock:
            wanted = [TopicPartition(self.name, p, o.commit_at)
                      for p, o in self._offsets.items()
                      if o.commit_at is not None and (partitions is None or p in partitions)]
        if not wanted:
            return
        try:
            if asynchronous:
                self.consumer.commit(offsets=wanted, asynchronous=True)
            else:
                self.consumer.commit(offsets=wanted, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else exc
            if isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET:
                return
            # Not committed: those records come again after a restart or a rebalance,
            # and the inbox drops them.
            log.warning("kafka_commit_failed", topic=self.name, group=self.group,
                        error=str(error))

    # -- the Subscriber protocol ---------------------------------------------------------

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        """Up to ``max_messages`` records, returning as soon as one is there (or after
        ``wait_seconds`` with none)."""
        if self._closed:
            raise ConfigurationError("this Kafka subscriber is closed")
        count = max(1, min(max_messages, MAX_FETCH))
        deadline = time.monotonic() + max(0.0, wait_seconds)
        doing = f"reading {self.name!r}"
        try:
            first = None
            while first is None:
                first = self.consumer.poll(max(0.0, min(deadline - time.monotonic(), 0.5)))
                if first is not None or time.monotonic() >= deadline:
                    break
            records = [first] if first is not None else []
            if records and count > 1:
                records.extend(self.consumer.consume(count - 1, 0))
        except KafkaException as exc:
            raise self.options.wrap(doing, exc) from exc
        out: list[Delivery] = []
        for record in records:
            error = record.error()
            if error is not None:
                if error.fatal():
                    raise self.options.refused(doing, error.str())
                log.warning("kafka_consume_error", topic=self.name, group=self.group,
                            error=error.str())
                continue
            delivery = _delivery(self.topic, record)
            handle = delivery.handle
            with self._lock:
                offsets = self._offsets.setdefault(handle.partition, _Offsets())
                offsets.handed_out(handle.offset)
            out.append(delivery)
        return out

    def ack(self, delivery: Delivery) -> None:
        handle = delivery.handle
        if not isinstance(handle, Handle):
            raise ConfigurationError("that delivery is not one of a Kafka subscriber's")
        with self._lock:
            offsets = self._offsets.get(handle.partition)
            moved = offsets is not None and offsets.acked(handle.offset)
        if moved:  # a partition no longer ours: its new owner reads the record again
            self._commit([handle.partition], asynchronous=True)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """The record, with the group, its origin and ``reason`` in headers, to the
        topic ``<topic>.dead`` (receipt awaited); then acknowledged."""
        handle = delivery.handle
        origin = f"{handle.topic}/{handle.partition}/{handle.offset}" \
            if isinstance(handle, Handle) else self.name
        key, value, headers = delivery_record(delivery)
        doing = f"dead-lettering {delivery.message_id!r}"
        self.options.ensure_topics([self.dead_name])
        if self._dead_producer is None:
            self._dead_producer = Producer({**self.options.base, "enable.idempotence": True,
                                            "acks": "all"})
        failures: list[str] = []
        try:
            self._dead_producer.produce(
                self.dead_name, value=value, key=key,
                headers=dead_headers(headers, self.group, origin, reason),
                on_delivery=lambda err, _r: failures.append(err.str()) if err else None)
        except (KafkaException, BufferError) as exc:
            raise self.options.refused(doing, exc) from exc
        if self._dead_producer.flush(self.options.timeout):
            raise self.options.unavailable(doing, "no receipt")
        if failures:
            raise self.options.refused(doing, failures[0])
        self.ack(delivery)

    def close(self) -> None:
        """Commit what was acknowledged, leave the group (its partitions go to the
        other members at once), and let go of the connections."""
        if self._closed:
            return
        self._closed = True
        try:
            self._commit(None, asynchronous=False)
        finally:
            self.consumer.close()
            if self._dead_producer is not None:
                self._dead_producer.flush(min(self.options.timeout, 10.0))


# -- asyncio forms: the same clients, their blocking calls run in worker threads ------


class AsyncKafkaPublisher:
    """:class:`KafkaPublisher` for asyncio (librdkafka waits in a worker thread)."""

    def __init__(self, options: Options) -> None:
        self.sync = KafkaPublisher(options)

    async def publish(self, message: Message) -> None:
        await asyncio.to_thread(self.sync.publish, message)

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        await asyncio.to_thread(self.sync.publish_batch, messages)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)


class AsyncKafkaSubscriber:
    """:class:`KafkaSubscriber` for asyncio: its calls run, one at a time, on a
    thread of its own (always the same one, as a sync consumer's), so the event loop
    never blocks."""

    def __init__(self, options: Options, topic: str, group: str, **kwargs: Any) -> None:
        self.sync = KafkaSubscriber(options, topic, group, **kwargs)
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"outbox-kafka-{group}")
        self._calls = asyncio.Lock()
        self._closed = False

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._calls:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        found: Sequence[Delivery] = await self._run(self.sync.fetch, max_messages,
                                                    wait_seconds)
        return found

    async def ack(self, delivery: Delivery) -> None:
        await self._run(self.sync.ack, delivery)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._run(self.sync.dead_letter, delivery, reason)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._run(self.sync.close)
        finally:
            self._thread.shutdown(wait=False)


class KafkaBroker:
    """Kafka at ``url`` (``kafka://host:port[,host:port...]``, see :func:`parse_url`).

    ``prefix`` is put before every topic name; ``partitions`` and
    ``replication_factor`` are those of the topics it creates; ``timeout`` bounds a
    publish's wait for its receipts; ``config`` adds librdkafka settings.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.options = Options(url, **options)

    def publisher(self) -> KafkaPublisher:
        return KafkaPublisher(self.options)

    def subscriber(self, topic: str, group: str, **options: Any) -> KafkaSubscriber:
        return KafkaSubscriber(self.options, topic, group, **options)

    def async_publisher(self) -> AsyncKafkaPublisher:
        return AsyncKafkaPublisher(self.options)

    def async_subscriber(self, topic: str, group: str, **options: Any) -> AsyncKafkaSubscriber:
        return AsyncKafkaSubscriber(self.options, topic, group, **options)

    def dead_letters(self, topic: str, group: str | None = None, limit: int = 1000
                     ) -> list[Delivery]:
        """The dead letters of ``topic`` (of ``group`` only, if given), oldest first;
        each delivery's headers include ``outbox-dead-reason`` and
        ``outbox-dead-group``."""
        name = dead_letter_topic(self.options.prefix, topic)
        self.options.ensure_topics([name])
        reader = Consumer({**self.options.base, "group.id": f"outbox-reader-{uuid.uuid4().hex}",
                           "enable.auto.commit": False})
        out: list[Delivery] = []
        try:
            meta = reader.list_topics(name, timeout=self.options.timeout).topics[name]
            wanted = []
            for p in meta.partitions:
                low, high = _watermarks(reader, TopicPartition(name, p), self.options.timeout)
                if high > low:
                    wanted.append((p, low, high))
            if not wanted:
                return []
            reader.assign([TopicPartition(name, p, low) for p, low, _ in wanted])
            left = {p: high for p, _, high in wanted}
            deadline = time.monotonic() + self.options.timeout
            while left and len(out) < limit and time.monotonic() < deadline:
                for record in reader.consume(100, 0.5):
                    if record.error() is not None:
                        continue
                    d = _delivery(topic, record)
                    if d.handle.offset + 1 >= left.get(d.handle.partition, 0):
                        left.pop(d.handle.partition, None)
                    if group is None or d.headers.get("outbox-dead-group") == group:
                        out.append(d)
        except KafkaException as exc:
            raise self.options.wrap("reading the dead letters", exc) from exc
        finally:
            reader.close()
        return out[:limit]

    def close(self) -> None:
        self.options.close()

    async def aclose(self) -> None:
        self.close()


def connect(url: str, **options: Any) -> KafkaBroker:
    """The :class:`KafkaBroker` for ``url`` (``outbox.brokers.open_broker`` calls it)."""
    return KafkaBroker(url, **options)
