"""Which of a RocketMQ message's keys is the outbox message's key, both ways."""

from __future__ import annotations

from outbox import Message
from outbox_rocketmq.mapping import (
    KEY_PROPERTY,
    KEYS_HEADER,
    MESSAGE_ID_PROPERTY,
    Received,
    keys_of,
    ordered_keys,
    properties_of,
    to_message,
)


def round_trip(message: Message) -> Message:
    """``message`` as sent, then as read back (keys come back as a set)."""
    return to_message(Received(topic=message.topic, body=message.payload,
                               keys=ordered_keys(set(keys_of(message))),
                               properties=properties_of(message)), message.tag)


def test_the_id_travels_among_the_keys_and_the_key_comes_back_alone() -> None:
    for key in ("zz-account", "AA-account", None):
        message = Message(topic="t", payload=b"{}", id="m-42", key=key)
        assert keys_of(message) == ([key, "m-42"] if key else ["m-42"])
        back = round_trip(message)
        assert (back.id, back.key) == ("m-42", key)
        assert KEYS_HEADER not in back.headers  # the id is not a key of the handler's


def test_a_key_equal_to_the_id_is_one_key() -> None:
    message = Message(topic="t", payload=b"{}", id="tx-1", key="tx-1")
    assert keys_of(message) == ["tx-1"]
    assert properties_of(message)[KEY_PROPERTY] == "tx-1"
    assert round_trip(message).key == "tx-1"


def test_a_message_of_an_earlier_version_keeps_its_only_key() -> None:
    # Sent before the id was among the keys: keys = the key, no OUTBOX_KEY.
    received = Received(topic="t", body=b"{}", keys=("acct-1",),
                        properties={MESSAGE_ID_PROPERTY: "m-1"})
    assert to_message(received, None).key == "acct-1"


def test_another_producers_keys_are_left_as_they_are() -> None:
    received = Received(topic="t", body=b"{}", keys=ordered_keys("T-9 acct-3"),
                        properties={})
    message = to_message(Received(topic="t", body=b"{}", keys=received.keys,
                                  properties={MESSAGE_ID_PROPERTY: "x"}), None)
    assert (message.key, message.headers[KEYS_HEADER]) == ("T-9", "T-9 acct-3")


def test_a_dead_letter_copy_drops_the_brokers_own_properties() -> None:
    # A message from a FIFO topic carries __SHARDINGKEY: copied, it would make the
    # copy a FIFO message, which a NORMAL dead-letter topic refuses.
    from outbox_rocketmq.mapping import dead_letter_properties

    out = dead_letter_properties({"__SHARDINGKEY": "acct-1", "traceId": "t", "UNIQ_KEY": "u"},
                                 message_id="m", original_id="01", reason="gave up",
                                 group="g", topic="t")
    assert "__SHARDINGKEY" not in out and "UNIQ_KEY" not in out and out["traceId"] == "t"
