"""The transport contract: the tests every transport passes, for an adapter's own suite.

Subclass :class:`TransportContract` in a test module and give it a fixture named
``contract_transport`` that yields a fresh :class:`TransportUnderTest` for each test
(its topics hold nothing yet: add a unique suffix to the names on a shared broker)::

    import pytest
    from outbox.testing.contract import Features, TransportContract

    class TestMyBroker(TransportContract):
        @pytest.fixture
        def contract_transport(self):
            under = MyBrokerUnderTest()   # publisher(), subscriber(), features, ...
            yield under
            under.close()

Every test runs; a test of a promise that the transport's :class:`Features` does not
make is skipped with a reason saying which. An asyncio form is tested through
:class:`SyncPublisher` and :class:`SyncSubscriber`, which run its coroutines on a
private event loop (:class:`LoopThread`). ``pytest`` must be installed
(``pip install 'outbox[testing]'``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import random
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypeVar

import pytest

from ..errors import PublishError
from ..message import Message
from ..transport import Delivery
from ..typing import Abilities, BatchPublisher, Publisher, Subscriber
from . import broken_message

T = TypeVar("T")

#: Longer than any single call of a contract test; a hung coroutine fails, not hangs.
CALL_TIMEOUT = 120.0


@dataclass(frozen=True)
class Features:
    """What a transport promises; a test of a promise not made is skipped."""

    #: Another process can publish to, and consume from, the same queue.
    shared_between_processes: bool
    #: A delivery neither acknowledged nor retried comes back, to the same subscriber,
    #: after the visibility timeout.
    redelivers_after_visibility_timeout: bool
    #: ``publish_batch`` exists and stores all of the batch or none of it.
    batch_publish: bool
    #: One subscriber of one group gets a topic's messages in publish order.
    ordered: bool
    #: One subscriber of one group gets the messages of one key in publish order.
    ordered_per_key: bool = True
    #: The subscriber has ``retry`` (outbox.typing.Redelivery).
    redelivery: bool = True
    #: The subscriber has ``dead_letter`` and the transport lists dead letters.
    dead_letter: bool = True
    #: ``Delivery.attempt`` is the broker's own count (outbox.typing.CountsDeliveries).
    counts_deliveries: bool = True
    #: A group that subscribes late still gets what was published before.
    late_groups_see_earlier_messages: bool = True
    #: Subscribers of one group never get the same message (none acknowledged twice).
    exclusive_within_group: bool = True
    #: A message with an empty payload is carried (else ``publish`` refuses it with
    #: PublishError, before anything is sent).
    empty_payload: bool = True
    #: Waits and timeouts of the tests are multiplied by this (slow brokers: > 1).
    timescale: float = 1.0


class TransportUnderTest(Protocol):
    """One transport, fresh for one test: its topics hold nothing yet."""

    features: Features

    def publisher(self) -> Publisher: ...

    def subscriber(self, topic: str, group: str, *, visibility_timeout: float = 30.0
                   ) -> Subscriber: ...

    def dead_letters(self, topic: str, group: str) -> list[tuple[str | None, str | None]]:
        """(message id, reason) of every dead-lettered delivery of ``group``; needed
        only with ``Features.dead_letter``."""
        ...

    def publish_from_another_process(self, topic: str, ids: Sequence[str]) -> None:
        """Publish ``ids`` (payload: the id's bytes) from a child process; needed only
        with ``Features.shared_between_processes``."""
        ...

    def close(self) -> None: ...


class LoopThread:
    """A private event loop running on a thread of its own, for one test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="contract-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result, from any thread."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(CALL_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _require_coroutines(obj: object, *names: str) -> None:
    for name in names:
        if not inspect.iscoroutinefunction(getattr(obj, name, None)):
            raise TypeError(f"{type(obj).__name__}.{name} is not a coroutine function")


class SyncPublisher:
    """A sync Publisher (and BatchPublisher) over an asyncio publisher."""

    def __init__(self, inner: Any, loop: LoopThread) -> None:
        _require_coroutines(inner, "publish", "close")
        self.inner = inner
        self.loop = loop
        if callable(getattr(inner, "publish_batch", None)):
            _require_coroutines(inner, "publish_batch")
            self.publish_batch = self._publish_batch

    def publish(self, message: Message) -> None:
        self.loop.run(self.inner.publish(message))

    def _publish_batch(self, messages: Sequence[Message]) -> None:
        self.loop.run(self.inner.publish_batch(messages))

    def close(self) -> None:
        self.loop.run(self.inner.close())


class SyncSubscriber:
    """A sync Subscriber over an asyncio one, with the same optional abilities."""

    def __init__(self, inner: Any, loop: LoopThread) -> None:
        _require_coroutines(inner, "fetch", "ack", "close")
        self.inner = inner
        self.loop = loop
        abilities = Abilities.of(inner)
        if abilities.redelivery:
            _require_coroutines(inner, "retry")
            self.retry = self._retry
        if abilities.dead_letter:
            _require_coroutines(inner, "dead_letter")
            self.dead_letter = self._dead_letter
        self.counts_deliveries = abilities.counts_deliveries

    def fetch(self, max_messages: int, wait_seconds: float) -> Sequence[Delivery]:
        return self.loop.run(self.inner.fetch(max_messages, wait_seconds))

    def ack(self, delivery: Delivery) -> None:
        self.loop.run(self.inner.ack(delivery))

    def _retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        self.loop.run(self.inner.retry(delivery, delay_seconds, error))

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.loop.run(self.inner.dead_letter(delivery, reason))

    def close(self) -> None:
        self.loop.run(self.inner.close())


def message(topic: str = "contract", **values: Any) -> Message:
    """A message of the contract's tests (payload ``{}`` unless given)."""
    values.setdefault("payload", b"{}")
    return Message(topic=topic, **values)


def fetch_all(sub: Subscriber, expected: int, timeout: float = 10.0) -> list[Delivery]:
    """Fetch until ``expected`` deliveries arrived (or the timeout), acknowledging each."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = sub.fetch(50, 0.2)
        for d in batch:
            sub.ack(d)
        got.extend(batch)
    return got


Under = TransportUnderTest


class TransportContract:
    """The contract's tests; a subclass provides the ``contract_transport`` fixture."""

    @staticmethod
    def need(under: Under, feature: str) -> None:
        """Skip, saying why, unless ``under`` declares ``feature``."""
        if not getattr(under.features, feature):
            pytest.skip(f"{type(under).__name__} does not declare {feature} "
                        f"(outbox.testing.contract.Features.{feature})")

    @staticmethod
    def scale(under: Under, seconds: float) -> float:
        return seconds * under.features.timescale

    def fetch_one(self, under: Under, sub: Subscriber, wait: float = 2.0) -> Delivery:
        got = sub.fetch(10, self.scale(under, wait))
        assert len(got) == 1, f"expected one delivery, got {[d.message_id for d in got]}"
        return got[0]

    def test_features_are_declared(self, contract_transport: Under) -> None:
        features = contract_transport.features
        assert isinstance(features, Features)
        flags = {f.name: getattr(features, f.name) for f in fields(features)}
        timescale = flags.pop("timescale")
        assert all(isinstance(v, bool) for v in flags.values()), flags
        assert isinstance(timescale, int | float) and timescale > 0

    def test_publish_then_fetch_keeps_every_field(self, contract_transport: Under) -> None:
        under = contract_transport
        sent = message(id="m-0001", key="account-1", tag="debit",
                       headers={"trace": "abc", "ünï": "✓ 张三", "empty": "",
                                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-"
                                               "b7ad6b7169203331-01"},
                       payload=b"\x00\xff\xfe not utf-8 \x80\xc3(")
        sub = under.subscriber("contract", "g")
        under.publisher().publish(sent)
        d = self.fetch_one(under, sub)
        assert (d.topic, d.message_id, d.key, d.tag, d.attempt) == (
            "contract", "m-0001", "account-1", "debit", 1)
        assert d.payload == sent.payload and type(d.payload) is bytes
        assert dict(d.headers) == dict(sent.headers)
        assert d.to_message() == sent
        sub.ack(d)

    def test_large_binary_payload_is_intact(self, contract_transport: Under) -> None:
        under = contract_transport
        payload = random.Random(7).randbytes(300_000)  # past MySQL's 64 KiB BLOB
        sub = under.subscriber("contract", "g")
        under.publisher().publish(message(id="big", payload=payload))
        assert self.fetch_one(under, sub).payload == payload

    def test_optional_fields_may_be_absent(self, contract_transport: Under) -> None:
        under = contract_transport
        sub = under.subscriber("contract", "g")
        under.publisher().publish(message(id="bare", payload=b"{}"))
        d = self.fetch_one(under, sub)
        assert (d.message_id, d.key, d.tag, dict(d.headers), d.payload) == (
            "bare", None, None, {}, b"{}")

    def test_an_empty_payload_is_carried(self, contract_transport: Under) -> None:
        under = contract_transport
        sub = under.subscriber("contract", "g")
        if not under.features.empty_payload:
            with pytest.raises(PublishError):  # refused, with what to do: never dropped
                under.publisher().publish(message(id="empty", payload=b""))
            return
        under.publisher().publish(message(id="empty", payload=b""))
        assert self.fetch_one(under, sub).payload == b""

    def test_only_the_subscribed_topic_is_delivered(self, contract_transport: Under) -> None:
        under = contract_transport
        sub = under.subscriber("contract", "g")
        other = under.subscriber("other", "g")
        pub = under.publisher()
        pub.publish(message("other", id="o-1"))
        pub.publish(message("contract", id="c-1"))
        assert [d.message_id for d in fetch_all(sub, 1, self.scale(under, 5))] == ["c-1"]
        assert sub.fetch(10, self.scale(under, 0.3)) == []
        assert [d.message_id for d in fetch_all(other, 1, self.scale(under, 5))] == ["o-1"]

    def test_fetch_hands_out_at_most_max_messages_in_publish_order(
            self, contract_transport: Under) -> None:
        under = contract_transport
        self.need(under, "ordered")
        sub = under.subscriber("contract", "g")
        pub = under.publisher()
        ids = [f"m-{i:03d}" for i in range(12)]
        for i in ids:
            pub.publish(message(id=i))
        first: list[Delivery] = []
        deadline = time.monotonic() + self.scale(under, 5)
        while not first and time.monotonic() < deadline:
            first = list(sub.fetch(5, self.scale(under, 1.0)))
        assert 1 <= len(first) <= 5
        assert [d.message_id for d in first] == ids[:len(first)]
        for d in first:
            sub.ack(d)
        rest = fetch_all(sub, 12 - len(first), self.scale(under, 10))
        assert [d.message_id for d in rest] == ids[len(first):]

    def test_one_keys_messages_arrive_in_publish_order(self, contract_transport: Under) -> None:
        under = contract_transport
        self.need(under, "ordered_per_key")
        sub = under.subscriber("contract", "g")
        pub = under.publisher()
        sent = [(f"k-{i % 3}", f"m-{i:03d}") for i in range(30)]
        for key, i in sent:
            pub.publish(message(id=i, key=key))
        got = fetch_all(sub, 30, self.scale(under, 15))
        assert sorted(d.message_id or "" for d in got) == sorted(i for _, i in sent)
        for key in ("k-0", "k-1", "k-2"):
            assert [d.message_id for d in got if d.key == key] == [i for k, i in sent if k == key]

    def test_ack_settles_the_message(self, contract_transport: Under) -> None:
        under = contract_transport
        sub = under.subscriber("contract", "g", visibility_timeout=self.scale(under, 0.3))
        under.publisher().publish(message(id="m-1"))
        d = self.fetch_one(under, sub)
        sub.ack(d)
        time.sleep(self.scale(under, 0.4))  # past the visibility timeout: it stays gone
        assert sub.fetch(10, self.scale(under, 0.3)) == []
        sub.close()
        again = under.subscriber("contract", "g", visibility_timeout=self.scale(under, 0.3))
        assert again.fetch(10, self.scale(under, 1.0)) == []  # nor to a new subscriber

    def test_an_unacknowledged_delivery_comes_back_to_the_group(
            self, contract_transport: Under) -> None:
        under = contract_transport
        timeout = self.scale(under, 0.5)
        first = under.subscriber("contract", "g", visibility_timeout=timeout)
        under.publisher().publish(message(id="m-1", payload=b"x"))
        assert self.fetch_one(under, first).message_id == "m-1"
        first.close()  # as a crash would: never acknowledged
        second = under.subscriber("contract", "g", visibility_timeout=timeout)
        [again] = fetch_all(second, 1, self.scale(under, 20))
        assert (again.message_id, again.payload) == ("m-1", b"x")
        if under.features.counts_deliveries:
            assert again.attempt == 2

    def test_unacknowledged_message_comes_back_after_the_visibility_timeout(
            self, contract_transport: Under) -> None:
        under = contract_transport
        self.need(under, "redelivers_after_visibility_timeout")
        timeout = self.scale(under, 0.4)
        sub = under.subscriber("contract", "g", visibility_timeout=timeout)
        under.publisher().publish(message(id="m-1", payload=b"x"))
        first = self.fetch_one(under, sub)
        taken = time.monotonic()
        assert first.attempt == 1
        assert sub.fetch(10, 0.0) == []  # hidden while in flight
        again = self.fetch_one(under, sub, 3.0 + timeout)
        assert time.monotonic() - taken >= timeout * 0.85
        assert (again.message_id, again.payload) == ("m-1", b"x")
        if under.features.counts_deliveries:
            assert again.attempt == 2
        sub.ack(again)
        assert sub.fetch(10, timeout * 1.5) == []

    def test_retry_hides_the_message_for_the_delay(self, contract_transport: Under) -> None:
        under = contract_transport
        self.need(under, "redelivery")
        sub = under.subscriber("contract", "g", visibility_timeout=self.scale(under, 30))
        under.publisher().publish(message(id="m-1"))
        d = self.fetch_one(under, sub)
        delay = self.scale(under, 0.6)
        retried = time.monotonic()
        sub.retry(d, delay, "handler failed")  # type: ignore[attr-defined]
        assert sub.fetch(10, delay / 2) == []
        again = self.fetch_one(under, sub, 3.0 + delay)
        assert time.monotonic() - retried >= delay * 0.9
        assert again.message_id == "m-1"
        if under.features.counts_deliveries:
            assert again.attempt == 2

    def test_retry_with_no_delay_is_visible_at_once(self, contract_transport: Under) -> None:
        under = contract_transport
        self.need(under, "redelivery")
        sub = under.subscriber("contract", "g", visibility_timeout=self.scale(under, 30))
        under.publisher().publish(message(id="m-1"))
        d = self.fetch_one(under, sub)
        sub.retry(d, 0, "again")  # type: ignore[attr-defined]
        again = self.fetch_one(under, sub, 2.0)
        assert again.message_id == "m-1"
        if under.features.counts_deliveries:
            assert again.attempt == 2

    def test_dead_letter_keeps_it_out_and_lists_the_reason(
            self, contract_transport: Under) -> None:
        under = contract_transport
        self.need(under, "dead_letter")
        sub = under.subscriber("contract", "g", visibility_timeout=self.scale(under, 0.3))
        other = under.subscriber("contract", "other")
        pub = under.publisher()
        pub.publish(message(id="bad"))
        pub.publish(message(id="good"))
        got = {d.message_id: d for d in self._collect(under, sub, 2)}
        reason = "undecodable message: payload is empty " + "x" * 1500
        sub.dead_letter(got["bad"], reason)  # type: ignore[attr-defined]
        sub.ack(got["good"])
        time.sleep(self.scale(under, 0.4))
        assert sub.fetch(10, self.scale(under, 0.3)) == []
        assert under.dead_letters("contract", "g") == [("bad", reason)]
        # Another group is not affected by this group's dead letter.
        assert {d.message_id for d in fetch_all(other, 2, self.scale(under, 10))} == {
            "bad", "good"}
        assert under.dead_letters("contract", "other") == []

    def _collect(self, under: Under, sub: Subscriber, expected: int) -> list[Delivery]:
        """Fetch ``expected`` deliveries without acknowledging them."""
        got: list[Delivery] = []
        deadline = time.monotonic() + self.scale(under, 10)
        while len(got) < expected and time.monotonic() < deadline:
            got.extend(sub.fetch(expected - len(got), self.scale(under, 0.5)))
        assert len(got) == expected
        return got

    def test_every_group_gets_every_message(self, contract_transport: Under) -> None:
        under = contract_transport
        a = under.subscriber("contract", "group-a")
        b = under.subscriber("contract", "group-b")
        ids = [f"m-{i}" for i in range(15)]
        pub = under.publisher()
        for i in ids:
            pub.publish(message(id=i))
        assert sorted(d.message_id or "" for d in fetch_all(a, 15, self.scale(under, 15))) == \
            sorted(ids)
        assert sorted(d.message_id or "" for d in fetch_all(b, 15, self.scale(under, 15))) == \
            sorted(ids)

    def test_a_late_group_gets_what_was_published_before(
            self, contract_transport: Under) -> None:
        under = contract_transport
        self.need(under, "late_groups_see_earlier_messages")
        a = under.subscriber("contract", "group-a")
        pub = under.publisher()
        for i in range(5):
            pub.publish(message(id=f"m-{i}"))
        assert len(fetch_all(a, 5, self.scale(under, 10))) == 5
        late = under.subscriber("contract", "group-late")
        assert sorted(d.message_id or "" for d in fetch_all(late, 5, self.scale(under, 10))) == \
            [f"m-{i}" for i in range(5)]

    def test_subscribers_of_one_group_share_the_work(self, contract_transport: Under) -> None:
        """Three subscribers of one group: every message is acknowledged, none is in two
        hands at once, and (``exclusive_within_group``) none is handed out twice."""
        under = contract_transport
        total = 150
        subs = [under.subscriber("contract", "g", visibility_timeout=self.scale(under, 60))
                for _ in range(3)]
        pub = under.publisher()
        for i in range(total):
            pub.publish(message(id=f"m-{i:04d}"))

        lock = threading.Lock()
        in_flight: set[str] = set()
        overlaps: list[str] = []
        acked: Counter[str] = Counter()
        errors: list[BaseException] = []
        done = threading.Event()

        def work(sub: Subscriber) -> None:
            try:
                while not done.is_set():
                    for d in sub.fetch(4, 0.05 * under.features.timescale):
                        assert d.message_id is not None
                        with lock:
                            if d.message_id in in_flight:
                                overlaps.append(d.message_id)
                            in_flight.add(d.message_id)
                        time.sleep(0.001)
                        with lock:
                            in_flight.discard(d.message_id)
                            acked[d.message_id] += 1
                        sub.ack(d)
                    with lock:
                        if len(acked) >= total:
                            done.set()
            except BaseException as exc:
                errors.append(exc)
                done.set()

        threads = [threading.Thread(target=work, args=(s,)) for s in subs]
        for t in threads:
            t.start()
        done.wait(self.scale(under, 60))
        done.set()
        for t in threads:
            t.join(self.scale(under, 20))
        assert errors == []
        assert overlaps == []
        assert len(acked) == total
        if under.features.exclusive_within_group:
            assert set(acked.values()) == {1}

    def test_publish_batch_is_all_or_nothing(self, contract_transport: Under) -> None:
        under = contract_transport
        self.need(under, "batch_publish")
        pub = under.publisher()
        assert isinstance(pub, BatchPublisher)
        sub = under.subscriber("contract", "g")
        # A message that slipped past validation: the adapter must refuse it, and with
        # it every other message of the batch.
        broken = broken_message(topic="contract", id="broken")
        with pytest.raises(PublishError):
            pub.publish_batch([message(id="b-1"), message(id="b-2"), broken])
        assert sub.fetch(10, self.scale(under, 0.5)) == []
        pub.publish_batch([message(id="c-1"), message(id="c-2"), message(id="c-3")])
        got = fetch_all(sub, 3, self.scale(under, 10))
        assert sorted(d.message_id or "" for d in got) == ["c-1", "c-2", "c-3"]

    def test_fetch_waits_up_to_wait_seconds_then_returns_empty(
            self, contract_transport: Under) -> None:
        under = contract_transport
        sub = under.subscriber("contract", "g")
        wait = self.scale(under, 0.5)
        start = time.monotonic()
        assert list(sub.fetch(10, wait)) == []
        elapsed = time.monotonic() - start
        assert wait * 0.9 <= elapsed < wait + self.scale(under, 2.5)
        start = time.monotonic()
        assert list(sub.fetch(10, 0)) == []
        assert time.monotonic() - start < self.scale(under, 1.0)

    def test_fetch_returns_as_soon_as_a_message_arrives(self, contract_transport: Under) -> None:
        under = contract_transport
        sub = under.subscriber("contract", "g")
        sub.fetch(1, 0)  # joined: a message published from now on is this group's
        publisher = under.publisher()
        timer = threading.Timer(0.2, lambda: publisher.publish(message(id="late")))
        start = time.monotonic()
        timer.start()
        try:
            got = sub.fetch(10, self.scale(under, 10))
        finally:
            timer.join()
        assert [d.message_id for d in got] == ["late"]
        assert time.monotonic() - start < self.scale(under, 5)

    def test_another_process_can_publish(self, contract_transport: Under) -> None:
        under = contract_transport
        self.need(under, "shared_between_processes")
        sub = under.subscriber("contract", "g")
        ids = [f"p-{i}" for i in range(5)]
        under.publish_from_another_process("contract", ids)
        got = fetch_all(sub, 5, self.scale(under, 15))
        assert sorted((d.message_id or "", d.payload) for d in got) == [
            (i, i.encode()) for i in ids]

