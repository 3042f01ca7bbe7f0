"""The RocketMQ adapter's own logic, without a broker: configuration, message
conversion, error wrapping, check-back routing, and the asyncio form of the producer
(its pool, its scheduled follow-ups, check-backs answered in a loop)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker

import outbox
from outbox import ConfigurationError, Message, TransactionState
from outbox.aio import create_async_engine
from outbox.app import LocalTicket
from outbox.errors import BrokerUnavailableError, PublishError
from outbox.schema import utcnow
from outbox_rocketmq import (
    MessageIdFrom,
    RocketMQConfig,
    RocketMQSubscriber,
    RocketMQTransactionalProducer,
    _client,
    mapping,
)

rocketmq = pytest.importorskip("rocketmq")
SECRET = "s3cr3t-key-value"


def test_config_refuses_bad_endpoints_and_half_credentials() -> None:
    with pytest.raises(ConfigurationError, match="host:port"):
        RocketMQConfig("localhost")
    with pytest.raises(ConfigurationError, match="both"):
        RocketMQConfig(access_key="ak")
    with pytest.raises(ConfigurationError, match="positive"):
        RocketMQConfig(request_timeout=0)


def test_the_secret_key_is_not_in_the_config_repr() -> None:
    config = RocketMQConfig(access_key="ak", secret_key=SECRET)
    assert SECRET not in repr(config)
    assert "ak" in repr(config)


def fake_received(out: Any, *, keys: Any = None, attempt: int = 1,
                  message_id: str | None = "01ROCKETMQID") -> SimpleNamespace:
    """A message as the 5.x client hands a received one over."""
    return SimpleNamespace(
        topic=out.topic, body=out.body, properties=dict(out.properties),
        keys=set(out.keys) if keys is None else keys, tag=out.tag,
        delivery_attempt=attempt, message_id=message_id)


def test_message_round_trip_keeps_id_key_tag_headers() -> None:
    message = Message(topic="t", payload=b"\x00\xffbody", id="m-1", key="k", tag="tg",
                      headers={"a": "1", "empty": "", "KEYS": "not RocketMQ's",
                               "outbox-created-at": "2026-12-01T09:30:00.123456Z",
                               "with space": "x", "OUTBOX_MINE": "y", "sep": "a\x01b"})
    rmq = _client.to_rocketmq(message)
    assert rmq.topic == "t" and rmq.body == b"\x00\xffbody"
    back = _client.from_rocketmq(rmq)
    assert back == message
    delivery = _client.to_delivery(fake_received(rmq, attempt=3), MessageIdFrom())
    assert delivery.to_message() == message
    assert delivery.attempt == 3


def test_headers_travel_as_native_properties_a_java_service_can_read() -> None:
    message = Message(topic="t", payload=b"{}", id="m-1",
                      headers={"traceId": "abc", "outbox-created-at": "2026-12-01T09:30:00Z",
                               "KEYS": "clash", "blank": " "})
    properties = dict(_client.to_rocketmq(message).properties)
    assert properties["traceId"] == "abc"
    assert properties[mapping.MESSAGE_ID_PROPERTY] == "m-1"
    assert properties["OUTBOX_CREATED_AT"] == "2026-12-01T09:30:00Z"
    # What RocketMQ cannot carry under its own name goes packed, and comes back.
    assert "KEYS" not in properties and "blank" not in properties
    assert json.loads(properties[mapping.HEADERS_PROPERTY]) == {"KEYS": "clash", "blank": " "}
    assert "outbox-created-at" not in properties and "traceId" not in json.loads(
        properties[mapping.HEADERS_PROPERTY])


def test_a_java_message_reaches_the_handler_with_its_properties_and_a_fixed_key() -> None:
    java = rocketmq.Message()
    java.topic, java.body = "bank-transfer", b'{"txNo":"T-1","amount":100.5}'
    java.add_property("traceId", "t-9")
    for _ in range(20):  # the client keeps keys in a set: no order to rely on
        received = fake_received(java, keys={"T-1", "acct-7", "A-0"})
        delivery = _client.to_delivery(received, MessageIdFrom.json_field("txNo"))
        assert delivery.key == "A-0"
        assert delivery.headers[mapping.KEYS_HEADER] == "A-0 T-1 acct-7"
    assert delivery.message_id == "T-1"
    assert delivery.headers["traceId"] == "t-9"
    message = delivery.to_message()
    assert (message.id, message.key, message.headers["traceId"]) == ("T-1", "A-0", "t-9")


def test_earlier_messages_with_every_header_packed_still_decode() -> None:
    old = rocketmq.Message()
    old.topic, old.body = "t", b"{}"
    old.add_property(mapping.MESSAGE_ID_PROPERTY, "m-0")
    old.add_property(mapping.HEADERS_PROPERTY,
                     '{"a":"1","outbox-created-at":"2026-11-30T10:00:00"}')
    message = _client.from_rocketmq(fake_received(old))
    assert message.headers == {"a": "1", "outbox-created-at": "2026-11-30T10:00:00"}


@pytest.mark.parametrize(
    ("id_from", "expected"),
    [
        (MessageIdFrom(), None),
        (MessageIdFrom.property("bizId"), "B-1"),
        (MessageIdFrom.property("nope", "bizId"), "B-1"),
        (MessageIdFrom.keys(), "K-1"),
        (MessageIdFrom.json_field("txNo"), "T-7"),
        (MessageIdFrom.json_field("transfer", "seq"), "42"),
        (MessageIdFrom.json_field("missing"), None),
        (MessageIdFrom.rocketmq_id(), "01ROCKETMQID"),
        (MessageIdFrom.outbox_then(MessageIdFrom.json_field("txNo")), "T-7"),
    ],
)
def test_the_deduplication_id_comes_from_where_the_user_says(
    id_from: MessageIdFrom, expected: str | None,
) -> None:
    foreign = rocketmq.Message()
    foreign.topic, foreign.body = "t", b'{"txNo":"T-7","transfer":{"seq":42}}'
    foreign.add_property("bizId", "B-1")
    delivery = _client.to_delivery(fake_received(foreign, keys={"K-1"}), id_from)
    assert delivery.message_id == expected


def test_our_id_wins_over_the_fallbacks_when_the_message_has_it() -> None:
    ours = _client.to_rocketmq(Message(topic="t", payload=b'{"txNo":"T-7"}', id="m-5"))
    id_from = MessageIdFrom.outbox_then(MessageIdFrom.json_field("txNo"))
    assert _client.to_delivery(fake_received(ours), id_from).message_id == "m-5"


def test_id_sources_refuse_empty_names() -> None:
    with pytest.raises(ConfigurationError, match="property names"):
        MessageIdFrom.property()
    with pytest.raises(ConfigurationError, match="field name"):
        MessageIdFrom.json_field("")


def test_a_received_message_without_outbox_id_is_not_a_message() -> None:
    received = SimpleNamespace(topic="t", body=b"{}", properties={}, keys=set(), tag=None,
                               delivery_attempt=1, message_id="01X")
    with pytest.raises(outbox.DecodeError, match="no message id"):
        _client.to_delivery(received, MessageIdFrom()).to_message()


def test_the_dead_letter_copy_keeps_keys_tag_ids_and_properties() -> None:
    java = rocketmq.Message()
    java.topic, java.body, java.tag = "bank-transfer", b'{"txNo":"T-3"}', "debit"
    java.add_property("traceId", "t-1")
    received = fake_received(java, keys={"T-3", "acct-1"}, message_id="01ORIGINAL")
    subscriber = RocketMQSubscriber(RocketMQConfig(), "bank-transfer", "g",
                                    dead_letter_topic="bank-transfer-dlq",
                                    message_id_from=MessageIdFrom.json_field("txNo"))
    delivery = _client.to_delivery(received, subscriber.message_id_from)
    copy = subscriber._dead_copy(delivery, "handler gave up")
    properties = dict(copy.properties)
    assert copy.topic == "bank-transfer-dlq" and copy.tag == "debit"
    assert set(copy.keys) == {"T-3", "acct-1"}
    assert properties["traceId"] == "t-1"
    assert properties[mapping.MESSAGE_ID_PROPERTY] == "T-3"
    assert properties["OUTBOX_ORIGINAL_ID"] == "01ORIGINAL"
    assert properties["OUTBOX_DEAD_REASON"] == "handler gave up"
    # A consumer of the dead-letter topic reads the reason as a header.
    back = _client.to_delivery(fake_received(copy), MessageIdFrom())
    assert back.message_id == "T-3"
    assert back.headers["outbox-dead-reason"] == "handler gave up"


def _client_error(name: str, text: str) -> Exception:
    cls: type[Exception] = type(name, (Exception,), {})
    return cls(text)


@pytest.mark.parametrize(
    ("name", "text", "expected", "words"),
    [
        ("UnauthorizedException", "40101, bad signature", ConfigurationError, "credentials"),
        ("IllegalArgumentException",
         "current message type not match with queue accept message types", ConfigurationError,
         "MIXED"),
        ("NotFoundException", "40402 no topic route", ConfigurationError, "mqadmin"),
        ("PayloadTooLargeException", "body too large", PublishError, "refused the message"),
        ("AioRpcError", "failed to connect to all addresses", BrokerUnavailableError,
         "not reachable"),
    ],
)
def test_client_errors_are_wrapped_with_what_to_do(
    name: str, text: str, expected: type[Exception], words: str
) -> None:
    config = RocketMQConfig("127.0.0.1:8081", access_key="ak", secret_key=SECRET)
    error = _client.wrap_error(_client_error(name, text), config, "sending")
    assert type(error) is expected
    assert words in str(error)
    assert SECRET not in str(error)


def test_route_failure_means_missing_topic_only_when_the_proxy_listens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = RocketMQConfig()
    exc = Exception("failed to fetch topic:nope route.")
    monkeypatch.setattr(_client, "proxy_listens", lambda _config: True)
    assert isinstance(_client.wrap_error(exc, config, "x"), ConfigurationError)
    monkeypatch.setattr(_client, "proxy_listens", lambda _config: False)
    assert isinstance(_client.wrap_error(exc, config, "x"), BrokerUnavailableError)


class FakeListener:
    def __init__(self, state: TransactionState) -> None:
        self.state = state
        self.checked: list[str] = []

    def check(self, message: Message) -> TransactionState:
        self.checked.append(message.id)
        return self.state


def answer(adapter: RocketMQTransactionalProducer, out: Any) -> TransactionState:
    """The producer's answer to a check-back of ``out`` (a 5.x client message)."""
    return adapter._answer(_client.received(out), out.tag)


def _outbox_with(adapter: RocketMQTransactionalProducer, state: TransactionState) -> Any:
    app = outbox.Outbox(sessionmaker(), delivery=adapter)
    app.listener = FakeListener(state)  # type: ignore[assignment]
    return app


def test_check_back_goes_to_the_outbox_that_registered_the_topic() -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a", "b"])
    app_a = _outbox_with(adapter, TransactionState.COMMIT)
    app_b = _outbox_with(adapter, TransactionState.ROLLBACK)
    adapter.register("a", app_a)
    adapter.register("b", app_b)
    for topic, expected in (("a", TransactionState.COMMIT), ("b", TransactionState.ROLLBACK)):
        msg = _client.to_rocketmq(Message(topic=topic, payload=b"{}", id=f"id-{topic}"))
        assert answer(adapter, msg) is expected
    assert app_a.listener.checked == ["id-a"]
    assert app_b.listener.checked == ["id-b"]


def test_unknown_answers_ask_again_and_foreign_messages_are_left_to_their_producer() -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"])
    adapter.register("a", _outbox_with(adapter, TransactionState.UNKNOWN))
    ours = _client.to_rocketmq(Message(topic="a", payload=b"{}", id="x"))
    assert answer(adapter, ours) is TransactionState.UNKNOWN
    foreign = rocketmq.Message()
    foreign.topic, foreign.body = "a", b"{}"
    # Another producer of the group wrote it (a Java service): only it can tell, so
    # never ROLLBACK; the broker asks again, and sooner or later asks that producer.
    assert answer(adapter, foreign) is TransactionState.UNKNOWN


def test_register_refuses_unknown_topics_and_a_second_database() -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"])
    first = outbox.Outbox(sessionmaker(), delivery=adapter)
    adapter.register("a", first)
    with pytest.raises(ConfigurationError, match="another database"):
        adapter.register("a", outbox.Outbox(sessionmaker(), delivery=adapter))
    with pytest.raises(ConfigurationError, match="not among"):
        adapter.register("zzz", first)


class _FakeConsumer:
    """A SimpleConsumer whose receive raises what ``errors`` says, in turn."""

    started: list[_FakeConsumer] = []
    errors: list[Exception | None] = []

    def __init__(self, *_args: Any) -> None:
        self.stopped = False
        self.await_duration = 1

    def startup(self) -> None:
        _FakeConsumer.started.append(self)

    def shutdown(self) -> None:
        self.stopped = True

    def _retrieve_topic_route_data(self, _topic: str) -> Any:
        """A NORMAL topic's route (the subscriber reads the topic's type at start)."""
        return SimpleNamespace(message_queues=[SimpleNamespace(accept_message_types=[1])])

    def receive(self, _count: int, _invisible: int) -> list[Any]:
        error = _FakeConsumer.errors.pop(0) if _FakeConsumer.errors else None
        if error is not None:
            raise error
        return []


def _fake_subscriber(monkeypatch: pytest.MonkeyPatch) -> Any:
    from outbox_rocketmq import RocketMQSubscriber, subscriber

    fake = SimpleNamespace(SimpleConsumer=_FakeConsumer, FilterExpression=lambda: None)
    monkeypatch.setattr(subscriber, "rocketmq", lambda: fake)
    monkeypatch.setattr(subscriber, "client_configuration", lambda _config: None)
    _FakeConsumer.started, _FakeConsumer.errors = [], []
    return RocketMQSubscriber(RocketMQConfig(), "t", "g", dead_letter_topic="dlq")


def test_a_consumer_that_lost_the_proxy_is_replaced_on_the_next_fetch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: after a proxy restart the old client failed (or received nothing)
    # for ever; bank2 stopped consuming until it was restarted itself.
    sub = _fake_subscriber(monkeypatch)
    _FakeConsumer.errors = [_client_error("AioRpcError", "failed to connect to all addresses")]
    with pytest.raises(BrokerUnavailableError):
        sub.fetch(1, 0)
    first = _FakeConsumer.started[0]
    assert first.stopped
    assert sub.fetch(1, 0) == []
    assert len(_FakeConsumer.started) == 2 and not _FakeConsumer.started[1].stopped


def test_settings_null_is_patience_after_startup_and_a_restart_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from outbox_rocketmq import subscriber

    sub = _fake_subscriber(monkeypatch)
    null = _client_error("Exception", "receive failed: settings is null")
    _FakeConsumer.errors = [null]
    assert sub.fetch(1, 0) == []  # a young client: the proxy has not got its settings yet
    assert len(_FakeConsumer.started) == 1 and not _FakeConsumer.started[0].stopped
    monkeypatch.setattr(subscriber, "SETTINGS_GRACE_SECONDS", -1.0)
    _FakeConsumer.errors = [null]  # an old client: the proxy forgot it (it restarted)
    with pytest.raises(BrokerUnavailableError):
        sub.fetch(1, 0)
    assert _FakeConsumer.started[0].stopped
    sub.fetch(1, 0)
    assert len(_FakeConsumer.started) == 2


# -- the asyncio form of the producer, with the client faked --------------------------


class FakeTransaction:
    """The client's transaction: commit/rollback block for ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.outcome: str | None = None

    def commit(self) -> None:
        time.sleep(self.delay)
        self.outcome = "commit"

    def rollback(self) -> None:
        time.sleep(self.delay)
        self.outcome = "rollback"


class FakeAsyncListener:
    def __init__(self, state: TransactionState, delay: float = 0.0) -> None:
        self.state = state
        self.delay = delay
        self.clock = utcnow

    async def acheck(self, message: Message) -> TransactionState:
        await asyncio.sleep(self.delay)
        return self.state


def _async_outbox(adapter: RocketMQTransactionalProducer, state: TransactionState,
                  delay: float = 0.0) -> Any:
    app = outbox.AsyncOutbox(create_async_engine("sqlite+aiosqlite://"), delivery=adapter)
    app.listener = FakeAsyncListener(state, delay)  # type: ignore[assignment]
    adapter.register("a", app)
    return app


@pytest.fixture
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as a service's loop would."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_check_back_of_an_async_outbox_is_answered_in_its_loop(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(request_timeout=0.3), ["a"])
    app = _async_outbox(adapter, TransactionState.COMMIT)
    ours = _client.to_rocketmq(Message(topic="a", payload=b"{}", id="x"))
    # No loop has used the producer yet: ask again.
    assert answer(adapter, ours) is TransactionState.UNKNOWN
    adapter._remember_loop(app, loop_thread)
    assert answer(adapter, ours) is TransactionState.COMMIT
    app.listener.delay = 2.0  # the loop does not answer within request_timeout
    started = time.monotonic()
    assert answer(adapter, ours) is TransactionState.UNKNOWN
    assert time.monotonic() - started < 1.5  # request_timeout 0.3 s, not the loop's 2 s


def test_check_back_asks_again_once_the_outboxs_loop_is_closed() -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"])
    app = _async_outbox(adapter, TransactionState.COMMIT)
    loop = asyncio.new_event_loop()
    adapter._remember_loop(app, loop)
    loop.close()
    ours = _client.to_rocketmq(Message(topic="a", payload=b"{}", id="x"))
    assert answer(adapter, ours) is TransactionState.UNKNOWN


def test_an_async_ticket_schedules_its_end_transaction_and_aclose_waits_for_it() -> None:
    # No broker has topic "a": without the guard row, no start-up check of its type.
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"], guard_after=None)
    transaction = FakeTransaction(delay=1.0)
    adapter._send_half = lambda message: transaction  # type: ignore[method-assign]

    async def scenario() -> None:
        app = _async_outbox(adapter, TransactionState.COMMIT)
        ticket = await adapter.aprepare(app, Message(topic="a", payload=b"{}", id="m"))
        started = time.monotonic()
        ticket.committed()
        assert time.monotonic() - started < 0.5  # the loop is not blocked (the end takes 1 s)
        assert transaction.outcome is None
        await adapter.aclose()
        assert transaction.outcome == "commit"

    asyncio.run(scenario())


def test_a_cancelled_aprepare_rolls_back_the_half_message_once_it_is_out() -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"], guard_after=None)
    transaction = FakeTransaction()

    def slow_send(message: Message) -> FakeTransaction:
        time.sleep(0.2)
        return transaction

    adapter._send_half = slow_send  # type: ignore[method-assign]

    async def scenario() -> None:
        app = _async_outbox(adapter, TransactionState.UNKNOWN)
        task = asyncio.create_task(adapter.aprepare(app, Message(topic="a", payload=b"{}")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())  # returns before the half send is out
    deadline = time.monotonic() + 5
    while transaction.outcome is None and time.monotonic() < deadline:
        time.sleep(0.05)
    adapter.close()
    assert transaction.outcome == "rollback"


@pytest.mark.parametrize("fallback", [True, False])
def test_aprepare_falls_back_to_an_outbox_row_only_when_asked(fallback: bool) -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"], fallback_to_outbox=fallback)

    def unreachable(message: Message) -> None:
        raise BrokerUnavailableError("proxy down")

    adapter._send_half = unreachable  # type: ignore[method-assign]

    async def scenario() -> Any:
        app = _async_outbox(adapter, TransactionState.UNKNOWN)
        return await adapter.aprepare(app, Message(topic="a", payload=b"{}"))

    if fallback:
        assert isinstance(asyncio.run(scenario()), LocalTicket)
    else:
        with pytest.raises(BrokerUnavailableError, match="proxy down"):
            asyncio.run(scenario())


def test_a_name_server_address_selects_the_remoting_client() -> None:
    config = RocketMQConfig(namesrv="127.0.0.1:19876", producer_group="bank1")
    assert config.where == "name server 127.0.0.1:19876 (remoting)"
    assert RocketMQConfig().where == "proxy 127.0.0.1:8081 (gRPC)"
    with pytest.raises(ConfigurationError, match="host:port of the name server"):
        RocketMQConfig(namesrv="localhost")
    with pytest.raises(ConfigurationError, match=r"5\.x proxy"):
        RocketMQConfig(namesrv="127.0.0.1:9876", access_key="ak", secret_key=SECRET)
    with pytest.raises(ConfigurationError, match="producer_group"):
        RocketMQConfig(namesrv="127.0.0.1:9876", producer_group=" ")


def test_check_backs_near_the_brokers_limit_are_warned_about_and_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"], check_limit=15)
    adapter.register("a", _outbox_with(adapter, TransactionState.UNKNOWN))
    out = _client.to_rocketmq(Message(topic="a", payload=b"{}", id="m-near"))
    caplog.set_level(logging.DEBUG, logger="outbox")
    for checks in (1, 9, 10, 12):
        received = _client.received(out)
        received.properties["TRANSACTION_CHECK_TIMES"] = str(checks)
        assert adapter._answer(received, None) is TransactionState.UNKNOWN
    events = [getattr(r, "outbox", {}) for r in caplog.records]
    near = [e for e in events if e.get("event") == "check_back_near_limit"]
    assert [e["checks"] for e in near] == [10, 12]  # from two thirds of 15 on
    assert near[0]["message_id"] == "m-near" and near[0]["limit"] == 15
    assert adapter.near_limit == {"m-near": 12}
    with pytest.raises(ConfigurationError, match="transactionCheckMax"):
        RocketMQTransactionalProducer(RocketMQConfig(), ["a"], check_limit=0)


@pytest.mark.parametrize(("age_s", "settled"), [(1, True), (120, False)])
def test_the_guard_row_is_settled_only_after_a_commit_in_time(
    monkeypatch: pytest.MonkeyPatch, age_s: int, settled: bool,
) -> None:
    # A commit the broker took long after the message was built may have come after it
    # gave up on the half message: the guard row must then stay for the relay.
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"])
    app = outbox.Outbox(sessionmaker(), delivery=adapter)  # 60 s local timeout
    created = (utcnow() - dt.timedelta(seconds=age_s)).isoformat() + "Z"
    message = Message(topic="a", payload=b"{}", id="g-1",
                      headers={"outbox-created-at": created})
    settles: list[str] = []
    monkeypatch.setattr(adapter, "_end", lambda *a: True)
    monkeypatch.setattr(adapter, "_settle_guard", lambda _o, m: settles.append(m.id))
    ticket = SimpleNamespace(transaction=object(), message=message, guarded=True, outbox=app)
    adapter._follow_up(ticket, TransactionState.COMMIT)  # type: ignore[arg-type]
    assert settles == (["g-1"] if settled else [])
