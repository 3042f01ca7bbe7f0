"""The RocketMQ adapter's own logic, without a broker: configuration, message
conversion, error wrapping, check-back routing, and the asyncio form of the producer
(its pool, its scheduled follow-ups, check-backs answered in a loop)."""

from __future__ import annotations

import asyncio
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
from outbox_rocketmq import RocketMQConfig, RocketMQTransactionalProducer, _client

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


def test_message_round_trip_keeps_id_key_tag_headers() -> None:
    message = Message(topic="t", payload=b"\x00\xffbody", id="m-1", key="k", tag="tg",
                      headers={"a": "1", "empty": ""})
    rmq = _client.to_rocketmq(message)
    assert rmq.topic == "t" and rmq.body == b"\x00\xffbody"
    back = _client.from_rocketmq(rmq)
    assert back == message
    delivery = _client.to_delivery(SimpleNamespace(
        topic="t", body=rmq.body, properties=rmq.properties, keys=rmq.keys, tag=rmq.tag,
        delivery_attempt=3))
    assert delivery.to_message() == message
    assert delivery.attempt == 3


def test_a_received_message_without_outbox_id_is_not_a_message() -> None:
    received = SimpleNamespace(topic="t", body=b"{}", properties={}, keys=set(), tag=None,
                               delivery_attempt=1)
    with pytest.raises(outbox.DecodeError, match="no message id"):
        _client.to_delivery(received).to_message()


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
    resolution = rocketmq.TransactionResolution
    for topic, expected in (("a", resolution.COMMIT), ("b", resolution.ROLLBACK)):
        msg = _client.to_rocketmq(Message(topic=topic, payload=b"{}", id=f"id-{topic}"))
        assert adapter._on_check(msg) == expected
    assert app_a.listener.checked == ["id-a"]
    assert app_b.listener.checked == ["id-b"]


def test_unknown_answers_ask_again_and_foreign_messages_are_rolled_back() -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"])
    adapter.register("a", _outbox_with(adapter, TransactionState.UNKNOWN))
    resolution = rocketmq.TransactionResolution
    ours = _client.to_rocketmq(Message(topic="a", payload=b"{}", id="x"))
    assert adapter._on_check(ours) == resolution.TRANSACTION_RESOLUTION_UNSPECIFIED
    foreign = rocketmq.Message()
    foreign.topic, foreign.body = "a", b"{}"
    assert adapter._on_check(foreign) == resolution.ROLLBACK


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
    resolution = rocketmq.TransactionResolution
    # No loop has used the producer yet: ask again.
    assert adapter._on_check(ours) == resolution.TRANSACTION_RESOLUTION_UNSPECIFIED
    adapter._remember_loop(app, loop_thread)
    assert adapter._on_check(ours) == resolution.COMMIT
    app.listener.delay = 2.0  # the loop does not answer within request_timeout
    started = time.monotonic()
    assert adapter._on_check(ours) == resolution.TRANSACTION_RESOLUTION_UNSPECIFIED
    assert time.monotonic() - started < 1.0


def test_check_back_asks_again_once_the_outboxs_loop_is_closed() -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"])
    app = _async_outbox(adapter, TransactionState.COMMIT)
    loop = asyncio.new_event_loop()
    adapter._remember_loop(app, loop)
    loop.close()
    ours = _client.to_rocketmq(Message(topic="a", payload=b"{}", id="x"))
    ask_again = rocketmq.TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED
    assert adapter._on_check(ours) == ask_again


def test_an_async_ticket_schedules_its_end_transaction_and_aclose_waits_for_it() -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"])
    transaction = FakeTransaction(delay=0.3)
    adapter._send_half = lambda message: transaction  # type: ignore[method-assign]

    async def scenario() -> None:
        app = _async_outbox(adapter, TransactionState.COMMIT)
        ticket = await adapter.aprepare(app, Message(topic="a", payload=b"{}", id="m"))
        started = time.monotonic()
        ticket.committed()
        assert time.monotonic() - started < 0.05  # the loop is not blocked
        assert transaction.outcome is None
        await adapter.aclose()
        assert transaction.outcome == "commit"

    asyncio.run(scenario())


def test_a_cancelled_aprepare_rolls_back_the_half_message_once_it_is_out() -> None:
    adapter = RocketMQTransactionalProducer(RocketMQConfig(), ["a"])
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
