"""Order, batches and delays of the 4.x client, without a broker: the queue a key
hashes to (the values a Java producer's ``SelectMessageQueueByHash`` picks, computed
with RocketMQ 4.9.7's own class), the SEND_BATCH_MESSAGE body (byte for byte what
Java's ``MessageDecoder.encodeMessages`` writes), how a batch is cut to the broker's
size limit, the delay levels, and which message an orderly member hands out next."""

from __future__ import annotations

import datetime as dt

import pytest

from outbox.envelope import DELIVER_AT_HEADER, format_utc
from outbox.errors import PublishError
from outbox.message import Message
from outbox.transport import Delivery
from outbox_rocketmq.halfsend import batch_chunks, delay_level_of
from outbox_rocketmq.remoting.client import MessageQueue, select_by_hash, send_delay_level
from outbox_rocketmq.remoting.consumer import RemotingSubscriber, _Handle, _QueueState
from outbox_rocketmq.remoting.protocol import (
    MAX_MESSAGE_BYTES,
    BatchItem,
    ProtocolError,
    decode_batch,
    decode_messages,
    encode_batch,
    encode_properties,
    encode_stored,
    hash_index,
    java_string_hash,
)

#: (key, Java's key.hashCode(), SelectMessageQueueByHash's queue among 3, 4 and 8),
#: printed by a Java program against rocketmq-client 4.9.7.
JAVA = [
    ("order-1", -1207111310, 2, 2, 6),
    ("k0", 3365, 2, 1, 5),
    ("k5", 3370, 1, 2, 2),
    ("", 0, 0, 0, 0),
    ("polygenelubricants", -2147483648, 2, 0, 0),  # Integer.MIN_VALUE
    ("日本語", 25921943, 2, 3, 7),
    ("acct-😀", -1175469731, 2, 3, 3),  # a surrogate pair: two UTF-16 units
    ("transfer-000123", -1802790364, 1, 0, 4),
    ("ZZZZZZZZZZZZZZZZZZZZ", 634052736, 0, 0, 0),
]


@pytest.mark.parametrize(("key", "code", "of3", "of4", "of8"), JAVA,
                         ids=[k or "empty" for k, *_ in JAVA])
def test_a_key_hashes_to_the_queue_a_java_producer_picks(
    key: str, code: int, of3: int, of4: int, of8: int,
) -> None:
    assert java_string_hash(key) == code
    assert [hash_index(key, n) for n in (1, 3, 4, 8)] == [0, of3, of4, of8]


def test_the_queue_is_taken_from_the_route_order() -> None:
    queues = [MessageQueue("broker-a", i) for i in range(4)] + \
        [MessageQueue("broker-b", i) for i in range(4)]
    assert select_by_hash(queues, "order-1") == MessageQueue("broker-b", 2)  # index 6
    assert select_by_hash(queues[:4], "order-1") == MessageQueue("broker-a", 2)
    with pytest.raises(ValueError, match="no queue"):
        hash_index("k", 0)


#: Java: MessageDecoder.encodeMessages([new Message("t", "TagA", "key1 key2",
#: "hello") + user property traceId=t1, a message with no body and flag 7]).
JAVA_BATCH = (
    "000000480000000000000000000000000000000568656c6c6f002d74726163654964017431024b4559"
    "53016b657931206b65793202574149540174727565025441475301546167410000001f0000000000000000"
    "00000007000000000009574149540174727565")


def test_a_batch_is_encoded_as_javas_message_decoder_does() -> None:
    # 4.9.7 writes no separator after the last property; ours (one more byte) reads the same.
    java_props = "traceId\x01t1\x02KEYS\x01key1 key2\x02WAIT\x01true\x02TAGS\x01TagA"
    items = [BatchItem(b"hello", java_props),
             BatchItem(b"", "WAIT\x01true", flag=7)]
    assert encode_batch(items).hex() == JAVA_BATCH
    assert decode_batch(bytes.fromhex(JAVA_BATCH)) == items
    ours = [BatchItem(b"\x00\xff" * 3, encode_properties({"UNIQ_KEY": "U", "é": "ü"}))]
    assert decode_batch(encode_batch(ours)) == ours


def test_a_broken_batch_or_oversized_properties_are_refused() -> None:
    body = bytes.fromhex(JAVA_BATCH)
    with pytest.raises(ProtocolError):
        decode_batch(body[:-3])
    with pytest.raises(ProtocolError):
        decode_batch(b"\x00\x00\x00\x63" + body[4:])  # a size that does not add up
    with pytest.raises(ValueError, match="32767"):
        encode_batch([BatchItem(b"", "x" * 40000)])


def message(i: int, size: int = 10, key: str | None = None,
            headers: dict[str, str] | None = None) -> Message:
    return Message(topic="t", id=f"m-{i}", payload=b"x" * size, key=key, headers=headers or {})


def test_a_queue_share_is_cut_within_the_brokers_size_limit_in_order() -> None:
    big = [message(i, 900 * 1024) for i in range(10)]
    chunks = batch_chunks("t", big)
    assert [m.id for c in chunks for m in c] == [m.id for m in big]
    assert [len(c) for c in chunks] == [4, 4, 2]
    small = [message(i) for i in range(1000)]
    assert len(batch_chunks("t", small)) == 1
    alone = batch_chunks("t", [message(0), message(1, MAX_MESSAGE_BYTES + 1), message(2)])
    assert [[m.id for m in c] for c in alone] == [["m-0"], ["m-1"], ["m-2"]]


def test_a_message_due_later_goes_alone_with_the_smallest_delay_level_not_early() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, 0)
    later = {DELIVER_AT_HEADER: format_utc(now + dt.timedelta(seconds=3))}
    assert delay_level_of(message(0, headers=later), now) == 2  # 5 s, not 1 s
    assert delay_level_of(message(0, headers=later), now + dt.timedelta(seconds=4)) is None
    assert delay_level_of(message(0), now) is None
    assert [send_delay_level(s) for s in (0.2, 1, 1.01, 60, 61, 7200)] == [1, 1, 2, 5, 6, 18]
    assert send_delay_level(0) is None and send_delay_level(-5) is None
    with pytest.raises(PublishError, match="keep it in the outbox"):
        send_delay_level(7201)
    due = {DELIVER_AT_HEADER: format_utc(dt.datetime.now(dt.UTC).replace(tzinfo=None)
                                         + dt.timedelta(seconds=30))}
    chunks = batch_chunks("t", [message(0), message(1, headers=due), message(2), message(3)])
    assert [[m.id for m in c] for c in chunks] == [["m-0"], ["m-1"], ["m-2", "m-3"]]


def delivery(state: _QueueState, offset: int, key: str | None) -> Delivery:
    stored = decode_messages(encode_stored("t", b"{}", queue_offset=offset))[0]
    state.in_flight.add(offset)
    return Delivery(topic="t", payload=b"{}", message_id=f"m{offset}", attempt=1, key=key,
                    handle=_Handle("t", MessageQueue("b", 0), stored, state))


def test_an_orderly_member_hands_out_one_message_per_key_and_a_retry_after_its_delay() -> None:
    state = _QueueState(0)
    state.buffer = [delivery(state, 0, "a"), delivery(state, 1, "a"), delivery(state, 2, "b"),
                    delivery(state, 3, None), delivery(state, 4, None), delivery(state, 5, "b")]
    first = RemotingSubscriber._next_in_order(state, 32, now=100.0)
    assert [d.handle.stored.queue_offset for d in first] == [0, 2, 3, 4]
    assert state.busy == {"a": 0, "b": 2}
    assert RemotingSubscriber._next_in_order(state, 32, now=100.0) == []
    # "a" fails: it waits here, holding its key; "b" goes on once its first is done.
    retried = first[0]
    state.held[0] = (105.0, retried)
    del state.busy["b"]
    state.in_flight.discard(2)
    again = RemotingSubscriber._next_in_order(state, 32, now=101.0)
    assert [d.handle.stored.queue_offset for d in again] == [5]
    assert state.safe_offset() == 0  # nothing committed past the one not done
    assert RemotingSubscriber._next_in_order(state, 32, now=104.0) == []
    assert RemotingSubscriber._next_in_order(state, 32, now=105.0) == [retried]
    assert [d.handle.stored.queue_offset for d in state.buffer] == [1]  # "a" after it
