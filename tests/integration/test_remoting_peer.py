"""The remoting client against a fake peer on loopback that misbehaves on purpose: a
truncated frame, a wrong length, garbage, an unknown response code, silence, a peer
that closes mid-request. Each is a clear error at once (or after the request
timeout, for silence), never a hang; and a broker's check-back is answered."""

from __future__ import annotations

import itertools
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from outbox import Message
from outbox.errors import BrokerUnavailableError, ConfigurationError, PublishError
from outbox_rocketmq import RocketMQConfig, RocketMQPublisher
from outbox_rocketmq.remoting import consumer as remoting_consumer
from outbox_rocketmq.remoting.client import RemotingClient
from outbox_rocketmq.remoting.connection import Connection, RemotingError
from outbox_rocketmq.remoting.consumer import RemotingSubscriber
from outbox_rocketmq.remoting.protocol import (
    TRANSACTION_COMMIT_TYPE,
    Command,
    FrameReader,
    RequestCode,
    ResponseCode,
    decode_batch,
    decode_properties,
    encode_properties,
    encode_stored,
    hash_index,
)

#: What the fake peer does with each request: return the bytes to send back (or
#: None to say nothing), or raise _Close to hang up.
Behaviour = Callable[[Command, socket.socket], bytes | None]


class _Close(Exception):
    pass


class FakePeer:
    """A one-connection-at-a-time TCP server on 127.0.0.1 speaking frames."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.received: list[Command] = []
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        reader = FrameReader()
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for command in reader.feed(data):
                    self.received.append(command)
                    reply = self.behaviour(command, conn)
                    if reply:
                        conn.sendall(reply)
        except (_Close, OSError):
            conn.close()

    def close(self) -> None:
        self.server.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def peer_factory() -> Iterator[Callable[[Behaviour], FakePeer]]:
    peers: list[FakePeer] = []

    def make(behaviour: Behaviour) -> FakePeer:
        peers.append(FakePeer(behaviour))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def respond(command: Command, code: int = ResponseCode.SUCCESS, body: bytes = b"",
            **fields: str) -> bytes:
    return command.response(code, None, fields, body).encode()


def timed(fn: Callable[[], Any]) -> tuple[BaseException | None, float]:
    start = time.monotonic()
    try:
        fn()
    except BaseException as exc:
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


def test_a_request_gets_its_own_response_among_others(peer_factory: Any) -> None:
    def behaviour(command: Command, _conn: socket.socket) -> bytes:
        stray = Command(0, opaque=99999, flag=1).encode()  # nobody waits for it
        return stray + respond(command, echo=command.ext_fields["x"])

    peer = peer_factory(behaviour)
    conn = Connection(peer.address)
    try:
        answers = [conn.request(Command(10, {"x": str(i)}), 5).ext_fields["echo"]
                   for i in range(20)]
    finally:
        conn.close()
    assert answers == [str(i) for i in range(20)]


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (lambda c: c.response(0).encode()[:-5], "middle of a frame"),
        (lambda c: struct.pack(">I", 2) + b"xx", "broke the remoting protocol"),
        (lambda c: struct.pack(">I", 1 << 30), "broke the remoting protocol"),
        (lambda c: struct.pack(">II", 9, 5) + b"{nope", "broke the remoting protocol"),
    ],
    ids=["truncated", "too-short", "too-long", "garbage-header"],
)
def test_a_broken_answer_fails_the_request_at_once(
    peer_factory: Any, reply: Callable[[Command], bytes], words: str,
) -> None:
    def behaviour(command: Command, conn: socket.socket) -> bytes:
        conn.sendall(reply(command))
        raise _Close

    conn = Connection(peer_factory(behaviour).address)
    error, took = timed(lambda: conn.request(Command(10), timeout=30))
    assert isinstance(error, RemotingError) and words in str(error)
    assert took < 5, "failed at once, not after the request timeout"
    assert conn.closed
    # The connection stays unusable: later requests fail at once too.
    error, took = timed(lambda: conn.request(Command(10), timeout=30))
    assert isinstance(error, RemotingError) and took < 1


def test_a_peer_that_hangs_up_mid_request_fails_it_at_once(peer_factory: Any) -> None:
    def behaviour(_command: Command, _conn: socket.socket) -> bytes:
        raise _Close

    conn = Connection(peer_factory(behaviour).address)
    error, took = timed(lambda: conn.request(Command(10), timeout=30))
    assert isinstance(error, RemotingError) and "closed the connection" in str(error)
    assert took < 5


def test_a_silent_peer_times_out(peer_factory: Any) -> None:
    conn = Connection(peer_factory(lambda c, s: None).address)
    try:
        error, took = timed(lambda: conn.request(Command(10), timeout=0.3))
    finally:
        conn.close()
    assert isinstance(error, RemotingError) and "did not answer" in str(error)
    assert 0.25 < took < 3


def test_nothing_listening_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(RemotingError, match="cannot connect"):
        Connection(f"127.0.0.1:{port}")


def route_body(address: str, queues: int = 2) -> bytes:
    return json.dumps({
        "brokerDatas": [{"brokerName": "b", "cluster": "c", "brokerAddrs": {"0": address}}],
        "queueDatas": [{"brokerName": "b", "perm": 6, "readQueueNums": queues,
                        "writeQueueNums": queues, "topicSysFlag": 0}],
    }).encode()


def broker_behaviour(address_of: Callable[[], str], send_code: int = ResponseCode.SUCCESS,
                     check: bytes | None = None) -> Behaviour:
    """Name server and broker in one: routes point at itself."""

    def behaviour(command: Command, conn: socket.socket) -> bytes | None:
        if command.code == RequestCode.GET_ROUTEINFO_BY_TOPIC:
            if command.ext_fields["topic"] == "missing":
                return respond(command, ResponseCode.TOPIC_NOT_EXIST)
            return respond(command, body=route_body(address_of()))
        if command.code == RequestCode.HEART_BEAT:
            if check is not None:
                conn.sendall(check)
            return respond(command)
        if command.code == RequestCode.SEND_MESSAGE:
            return respond(command, send_code, msgId="7F00000100005199000000000001E240",
                           queueId=command.ext_fields["queueId"], queueOffset="7")
        if command.is_oneway:
            return None
        return respond(command)

    return behaviour


def test_sends_go_round_the_queues_and_an_unknown_answer_is_an_error(peer_factory: Any) -> None:
    holder: dict[str, str] = {}
    peer = peer_factory(broker_behaviour(lambda: holder["a"]))
    holder["a"] = peer.address
    client = RemotingClient(peer.address, producer_group="g").start(["t"])
    try:
        results = [client.send("t", b"{}", {"OUTBOX_MESSAGE_ID": f"m{i}"}, keys=["k"])
                   for i in range(4)]
        assert [r.queue_id for r in results] == [0, 1, 0, 1]
        sent = [c for c in peer.received if c.code == RequestCode.SEND_MESSAGE]
        assert "KEYS\x01k\x02" in sent[0].ext_fields["properties"]
        with pytest.raises(ConfigurationError, match="does not exist"):
            client.route("missing")
    finally:
        client.close()

    for name, (code, error, words) in {
        "odd": (4242, RemotingError, "code 4242"),
        "refused": (ResponseCode.MESSAGE_ILLEGAL, PublishError, "refused"),
    }.items():
        other = peer_factory(broker_behaviour(lambda n=name: holder[n], send_code=code))
        holder[name] = other.address
        client = RemotingClient(other.address, producer_group="g")
        try:
            with pytest.raises(error, match=words):
                client.send("t", b"{}", {})
        finally:
            client.close()


def test_a_check_back_from_the_broker_is_answered_with_end_transaction(
    peer_factory: Any,
) -> None:
    props = encode_properties({"UNIQ_KEY": "U1", "PGROUP": "g", "OUTBOX_MESSAGE_ID": "m-1"})
    check = Command(RequestCode.CHECK_TRANSACTION_STATE, {
        "tranStateTableOffset": "7", "commitLogOffset": "123456", "msgId": "U1",
        "transactionId": "U1", "offsetMsgId": "x"},
        body=encode_stored("t", b"{}", properties=props), flag=2).encode()
    holder: dict[str, str] = {}
    peer = peer_factory(broker_behaviour(lambda: holder["a"], check=check))
    holder["a"] = peer.address
    asked: list[str] = []

    def checker(stored: Any) -> int:
        asked.append(stored.properties["OUTBOX_MESSAGE_ID"])
        return TRANSACTION_COMMIT_TYPE

    client = RemotingClient(peer.address, producer_group="g", checker=checker).start(["t"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not [
                c for c in peer.received if c.code == RequestCode.END_TRANSACTION]:
            time.sleep(0.02)
    finally:
        client.close()
    [end] = [c for c in peer.received if c.code == RequestCode.END_TRANSACTION]
    assert asked == ["m-1"]
    assert end.ext_fields["commitOrRollback"] == str(TRANSACTION_COMMIT_TYPE)
    assert end.ext_fields["fromTransactionCheck"] == "true"
    assert (end.ext_fields["commitLogOffset"], end.ext_fields["tranStateTableOffset"],
            end.ext_fields["producerGroup"]) == ("123456", "7", "g")


def test_an_unknown_request_from_the_peer_is_answered_not_supported(peer_factory: Any) -> None:
    def behaviour(command: Command, conn: socket.socket) -> bytes:
        conn.sendall(Command(7777, opaque=555).encode())  # the peer asks us something
        return respond(command)

    peer = peer_factory(behaviour)
    client = RemotingClient(peer.address)
    conn = client.broker(peer.address)
    try:
        conn.request(Command(10), 5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(peer.received) < 2:
            time.sleep(0.02)
    finally:
        client.close()
    answer = peer.received[1]
    assert answer.is_response and answer.opaque == 555
    assert answer.code == ResponseCode.REQUEST_CODE_NOT_SUPPORTED


# -- batches, long polls and queue locks against a fake broker ------------------------


def batch_broker(address_of: Callable[[], str], batch_code: int = ResponseCode.SUCCESS,
                 pull: Behaviour | None = None, lock_body: bytes | None = None) -> Behaviour:
    """:func:`broker_behaviour` that also stores batches (or refuses them with
    ``batch_code``), answers pulls with ``pull`` (silence by default) and queue locks
    with ``lock_body``."""
    plain = broker_behaviour(address_of)
    stored = itertools.count()

    def behaviour(command: Command, conn: socket.socket) -> bytes | None:
        if command.code == RequestCode.SEND_BATCH_MESSAGE:
            if batch_code != ResponseCode.SUCCESS:
                return respond(command, batch_code)
            items = decode_batch(command.body)
            first = next(stored)
            for _ in items[1:]:
                next(stored)
            return respond(command, msgId=",".join(f"ID{first + i}" for i in range(len(items))),
                           queueId=command.ext_fields["e"], queueOffset=str(first))
        if command.code == RequestCode.PULL_MESSAGE:
            return pull(command, conn) if pull is not None else None
        if command.code == RequestCode.LOCK_BATCH_MQ and lock_body is not None:
            return respond(command, body=lock_body)
        return plain(command, conn)

    return behaviour


def test_a_batch_goes_per_queue_as_send_batch_message_each_message_its_own(
    peer_factory: Any,
) -> None:
    holder: dict[str, str] = {}
    peer = peer_factory(batch_broker(lambda: holder["a"]))
    holder["a"] = peer.address
    publisher = RocketMQPublisher(RocketMQConfig(namesrv=peer.address), ["t"])
    messages = [Message(topic="t", id=f"m{i}", key=f"k{i % 3}", payload=b"%d" % i,
                        headers={"traceId": f"t{i}"}) for i in range(12)]
    try:
        publisher.publish_batch(messages)
    finally:
        publisher.close()
    batches = [c for c in peer.received if c.code == RequestCode.SEND_BATCH_MESSAGE]
    assert not [c for c in peer.received if c.code == RequestCode.SEND_MESSAGE]
    by_queue = {int(c.ext_fields["e"]): c for c in batches}
    assert len(batches) == len(by_queue) == len({hash_index(f"k{j}", 2) for j in range(3)})
    for queue, command in by_queue.items():
        assert (command.ext_fields["b"], command.ext_fields["m"]) == ("t", "true")
        items = [decode_properties(i.properties) for i in decode_batch(command.body)]
        mine = [m for m in messages if m.key and hash_index(m.key, 2) == queue]
        assert [p["OUTBOX_MESSAGE_ID"] for p in items] == [m.id for m in mine]  # in order
        assert [p["traceId"] for p in items] == [m.headers["traceId"] for m in mine]
        assert len({p["UNIQ_KEY"] for p in items}) == len(items)


def test_a_refused_batch_raises_naming_how_many_failed(peer_factory: Any) -> None:
    holder: dict[str, str] = {}
    peer = peer_factory(batch_broker(lambda: holder["a"], batch_code=ResponseCode.SYSTEM_BUSY))
    holder["a"] = peer.address
    publisher = RocketMQPublisher(RocketMQConfig(namesrv=peer.address), ["t"])
    try:
        with pytest.raises(BrokerUnavailableError, match=r"publishing a batch: \d+ of 6"):
            publisher.publish_batch([Message(topic="t", id=f"m{i}", payload=b"{}")
                                     for i in range(6)])
    finally:
        publisher.close()


def long_poll_subscriber(address: str, monkeypatch: pytest.MonkeyPatch,
                         **kwargs: Any) -> RemotingSubscriber:
    monkeypatch.setattr(remoting_consumer, "LONG_POLL_SECONDS", 0.2)
    return RemotingSubscriber(address, "t", "g", dead_letter_topic="dlq",
                              request_timeout=0.5, **kwargs)


def test_a_long_poll_the_broker_never_answers_is_an_error_not_a_hang(
    peer_factory: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder: dict[str, str] = {}
    peer = peer_factory(batch_broker(lambda: holder["a"]))  # pulls: silence
    holder["a"] = peer.address
    sub = long_poll_subscriber(peer.address, monkeypatch)
    try:
        started = time.monotonic()
        error: BaseException | None = None
        while error is None and time.monotonic() - started < 20:
            try:
                sub.fetch(32, 1.0)
            except RemotingError as exc:
                error = exc
        # The broker may hold a pull 0.2 s plus its 5 s between looks: given up after that.
        assert error is not None and "did not answer a pull" in str(error)
        assert time.monotonic() - started < 10
    finally:
        sub.close()


def test_close_ends_a_fetch_waiting_on_a_long_poll_at_once(
    peer_factory: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder: dict[str, str] = {}
    peer = peer_factory(batch_broker(lambda: holder["a"]))
    holder["a"] = peer.address
    sub = long_poll_subscriber(peer.address, monkeypatch)
    outcome: list[Any] = []
    waiter = threading.Thread(target=lambda: outcome.append(sub.fetch(32, 30.0)))
    waiter.start()
    time.sleep(0.5)
    closed = time.monotonic()
    sub.close()
    waiter.join(5)
    assert not waiter.is_alive() and time.monotonic() - closed < 3
    assert outcome == [[]]
    with pytest.raises(RemotingError, match="closed"):
        sub.fetch(1, 0.1)


@pytest.mark.parametrize("lock_body", [b"{not json", b'{"lockOKMQSet": 7}', b"[]"],
                         ids=["garbage", "wrong-type", "not-an-object"])
def test_a_broken_lock_answer_locks_nothing_and_consumes_nothing(
    peer_factory: Any, monkeypatch: pytest.MonkeyPatch, lock_body: bytes,
) -> None:
    holder: dict[str, str] = {}

    def pull(command: Command, _conn: socket.socket) -> bytes:
        return respond(command, body=encode_stored("t", b"{}"), nextBeginOffset="8")

    peer = peer_factory(batch_broker(lambda: holder["a"], pull=pull, lock_body=lock_body))
    holder["a"] = peer.address
    sub = long_poll_subscriber(peer.address, monkeypatch, orderly=True)
    try:
        assert sub.fetch(32, 0.5) == []
    finally:
        sub.close()
    assert not [c for c in peer.received if c.code == RequestCode.PULL_MESSAGE]
    assert [c for c in peer.received if c.code == RequestCode.LOCK_BATCH_MQ]


def test_an_orderly_member_consumes_only_the_queues_the_broker_locked_for_it(
    peer_factory: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder: dict[str, str] = {}

    def pull(command: Command, _conn: socket.socket) -> bytes:
        offset = int(command.ext_fields["queueOffset"])
        queue = int(command.ext_fields["queueId"])
        if offset > 0:
            return respond(command, ResponseCode.PULL_NOT_FOUND, nextBeginOffset=str(offset))
        props = encode_properties({"OUTBOX_MESSAGE_ID": f"q{queue}", "KEYS": "k"})
        return respond(command, body=encode_stored("t", b"{}", properties=props,
                                                   queue_id=queue, queue_offset=0),
                       nextBeginOffset="1")

    lock = json.dumps({"lockOKMQSet": [{"topic": "t", "brokerName": "b", "queueId": 1}]})
    peer = peer_factory(batch_broker(lambda: holder["a"], pull=pull, lock_body=lock.encode()))
    holder["a"] = peer.address
    sub = long_poll_subscriber(peer.address, monkeypatch, orderly=True)
    try:
        got = sub.fetch(32, 1.0)
        assert [d.message_id for d in got] == ["q1"]
    finally:
        sub.close()
    unlocks = [json.loads(c.body) for c in peer.received
               if c.code == RequestCode.UNLOCK_BATCH_MQ]
    assert [q["queueId"] for u in unlocks for q in u["mqSet"]] == [1]  # released on close
