"""A RocketMQ client over the remoting protocol: topic routes from the name server,
connections and heartbeats to the brokers, sends (normal, delayed, batch,
transactional half messages; to the queue a key hashes to, as Java's
``SelectMessageQueueByHash`` picks it), ending transactions, answering the broker's
check-backs, pulls (long polls) and queue locks for ordered consumption.

It is what the adapter uses for 4.x brokers (which have no gRPC proxy); a 5.x broker
speaks the same protocol on its remoting port.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import itertools
import json
import os
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from outbox.errors import ConfigurationError, PublishError
from outbox.log import get_logger

from .connection import Connection, RemotingError, parse_address
from .protocol import (
    TRANSACTION_COMMIT_TYPE,
    TRANSACTION_NOT_TYPE,
    TRANSACTION_PREPARED_TYPE,
    TRANSACTION_ROLLBACK_TYPE,
    BatchItem,
    Command,
    ProtocolError,
    RequestCode,
    ResponseCode,
    StoredMessage,
    commit_log_offset_of,
    decode_messages,
    encode_batch,
    encode_properties,
    hash_index,
)

log = get_logger("outbox.rocketmq.remoting")

#: How long a topic route is used before it is asked for again.
ROUTE_TTL_SECONDS = 30.0
#: How often the brokers hear from this client (they drop a silent one after 120 s).
HEARTBEAT_SECONDS = 20.0
#: The broker's own topic for creating topics on first send; we never rely on it.
DEFAULT_TOPIC = "TBW102"
#: Response codes after which the message is stored all the same.
_STORED = {ResponseCode.SUCCESS, ResponseCode.FLUSH_DISK_TIMEOUT,
           ResponseCode.FLUSH_SLAVE_TIMEOUT, ResponseCode.SLAVE_NOT_AVAILABLE}
#: The broker's delay levels (its default ``messageDelayLevel``, ``1s 5s 10s 30s 1m
#: 2m ... 10m 20m 30m 1h 2h``), in seconds: level ``i`` waits ``DELAY_LEVELS[i-1]``.
DELAY_LEVELS = (1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800,
                3600, 7200)


def level_at_least(seconds: float) -> int | None:
    """The broker's smallest delay level that waits at least ``seconds``; None past
    the longest."""
    for level, delay in enumerate(DELAY_LEVELS, start=1):
        if delay >= seconds:
            return level
    return None


def send_delay_level(seconds: float) -> int | None:
    """The ``DELAY`` level for a message due in ``seconds``: the smallest level that
    waits at least that long (never early), None when it is due already. Past the
    longest level (2 h) a broker delay cannot hold it: PublishError."""
    if seconds <= 0:
        return None
    level = level_at_least(seconds)
    if level is not None:
        return level
    raise PublishError(
        f"a message due in {seconds:.0f} s is beyond RocketMQ 4.x's longest delay level "
        f"({DELAY_LEVELS[-1]} s): keep it in the outbox until it is due (the relay sends "
        "an outbox row only once its delivery time came) instead of publishing it directly")


def select_by_hash(queues: Sequence[MessageQueue], key: str) -> MessageQueue:
    """The queue of ``queues`` (a route's write queues, in the route's order) that
    RocketMQ's ``SelectMessageQueueByHash`` picks for ``key``: a Java producer
    ordering by the same key writes to the same queue."""
    return queues[hash_index(key, len(queues))]


@dataclass(frozen=True)
class MessageQueue:
    broker: str
    queue_id: int


@dataclass(frozen=True)
class Route:
    """A topic's route: master broker addresses and queues by broker."""

    topic: str
    brokers: Mapping[str, str]  # broker name -> master address
    write_queues: tuple[MessageQueue, ...]
    read_queues: tuple[MessageQueue, ...]
    fetched: float

    @classmethod
    def parse(cls, topic: str, body: bytes) -> Route:
        try:
            data = json.loads(quote_number_keys(body.decode("utf-8")))
            brokers = {
                b["brokerName"]: b["brokerAddrs"]["0"]
                for b in data.get("brokerDatas", ())
                if isinstance(b.get("brokerAddrs"), dict) and "0" in b["brokerAddrs"]
            }
            write, read = [], []
            for q in sorted(data.get("queueDatas", ()), key=lambda q: q["brokerName"]):
                name, perm = q["brokerName"], int(q.get("perm", 6))
                if name not in brokers:
                    continue
                if perm & 2:
                    write += [MessageQueue(name, i) for i in range(int(q["writeQueueNums"]))]
                if perm & 4:
                    read += [MessageQueue(name, i) for i in range(int(q["readQueueNums"]))]
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"a topic route that does not parse: {exc}") from None
        return cls(topic, brokers, tuple(write), tuple(read), time.monotonic())


def quote_number_keys(text: str) -> str:
    """JSON out of fastjson's default output, which name servers before 4.9.4 send:
    object keys that are integers stay unquoted (``{"brokerAddrs":{0:"host:port"}}``).
    Quotes every such key, leaving strings alone."""
    out: list[str] = []
    i, n = 0, len(text)
    expect_key = False
    while i < n:
        ch = text[i]
        if ch == '"':
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            out.append(text[i:end + 1])
            i = end + 1
            expect_key = False
            continue
        if ch in "{,":
            expect_key = True
        elif expect_key and (ch.isdigit() or ch == "-"):
            end = i + 1
            while end < n and text[end].isdigit():
                end += 1
            rest = text[end:].lstrip()
            if rest.startswith(":"):
                out.append(f'"{text[i:end]}"')
                i = end
                expect_key = False
                continue
            expect_key = False
        elif not ch.isspace():
            expect_key = False
        out.append(ch)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class SendResult:
    msg_id: str  # the producer's unique key (what consoles show as the message id)
    offset_msg_id: str
    broker: str
    queue_id: int
    queue_offset: int
    address: str


@dataclass(frozen=True)
class OutgoingMessage:
    """One message of a batch send: what :meth:`RemotingClient.send` takes for one."""

    body: bytes
    properties: Mapping[str, str]
    tag: str | None = None
    keys: Sequence[str] = ()


@dataclass(frozen=True)
class PullResult:
    code: int  # SUCCESS, PULL_NOT_FOUND, PULL_RETRY_IMMEDIATELY or PULL_OFFSET_MOVED
    messages: list[StoredMessage]
    next_offset: int
    min_offset: int
    max_offset: int


#: PULL_MESSAGE's flags (RocketMQ's ``PullSysFlag``).
_PULL_SUSPEND = 0x1 << 1
_PULL_SUBSCRIPTION = 0x1 << 2

#: Answers a check-back: the stored half message -> COMMIT / ROLLBACK / UNKNOWN type.
Checker = Callable[[StoredMessage], int]


def new_unique_key() -> str:
    """A message's unique key (the ``UNIQ_KEY`` property): 32 hex digits in the Java
    client's layout (IPv4 address, process id, a random number fixed per process,
    milliseconds since the start of the month, a counter), because the broker, the
    Java client and the console read a time out of it to look the message up by id
    (a random key would send that search to the wrong time and find nothing)."""
    now = time.time()
    month = dt.datetime.fromtimestamp(now).astimezone().replace(
        day=1, hour=0, minute=0, second=0, microsecond=0)
    since = max(0, int(now * 1000) - int(month.timestamp() * 1000))
    return (_key_prefix() + struct.pack(">iH", since, next(_key_counter) & 0xFFFF)).hex().upper()


@functools.cache
def _key_prefix() -> bytes:
    try:
        ip = socket.inet_aton(_local_ip())
    except OSError:
        ip = bytes([127, 0, 0, 1])
    return ip + struct.pack(">H", os.getpid() & 0xFFFF) + uuid.uuid4().bytes[:4]


_key_counter = itertools.count(int.from_bytes(uuid.uuid4().bytes[:2], "big"))


class RemotingClient:
    """One client instance: its name servers, broker connections and groups.

    ``producer_group`` is announced in every heartbeat; the broker sends the
    check-backs of that group's half messages to this client's connection, and
    ``checker`` answers them (on a small pool, never on the reading thread).
    """

    def __init__(self, namesrv: str, *, producer_group: str | None = None,
                 checker: Checker | None = None, request_timeout: float = 5.0,
                 instance: str | None = None) -> None:
        self.namesrv = [a.strip() for a in namesrv.split(";") if a.strip()]
        if not self.namesrv:
            raise ConfigurationError("the RocketMQ name server address is empty; give "
                                     "host:port (several separated by ';')")
        for address in self.namesrv:
            try:
                parse_address(address)
            except ValueError:
                raise ConfigurationError(
                    f"RocketMQ name server {address!r} is not host:port") from None
        self.producer_group = producer_group
        self.checker = checker
        self.request_timeout = request_timeout
        host = _local_ip()
        self.client_id = f"{host}@{instance or os.getpid()}#{time.monotonic_ns()}"
        #: Requests sent, by request code (every connection of this client).
        self.sent: Counter[int] = Counter()
        #: Called with the group when a broker says a consumer group's members changed.
        self.on_consumers_changed: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._brokers: dict[str, Connection] = {}
        self._namesrv_conn: Connection | None = None
        self._next_queue = itertools.count()
        self._handlers = ThreadPoolExecutor(2, thread_name_prefix="outbox-rmq-check")
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._subscriptions: dict[str, tuple[str, ...]] = {}
        self._sub_version = int(time.time() * 1000)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, topics: Sequence[str] = ()) -> RemotingClient:
        """Look up ``topics``, connect to their brokers and send the first heartbeat
        (so check-backs reach this client from now on)."""
        for topic in topics:
            self.route(topic)
        self.heartbeat()
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, daemon=True,
                                               name="outbox-rmq-heartbeat")
            self._heartbeat.start()
        return self

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            brokers, self._brokers = dict(self._brokers), {}
            namesrv, self._namesrv_conn = self._namesrv_conn, None
        groups = [{"producerGroup": self.producer_group}] if self.producer_group else []
        groups += [{"consumerGroup": g} for g in self._subscriptions]
        for address, conn in brokers.items():
            for group in groups if not conn.closed else ():
                # Gone at once from the group's members: the others rebalance now.
                try:
                    conn.request(Command(RequestCode.UNREGISTER_CLIENT, {
                        "clientID": self.client_id, **group}), min(self.request_timeout, 2.0))
                except RemotingError as exc:
                    log.debug("rocketmq_unregister_failed", address=address, error=str(exc))
            conn.close()
        if namesrv is not None:
            namesrv.close()
        self._handlers.shutdown(wait=False)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except Exception as exc:  # the broker may be restarting: next beat
                log.warning("rocketmq_heartbeat_failed", error=f"{type(exc).__name__}: {exc}")

    def heartbeat(self) -> None:
        """Tell every known broker about this client and its groups."""
        body = json.dumps({
            "clientID": self.client_id,
            "producerDataSet": [{"groupName": self.producer_group}] if self.producer_group
            else [],
            "consumerDataSet": [{
                "groupName": group, "consumeType": "CONSUME_ACTIVELY",
                "messageModel": "CLUSTERING", "consumeFromWhere": "CONSUME_FROM_FIRST_OFFSET",
                "unitMode": False,
                "subscriptionDataSet": [{
                    "classFilterMode": False, "topic": topic, "subString": "*",
                    "tagsSet": [], "codeSet": [], "subVersion": self._sub_version,
                    "expressionType": "TAG"} for topic in topics],
            } for group, topics in self._subscriptions.items()],
        }).encode()
        with self._lock:
            addresses = {a for r in self._routes.values() for a in r.brokers.values()}
        failures = []
        for address in sorted(addresses):
            try:
                response = self.broker(address).request(
                    Command(RequestCode.HEART_BEAT, body=body), self.request_timeout)
                _expect_success(response, f"heartbeat to {address}")
            except RemotingError as exc:
                failures.append(str(exc))
        if failures and len(failures) == len(addresses):
            raise RemotingError("; ".join(failures))

    # -- connections ---------------------------------------------------------------------

    def broker(self, address: str) -> Connection:
        with self._lock:
            conn = self._brokers.get(address)
            if conn is not None and not conn.closed:
                return conn
        fresh = Connection(address, on_request=self._on_request, handlers=self._handlers,
                           sent=self.sent)
        with self._lock:
            conn = self._brokers.get(address)
            if conn is not None and not conn.closed:
                fresh.close()
                return conn
            self._brokers[address] = fresh
        return fresh

    def _namesrv_request(self, command: Command) -> Command:
        errors = []
        for address in self.namesrv:
            with self._lock:
                conn = self._namesrv_conn
            try:
                if conn is None or conn.closed or conn.address != address:
                    conn = Connection(address, sent=self.sent)
                    with self._lock:
                        self._namesrv_conn = conn
                return conn.request(command, self.request_timeout)
            except RemotingError as exc:
                errors.append(str(exc))
        raise RemotingError("no RocketMQ name server answered: " + "; ".join(errors))

    # -- routes --------------------------------------------------------------------------

    def route(self, topic: str, *, fresh: bool = False) -> Route:
        with self._lock:
            known = self._routes.get(topic)
        if known is not None and not fresh and time.monotonic() - known.fetched < ROUTE_TTL_SECONDS:
            return known
        response = self._namesrv_request(Command(
            RequestCode.GET_ROUTEINFO_BY_TOPIC,
            {"topic": topic, "acceptStandardJsonOnly": "true"}))
        if response.code == ResponseCode.TOPIC_NOT_EXIST:
            raise ConfigurationError(
                f"RocketMQ has no route for topic {topic!r}: it does not exist; create it "
                "with mqadmin updateTopic (scripts/rocketmq4 up creates the project's)")
        _expect_success(response, f"the route of {topic}")
        route = Route.parse(topic, response.body)
        if not route.write_queues and not route.read_queues:
            raise ConfigurationError(f"RocketMQ topic {topic!r} has no queue on a master broker")
        with self._lock:
            self._routes[topic] = route
        return route

    # -- sending -------------------------------------------------------------------------

    def send(self, topic: str, body: bytes, properties: Mapping[str, str], *,
             tag: str | None = None, keys: Sequence[str] = (), transactional: bool = False,
             queue: MessageQueue | None = None, queue_key: str | None = None,
             delay_level: int | None = None) -> SendResult:
        """Send one message (a half message with ``transactional``) and return where
        the broker stored it. The queue: ``queue``, else the one ``queue_key`` hashes
        to (as a Java producer's ``SelectMessageQueueByHash`` picks it: per-key
        order), else the next in turn. ``delay_level`` (1-18): the broker delivers it
        after that level's delay."""
        if transactional and not self.producer_group:
            raise ConfigurationError("a transactional send needs a producer group")
        props = self._properties(properties, tag, keys)
        if transactional:
            props["TRAN_MSG"] = "true"
            props["PGROUP"] = str(self.producer_group)
        if delay_level is not None:
            if transactional:
                raise PublishError("RocketMQ does not delay a transactional message")
            props["DELAY"] = str(delay_level)
        route = self.route(topic)
        mq = queue or self.choose_queue(route, queue_key)
        address = route.brokers[mq.broker]
        try:
            encoded = encode_properties(props)
        except ValueError as exc:
            raise PublishError(f"RocketMQ message cannot be encoded: {exc}") from None
        command = Command(RequestCode.SEND_MESSAGE, {
            "producerGroup": self.producer_group or "OUTBOX_PRODUCER",
            "topic": topic, "defaultTopic": DEFAULT_TOPIC, "defaultTopicQueueNums": "4",
            "queueId": str(mq.queue_id),
            "sysFlag": str(TRANSACTION_PREPARED_TYPE if transactional else 0),
            "bornTimestamp": str(int(time.time() * 1000)), "flag": "0",
            "properties": encoded, "reconsumeTimes": "0", "unitMode": "false",
            "batch": "false",
        }, body=body)
        response = self._send_request(topic, address, command)
        fields = response.ext_fields
        try:
            return SendResult(
                msg_id=props["UNIQ_KEY"], offset_msg_id=fields["msgId"], broker=mq.broker,
                queue_id=int(fields.get("queueId", mq.queue_id)),
                queue_offset=int(fields["queueOffset"]), address=address)
        except (KeyError, ValueError) as exc:
            raise RemotingError(f"RocketMQ at {address} answered a send without where it "
                                f"stored the message ({exc})") from None

    def send_batch(self, topic: str, queue: MessageQueue,
                   messages: Sequence[OutgoingMessage]) -> list[SendResult]:
        """Send ``messages`` to one queue in one SEND_BATCH_MESSAGE request, stored
        one after the other in this order, each with its own unique key and
        properties; returns where each was stored. The caller keeps the batch
        within the broker's ``maxMessageSize`` (:data:`MAX_MESSAGE_BYTES` for all
        of it) and sends no delayed or transactional message in it (the broker
        refuses both in a batch)."""
        if not messages:
            return []
        route = self.route(topic)
        address = route.brokers.get(queue.broker)
        if address is None:
            raise RemotingError(f"RocketMQ topic {topic!r} has no master for broker "
                                f"{queue.broker!r} any more")
        all_props = [self._properties(m.properties, m.tag, m.keys) for m in messages]
        try:
            body = encode_batch([BatchItem(m.body, encode_properties(p))
                                 for m, p in zip(messages, all_props, strict=True)])
        except ValueError as exc:
            raise PublishError(f"RocketMQ message cannot be encoded: {exc}") from None
        # SEND_BATCH_MESSAGE takes the compact header of SEND_MESSAGE_V2 (one-letter
        # field names); the batch's own properties are what a Java MessageBatch has.
        command = Command(RequestCode.SEND_BATCH_MESSAGE, {
            "a": self.producer_group or "OUTBOX_PRODUCER", "b": topic, "c": DEFAULT_TOPIC,
            "d": "4", "e": str(queue.queue_id), "f": "0",
            "g": str(int(time.time() * 1000)), "h": "0",
            "i": encode_properties({"WAIT": "true"}), "j": "0", "k": "false", "m": "true",
        }, body=body)
        response = self._send_request(topic, address, command)
        fields = response.ext_fields
        try:
            offset_ids = fields["msgId"].split(",")
            first = int(fields["queueOffset"])
            queue_id = int(fields.get("queueId", queue.queue_id))
        except (KeyError, ValueError) as exc:
            raise RemotingError(f"RocketMQ at {address} answered a batch send without where "
                                f"it stored the messages ({exc})") from None
        if len(offset_ids) != len(messages):
            raise RemotingError(f"RocketMQ at {address} stored {len(offset_ids)} messages of "
                                f"a batch of {len(messages)}")
        return [SendResult(msg_id=p["UNIQ_KEY"], offset_msg_id=offset_id, broker=queue.broker,
                           queue_id=queue_id, queue_offset=first + i, address=address)
                for i, (p, offset_id) in enumerate(zip(all_props, offset_ids, strict=True))]

    def choose_queue(self, route: Route, key: str | None = None) -> MessageQueue:
        """Where a message of ``route``'s topic goes: the queue ``key`` hashes to, or
        (no key) the next queue in turn."""
        if not route.write_queues:
            raise ConfigurationError(f"RocketMQ topic {route.topic!r} has no writable queue")
        if key is not None:
            return select_by_hash(route.write_queues, key)
        return route.write_queues[next(self._next_queue) % len(route.write_queues)]

    @staticmethod
    def _properties(properties: Mapping[str, str], tag: str | None,
                    keys: Sequence[str]) -> dict[str, str]:
        props = dict(properties)
        if tag:
            props["TAGS"] = tag
        if keys:
            props["KEYS"] = " ".join(keys)
        props.setdefault("UNIQ_KEY", new_unique_key())
        props["WAIT"] = "true"
        return props

    def _send_request(self, topic: str, address: str, command: Command) -> Command:
        try:
            response = self.broker(address).request(command, self.request_timeout)
        except RemotingError:
            self.route(topic, fresh=True)  # the broker may have moved
            raise
        _expect(response, _STORED, f"sending to {topic} on {address}")
        return response

    def end_transaction(self, result: SendResult, commit: bool | None) -> None:
        """Commit (True), roll back (False) or leave to the check-back (None) the half
        message of ``result``; one-way, as the broker expects."""
        self._end(result.address, self.producer_group or "", result.queue_offset,
                  commit_log_offset_of(result.offset_msg_id), result.msg_id, commit,
                  from_check=False)

    def _end(self, address: str, group: str, queue_offset: int, commit_log_offset: int,
             msg_id: str, commit: bool | None, *, from_check: bool) -> None:
        state = {True: TRANSACTION_COMMIT_TYPE, False: TRANSACTION_ROLLBACK_TYPE,
                 None: TRANSACTION_NOT_TYPE}[commit]
        self.broker(address).oneway(Command(RequestCode.END_TRANSACTION, {
            "producerGroup": group, "tranStateTableOffset": str(queue_offset),
            "commitLogOffset": str(commit_log_offset), "commitOrRollback": str(state),
            "fromTransactionCheck": "true" if from_check else "false",
            "msgId": msg_id, "transactionId": msg_id,
        }))

    # -- pulling -------------------------------------------------------------------------

    def subscriptions(self, group: str) -> tuple[str, ...]:
        return self._subscriptions.get(group, ())

    def subscribe(self, group: str, topics: Sequence[str]) -> None:
        """Announce ``group`` as a consumer of ``topics`` (every tag) in the heartbeats;
        a broker serves pulls only to a group it has heard of."""
        for topic in topics:
            self.route(topic)
        self._subscriptions[group] = tuple(topics)
        self.heartbeat()

    def pull(self, group: str, topic: str, queue: MessageQueue, offset: int, *,
             max_messages: int = 32, wait_ms: int = 0) -> PullResult:
        """Messages of one queue from ``offset`` on (waiting up to ``wait_ms`` on the
        broker when there are none yet)."""
        future = self.pull_async(group, topic, queue, offset, max_messages=max_messages,
                                 wait_ms=wait_ms)
        timeout = pull_timeout(self.request_timeout, wait_ms)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise RemotingError(f"RocketMQ did not answer a pull of {topic} queue "
                                f"{queue.queue_id} in {timeout:g} s") from None

    def pull_async(self, group: str, topic: str, queue: MessageQueue, offset: int, *,
                   max_messages: int = 32, wait_ms: int = 0) -> Future[PullResult]:
        """:meth:`pull` without waiting: the result comes as the future's. With
        ``wait_ms`` the broker holds the request until a message arrives or the time
        is up (its long polling; it looks at held requests every 5 s, so an empty
        answer may come a few seconds late): the caller waits at most
        :func:`pull_timeout` for it, then cancels the future."""
        route = self.route(topic)
        address = route.brokers.get(queue.broker)
        if address is None:
            raise RemotingError(f"RocketMQ topic {topic!r} has no master for broker "
                                f"{queue.broker!r} any more")
        flags = _PULL_SUBSCRIPTION | (_PULL_SUSPEND if wait_ms else 0)
        command = Command(RequestCode.PULL_MESSAGE, {
            "consumerGroup": group, "topic": topic, "queueId": str(queue.queue_id),
            "queueOffset": str(offset), "maxMsgNums": str(max_messages),
            "sysFlag": str(flags), "commitOffset": "0",
            "suspendTimeoutMillis": str(wait_ms), "subscription": "*",
            "subVersion": str(self._sub_version), "expressionType": "TAG",
        })
        raw = self.broker(address).request_async(command)
        out: Future[PullResult] = Future()

        def answered(done: Future[Command]) -> None:
            if done.cancelled():
                return
            try:
                result = _pull_result(done.result(), address, topic, queue, offset)
            except (RemotingError, ProtocolError, PublishError) as exc:
                with contextlib.suppress(InvalidStateError):
                    out.set_exception(exc)
                return
            with contextlib.suppress(InvalidStateError):
                out.set_result(result)

        out.add_done_callback(lambda f: raw.cancel() if f.cancelled() else None)
        raw.add_done_callback(answered)
        return out

    # -- ordered consumption: queue locks --------------------------------------------------

    def lock_queues(self, group: str, topic: str, queues: Iterable[MessageQueue]
                    ) -> set[MessageQueue]:
        """Lock ``queues`` of ``topic`` for this client in ``group`` on their brokers
        (LOCK_BATCH_MQ; locking again renews a lock, which the broker keeps 60 s):
        returns those locked, the others being locked by another member. A broker
        that cannot be asked counts as "none locked" there, logged."""
        locked: set[MessageQueue] = set()
        answers = self._per_broker(RequestCode.LOCK_BATCH_MQ, group, topic, queues,
                                   self.request_timeout, "locking", "rocketmq_lock_failed")
        for broker, response in answers.items():
            try:
                answer = json.loads(response.body or b"{}")
                for q in answer.get("lockOKMQSet") or ():
                    if q.get("topic") == topic and q.get("brokerName") == broker:
                        locked.add(MessageQueue(broker, int(q["queueId"])))
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                log.warning("rocketmq_lock_failed", topic=topic, broker=broker, group=group,
                            error=f"{type(exc).__name__}: {exc}")
        return locked & set(queues)

    def unlock_queues(self, group: str, topic: str, queues: Iterable[MessageQueue]) -> None:
        """Give up this client's locks of ``queues`` (UNLOCK_BATCH_MQ), so another
        member takes them at once instead of after the broker's 60 s."""
        self._per_broker(RequestCode.UNLOCK_BATCH_MQ, group, topic, queues,
                         min(self.request_timeout, 3.0), "unlocking", "rocketmq_unlock_failed")

    def _per_broker(self, code: int, group: str, topic: str, queues: Iterable[MessageQueue],
                    timeout: float, doing: str, failed: str) -> dict[str, Command]:
        """One lock request (``code``) per broker for its share of ``queues``; the
        successful answers by broker name, the failures logged as ``failed``."""
        answers: dict[str, Command] = {}
        for broker, mine in _by_broker(queues).items():
            body = json.dumps({"consumerGroup": group, "clientId": self.client_id,
                               "mqSet": [_mq_json(topic, q) for q in mine]}).encode()
            try:
                address = self.route(topic).brokers[broker]
                response = self.broker(address).request(Command(code, body=body), timeout)
                _expect_success(response, f"{doing} queues of {topic} on {address}")
                answers[broker] = response
            except (RemotingError, PublishError, KeyError) as exc:
                log.warning(failed, topic=topic, broker=broker, group=group,
                            error=f"{type(exc).__name__}: {exc}")
        return answers

    # -- requests from brokers -----------------------------------------------------------

    def _on_request(self, conn: Connection, command: Command) -> None:
        if command.code == RequestCode.CHECK_TRANSACTION_STATE:
            self._check(conn, command)
        elif command.code == RequestCode.NOTIFY_CONSUMER_IDS_CHANGED:
            callback = self.on_consumers_changed
            if callback is not None:
                callback(command.ext_fields.get("consumerGroup", ""))
        elif not command.is_oneway:
            conn.reply(command.response(ResponseCode.REQUEST_CODE_NOT_SUPPORTED,
                                        f"request code {command.code} not supported"))

    def _check(self, conn: Connection, command: Command) -> None:
        fields = command.ext_fields
        try:
            [stored] = decode_messages(command.body)
        except (ProtocolError, ValueError) as exc:
            log.error("rocketmq_check_back_unreadable", address=conn.address, error=str(exc))
            return
        if self.checker is None:
            log.warning("rocketmq_check_back_without_checker", msg_id=stored.msg_id)
            return
        try:
            state = self.checker(stored)
        except Exception as exc:
            log.error("rocketmq_check_back_failed", msg_id=stored.msg_id,
                      error=f"{type(exc).__name__}: {exc}")
            state = TRANSACTION_NOT_TYPE
        commit = {TRANSACTION_COMMIT_TYPE: True, TRANSACTION_ROLLBACK_TYPE: False}.get(state)
        try:
            self._end(conn.address, stored.properties.get("PGROUP", self.producer_group or ""),
                      int(fields.get("tranStateTableOffset", stored.queue_offset)),
                      int(fields.get("commitLogOffset", stored.commit_log_offset)),
                      fields.get("msgId") or stored.msg_id, commit, from_check=True)
        except (RemotingError, ValueError) as exc:
            log.warning("rocketmq_check_back_answer_lost", msg_id=stored.msg_id, error=str(exc))


def pull_timeout(request_timeout: float, wait_ms: int) -> float:
    """How long a pull that the broker may hold ``wait_ms`` is waited for: the hold,
    the 5 s between the broker's looks at held requests, and the request timeout."""
    return request_timeout + (wait_ms / 1000 + 5.0 if wait_ms else 0.0)


def _pull_result(response: Command, address: str, topic: str, queue: MessageQueue,
                 offset: int) -> PullResult:
    fields = response.ext_fields
    try:
        next_offset = int(fields.get("nextBeginOffset", offset))
        bounds = int(fields.get("minOffset", 0)), int(fields.get("maxOffset", 0))
    except ValueError as exc:
        raise RemotingError(f"RocketMQ at {address} answered a pull with bad offsets "
                            f"({exc})") from None
    if response.code == ResponseCode.SUCCESS:
        messages = decode_messages(response.body)
    elif response.code in (ResponseCode.PULL_NOT_FOUND, ResponseCode.PULL_RETRY_IMMEDIATELY,
                           ResponseCode.PULL_OFFSET_MOVED):
        messages = []
    else:
        _expect_success(response, f"pulling {topic} queue {queue.queue_id} on {address}")
        messages = []
    return PullResult(response.code, messages, next_offset, *bounds)


def _by_broker(queues: Iterable[MessageQueue]) -> dict[str, list[MessageQueue]]:
    out: dict[str, list[MessageQueue]] = {}
    for q in sorted(set(queues), key=lambda q: (q.broker, q.queue_id)):
        out.setdefault(q.broker, []).append(q)
    return out


def _mq_json(topic: str, queue: MessageQueue) -> dict[str, Any]:
    return {"topic": topic, "brokerName": queue.broker, "queueId": queue.queue_id}


def _expect(response: Command, codes: set[int], what: str) -> None:
    if response.code in codes:
        return
    remark = (response.remark or "").strip()
    if response.code in (ResponseCode.TOPIC_NOT_EXIST, ResponseCode.NO_PERMISSION,
                         ResponseCode.MESSAGE_ILLEGAL):
        raise PublishError(f"{what}: RocketMQ refused it (code {response.code}: {remark})")
    raise RemotingError(f"{what}: RocketMQ answered code {response.code} ({remark or 'no remark'})")


def _expect_success(response: Command, what: str) -> None:
    _expect(response, {ResponseCode.SUCCESS}, what)


def _local_ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


__all__ = ["DELAY_LEVELS", "MessageQueue", "OutgoingMessage", "PullResult", "RemotingClient",
           "Route", "SendResult", "StoredMessage", "select_by_hash", "send_delay_level"]

