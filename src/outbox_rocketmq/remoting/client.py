"""A RocketMQ client over the remoting protocol: topic routes from the name server,
connections and heartbeats to the brokers, sends (normal, batch, transactional half
messages), ending transactions, and answering the broker's check-backs.

It is what the adapter uses for 4.x brokers (which have no gRPC proxy); a 5.x broker
speaks the same protocol on its remoting port.
"""

from __future__ import annotations

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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from outbox.errors import ConfigurationError, PublishError
from outbox.log import get_logger

from .connection import Connection, RemotingError, parse_address
from .protocol import (
    TRANSACTION_COMMIT_TYPE,
    TRANSACTION_NOT_TYPE,
    TRANSACTION_PREPARED_TYPE,
    TRANSACTION_ROLLBACK_TYPE,
    Command,
    ProtocolError,
    RequestCode,
    ResponseCode,
    StoredMessage,
    commit_log_offset_of,
    decode_messages,
    encode_properties,
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
        fresh = Connection(address, on_request=self._on_request, handlers=self._handlers)
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
                    conn = Connection(address)
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
             queue: MessageQueue | None = None) -> SendResult:
        """Send one message (a half message with ``transactional``) and return where
        the broker stored it."""
        if transactional and not self.producer_group:
            raise ConfigurationError("a transactional send needs a producer group")
        props = dict(properties)
        if tag:
            props["TAGS"] = tag
        if keys:
            props["KEYS"] = " ".join(keys)
        props.setdefault("UNIQ_KEY", new_unique_key())
        props["WAIT"] = "true"
        if transactional:
            props["TRAN_MSG"] = "true"
            props["PGROUP"] = str(self.producer_group)
        route = self.route(topic)
        if not route.write_queues:
            raise ConfigurationError(f"RocketMQ topic {topic!r} has no writable queue")
        mq = queue or route.write_queues[next(self._next_queue) % len(route.write_queues)]
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
        try:
            response = self.broker(address).request(command, self.request_timeout)
        except RemotingError:
            self.route(topic, fresh=True)  # the broker may have moved
            raise
        _expect(response, _STORED, f"sending to {topic} on {address}")
        fields = response.ext_fields
        try:
            return SendResult(
                msg_id=props["UNIQ_KEY"], offset_msg_id=fields["msgId"], broker=mq.broker,
                queue_id=int(fields.get("queueId", mq.queue_id)),
                queue_offset=int(fields["queueOffset"]), address=address)
        except (KeyError, ValueError) as exc:
            raise RemotingError(f"RocketMQ at {address} answered a send without where it "
                                f"stored the message ({exc})") from None

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
        route = self.route(topic)
        address = route.brokers[queue.broker]
        flags = _PULL_SUBSCRIPTION | (_PULL_SUSPEND if wait_ms else 0)
        command = Command(RequestCode.PULL_MESSAGE, {
            "consumerGroup": group, "topic": topic, "queueId": str(queue.queue_id),
            "queueOffset": str(offset), "maxMsgNums": str(max_messages),
            "sysFlag": str(flags), "commitOffset": "0",
            "suspendTimeoutMillis": str(wait_ms), "subscription": "*",
            "subVersion": str(self._sub_version), "expressionType": "TAG",
        })
        response = self.broker(address).request(command,
                                                self.request_timeout + wait_ms / 1000)
        fields = response.ext_fields
        try:
            next_offset = int(fields.get("nextBeginOffset", offset))
            bounds = int(fields.get("minOffset", 0)), int(fields.get("maxOffset", 0))
        except ValueError as exc:
            raise RemotingError(f"RocketMQ at {address} answered a pull with bad offsets "
                                f"({exc})") from None
        if response.code == ResponseCode.SUCCESS:
            messages = decode_messages(response.body)
        elif response.code in (ResponseCode.PULL_NOT_FOUND,
                               ResponseCode.PULL_RETRY_IMMEDIATELY,
                               ResponseCode.PULL_OFFSET_MOVED):
            messages = []
        else:
            _expect_success(response, f"pulling {topic} queue {queue.queue_id} on {address}")
            messages = []
        return PullResult(response.code, messages, next_offset, *bounds)

    # -- requests from brokers -----------------------------------------------------------

    def _on_request(self, conn: Connection, command: Command) -> None:
        if command.code == RequestCode.CHECK_TRANSACTION_STATE:
            self._check(conn, command)
        elif command.code == RequestCode.NOTIFY_CONSUMER_IDS_CHANGED:
            pass  # no consumer in this client yet
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


__all__ = ["MessageQueue", "PullResult", "RemotingClient", "Route", "SendResult",
           "StoredMessage"]

