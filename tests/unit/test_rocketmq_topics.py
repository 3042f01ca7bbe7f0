"""What a 5.x topic accepts (outbox_rocketmq.topics, read from fake routes) and what a
plain send to it carries (_client.for_topic: the FIFO message group, the delivery
timestamp), without a broker."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest

from outbox import ConfigurationError, Message
from outbox.envelope import DELIVER_AT_HEADER, format_utc
from outbox.errors import BrokerUnavailableError
from outbox_rocketmq import AsyncRocketMQPublisher, RocketMQConfig, RocketMQPublisher, _client
from outbox_rocketmq.topics import (
    DELAY,
    FIFO,
    MIXED,
    NORMAL,
    TRANSACTION,
    accepted_types,
    allows_delay,
    allows_normal,
    is_delay,
    is_fifo,
    type_name,
    type_names,
)

pytest.importorskip("rocketmq")

#: The protocol's numbers, as the proxy puts them in a route's queues.
CODES = {"NORMAL": [1], "FIFO": [2], "DELAY": [3], "TRANSACTION": [4], "MIXED": [1, 2, 3, 4]}
NOW = dt.datetime(2026, 12, 1, 9, 30, 0, 250000)
CONFIG = RocketMQConfig("127.0.0.1:8081")


class FakeClient:
    """A started client as far as routes go: ``topic -> [codes per queue]``; a topic
    it has no route for raises what the client raises."""

    def __init__(self, **topics: list[list[int]]) -> None:
        self.topics = topics
        self.asked: list[str] = []

    def _retrieve_topic_route_data(self, topic: str) -> Any:
        self.asked.append(topic)
        if topic not in self.topics:
            raise Exception(f"failed to fetch topic:{topic} route.")
        return SimpleNamespace(message_queues=[
            SimpleNamespace(accept_message_types=set(codes)) for codes in self.topics[topic]])


def typed(kind: str, queues: int = 4) -> FakeClient:
    return FakeClient(t=[CODES[kind]] * queues)


# -- topics: accepted types and what they allow ---------------------------------------


@pytest.mark.parametrize(("kind", "expected"), [
    ("NORMAL", {NORMAL}), ("FIFO", {FIFO}), ("DELAY", {DELAY}),
    ("TRANSACTION", {TRANSACTION}), ("MIXED", MIXED),
])
def test_accepted_types_are_read_from_the_route(kind: str, expected: set[str]) -> None:
    client = typed(kind)
    assert accepted_types(client, "t") == frozenset(expected)
    assert client.asked == ["t"]


def test_unspecified_and_unknown_type_numbers_are_left_out() -> None:
    assert type_names([0, 1, 99]) == {NORMAL}
    assert accepted_types(FakeClient(t=[[0, 1], [5]]), "t") == {NORMAL, "LITE"}


def test_a_route_without_queues_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="no message queues"):
        accepted_types(FakeClient(t=[]), "t")


def test_a_missing_route_raises_what_the_client_raises() -> None:
    with pytest.raises(Exception, match="failed to fetch topic:nope route"):
        accepted_types(FakeClient(), "nope")


@pytest.mark.parametrize(("kind", "normal", "fifo", "delay_ok", "delay"), [
    ("NORMAL", True, False, False, False),
    ("FIFO", False, True, False, False),
    ("DELAY", False, False, True, True),
    ("TRANSACTION", False, False, False, False),
    ("MIXED", True, False, True, False),  # plain sends allowed: not FIFO, not DELAY-only
])
def test_what_each_topic_type_allows(kind: str, normal: bool, fifo: bool, delay_ok: bool,
                                     delay: bool) -> None:
    types = accepted_types(typed(kind), "t")
    assert (allows_normal(types), is_fifo(types), allows_delay(types), is_delay(types)) == (
        normal, fifo, delay_ok, delay)
    assert type_name(types) == kind


def test_type_names_for_people() -> None:
    assert type_name(frozenset()) == "NONE"
    assert type_name(frozenset({NORMAL, DELAY})) == "DELAY+NORMAL"


# -- for_topic: the FIFO message group -----------------------------------------------


def message(key: str | None = "acct-1", *, deliver_at: dt.datetime | None = None,
            id: str = "m-1") -> Message:
    headers = {} if deliver_at is None else {DELIVER_AT_HEADER: format_utc(deliver_at)}
    return Message(topic="t", payload=b"{}", id=id, key=key, headers=headers)


def out_for(kind: str, m: Message) -> Any:
    return _client.for_topic(m, typed(kind), CONFIG, now=NOW)


def test_on_a_fifo_topic_the_key_is_the_message_group() -> None:
    out = out_for("FIFO", message("acct-1"))
    assert out.message_group == "acct-1"
    assert out.delivery_timestamp is None
    assert "acct-1" in out.keys and dict(out.properties)["OUTBOX_KEY"] == "acct-1"


def test_a_message_without_key_is_a_group_of_its_own_its_id() -> None:
    assert out_for("FIFO", message(None, id="m-77")).message_group == "m-77"


@pytest.mark.parametrize("key", ["k" * 65, "k" * 199, "\U0001F600" * 33])  # 66 Java chars
def test_a_key_the_proxy_would_refuse_as_group_becomes_a_stable_digest(key: str) -> None:
    first = out_for("FIFO", message(key)).message_group
    again = out_for("FIFO", message(key, id="m-2")).message_group
    other = out_for("FIFO", message(key + "x")).message_group
    assert first == again != other
    assert first.startswith("sha256-") and len(first) <= _client.MAX_MESSAGE_GROUP


def test_a_key_of_exactly_64_chars_is_kept() -> None:
    assert out_for("FIFO", message("k" * 64)).message_group == "k" * 64
    assert out_for("FIFO", message("\u00e9" * 64)).message_group == "\u00e9" * 64


@pytest.mark.parametrize("group", ["", "  ", "tab\there", "\u0085next-line", "del\x7f"])
def test_what_the_proxy_refuses_as_a_group(group: str) -> None:
    # Message refuses control characters in keys already; ids of other origins may not.
    assert not _client._acceptable_group(group)


@pytest.mark.parametrize("kind", ["NORMAL", "MIXED", "TRANSACTION"])
def test_other_topics_get_no_message_group(kind: str) -> None:
    out = out_for(kind, message("acct-1"))
    assert out.message_group is None and out.delivery_timestamp is None


# -- for_topic: the delivery timestamp -------------------------------------------------


def epoch(when: dt.datetime) -> float:
    return when.replace(tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize("kind", ["DELAY", "MIXED"])
def test_a_delivery_time_ahead_is_the_delivery_timestamp_rounded_up(kind: str) -> None:
    due = NOW + dt.timedelta(seconds=3)  # .25 past a second
    out = out_for(kind, message(deliver_at=due))
    assert out.delivery_timestamp == int(epoch(due)) + 1  # never before it is due
    assert out.message_group is None


@pytest.mark.parametrize("kind", ["NORMAL", "FIFO", "TRANSACTION"])
def test_a_delivery_time_ahead_on_a_topic_without_delay_is_refused(kind: str) -> None:
    due = NOW + dt.timedelta(seconds=30)
    with pytest.raises(ConfigurationError) as caught:
        out_for(kind, message(deliver_at=due))
    text = str(caught.value)
    assert "DELAY topic" in text and "local outbox" in text and f"({kind})" in text
    assert format_utc(due) in text and "m-1" in text


@pytest.mark.parametrize("kind", ["NORMAL", "FIFO", "MIXED"])
def test_a_delivery_time_already_past_goes_at_once(kind: str) -> None:
    out = out_for(kind, message(deliver_at=NOW - dt.timedelta(seconds=1)))
    assert out.delivery_timestamp is None


@pytest.mark.parametrize("deliver_at", [None, NOW, NOW - dt.timedelta(minutes=5)])
def test_on_a_delay_topic_a_due_message_carries_the_current_second(
        deliver_at: dt.datetime | None) -> None:
    # A DELAY topic takes no plain sends; a timestamp already past is delivered at once.
    out = out_for("DELAY", message(deliver_at=deliver_at))
    assert out.delivery_timestamp == int(epoch(NOW))


# -- for_topic without a route ---------------------------------------------------------


class NotFoundException(Exception):
    """Named as the client's: a missing topic, whatever the proxy's state."""


def test_without_a_route_the_message_goes_plain_and_the_send_tells_why() -> None:
    out = _client.for_topic(message(), FakeClient(), CONFIG, now=NOW)
    assert out.message_group is None and out.delivery_timestamp is None
    # A client without routes at all (a stand-in in a test) is no different.
    assert _client.for_topic(message(), object(), CONFIG, now=NOW).message_group is None


def test_without_a_route_a_message_to_hold_back_gets_the_route_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class NoRoute:
        def _retrieve_topic_route_data(self, topic: str) -> Any:
            raise NotFoundException("topic not found")

    with pytest.raises(ConfigurationError, match="has no route for the topic"):
        _client.for_topic(message(deliver_at=NOW + dt.timedelta(seconds=5)), NoRoute(),
                          CONFIG, now=NOW)
    monkeypatch.setattr(_client, "proxy_listens", lambda _config: False)  # it is down
    with pytest.raises(BrokerUnavailableError):
        _client.for_topic(message(deliver_at=NOW + dt.timedelta(seconds=5)), FakeClient(),
                          CONFIG, now=NOW)


def test_the_proxys_delay_limit_is_explained() -> None:
    error = _client.wrap_error(
        type("BadRequestException", (Exception,), {})(
            "40012, the max delay time of message is too large, max is 86400000"),
        CONFIG, "publishing message m-1")
    assert "maxDelayTimeMills" in str(error) and "local outbox" in str(error)


# -- the publishers use it -------------------------------------------------------------


class FakeProducer(FakeClient):
    """A started producer: routes, and sends that succeed at once."""

    def __init__(self, **topics: list[list[int]]) -> None:
        super().__init__(**topics)
        self.sent: list[Any] = []

    def send(self, out: Any) -> None:
        self.sent.append(out)

    def send_async(self, out: Any) -> concurrent.futures.Future[Any]:
        self.sent.append(out)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_result(None)
        return future

    def shutdown(self) -> None:
        pass


def fifo_and_delay() -> FakeProducer:
    return FakeProducer(fifo=[[2]] * 4, delay=[[3]] * 4)


def to(topic: str, key: str | None, n: int, *, delay: float | None = None) -> Message:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    headers = {} if delay is None else {
        DELIVER_AT_HEADER: format_utc(now + dt.timedelta(seconds=delay))}
    return Message(topic=topic, payload=b"{}", id=f"{topic}-{n}", key=key, headers=headers)


def test_the_publisher_sends_fifo_groups_and_delivery_timestamps() -> None:
    publisher = RocketMQPublisher(CONFIG, ["fifo", "delay"])
    publisher._producer = producer = fifo_and_delay()
    publisher.publish(to("fifo", "acct-1", 0))
    publisher.publish_batch([to("fifo", "acct-2", 1), to("fifo", None, 2),
                             to("delay", "acct-3", 3, delay=60)])
    groups = [out.message_group for out in producer.sent]
    assert groups == ["acct-1", "acct-2", "fifo-2", None]
    assert producer.sent[-1].delivery_timestamp is not None
    with pytest.raises(ConfigurationError, match="takes no delayed messages"):
        publisher.publish(to("fifo", "acct-1", 4, delay=60))
    assert len(producer.sent) == 4  # refused before it left


def test_the_async_publisher_does_the_same_off_the_event_loop() -> None:
    async def scenario() -> FakeProducer:
        publisher = AsyncRocketMQPublisher(CONFIG, ["fifo", "delay"])
        publisher._sync._producer = producer = fifo_and_delay()
        try:
            await publisher.publish(to("fifo", "acct-1", 0))
            await publisher.publish_batch([to("fifo", "acct-2", 1),
                                           to("delay", None, 2, delay=60)])
            with pytest.raises(ConfigurationError, match="takes no delayed messages"):
                await publisher.publish_batch([to("fifo", "acct-1", 3, delay=60)])
        finally:
            await publisher.close()
        return producer

    producer = asyncio.run(scenario())
    assert [out.message_group for out in producer.sent] == ["acct-1", "acct-2", None]
    assert producer.sent[-1].delivery_timestamp is not None
