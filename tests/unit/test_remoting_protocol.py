"""The remoting wire format: frames, headers, properties and stored messages, and
what a broken or hostile byte stream gets (a ProtocolError, never a hang or a guess)."""

from __future__ import annotations

import json
import struct

import pytest

from outbox_rocketmq.remoting.client import quote_number_keys
from outbox_rocketmq.remoting.protocol import (
    COMPRESSED_FLAG,
    MAX_FRAME_BYTES,
    MESSAGE_MAGIC_V1,
    MESSAGE_MAGIC_V2,
    Command,
    FrameReader,
    ProtocolError,
    commit_log_offset_of,
    decode_frame,
    decode_messages,
    decode_properties,
    encode_properties,
    encode_stored,
)


def test_a_command_round_trips_through_a_frame() -> None:
    command = Command(105, {"topic": "bank-transfer"}, b"\x00body", opaque=42)
    data = command.encode()
    (length,) = struct.unpack_from(">I", data)
    assert length == len(data) - 4
    back = decode_frame(data[4:])
    assert (back.code, back.ext_fields, back.body, back.opaque) == (
        105, {"topic": "bank-transfer"}, b"\x00body", 42)
    assert not back.is_response
    header = json.loads(data[8:8 + (struct.unpack_from(">I", data, 4)[0] & 0xFFFFFF)])
    assert header["language"] == "PYTHON" and header["version"] == 401


def test_the_reader_waits_for_whole_frames_split_anywhere() -> None:
    frames = b"".join(Command(10, {"i": str(i)}, b"x" * i).encode() for i in range(5))
    reader = FrameReader()
    got = []
    for i in range(0, len(frames), 3):  # three bytes at a time
        got += [c.ext_fields["i"] for c in reader.feed(frames[i:i + 3])]
    assert got == ["0", "1", "2", "3", "4"]
    assert reader.pending == 0


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (struct.pack(">I", 2) + b"ab", "frame length of 2"),
        (struct.pack(">I", MAX_FRAME_BYTES + 1), "frame length"),
        (struct.pack(">II", 8, 100) + b"{}{}", "header of 100 bytes"),
        (struct.pack(">II", 7, 3) + b"{x}", "not JSON"),
        (struct.pack(">II", 6, 2) + b"[]", "without a numeric code"),
        (struct.pack(">II", 6, (7 << 24) | 2) + b"{}", "unknown header serialization"),
        (struct.pack(">II", 24, (1 << 24) | 20) + b"\x00" * 20, "binary header"),
    ],
)
def test_a_hostile_stream_is_a_protocol_error(data: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        list(FrameReader().feed(data))


def test_a_binary_header_is_read_too() -> None:
    ext = struct.pack(">h", 1) + b"k" + struct.pack(">i", 1) + b"v"
    header = struct.pack(">hBhiii", 39, 0, 401, 5, 0, 2) + b"ok" + struct.pack(">i", len(ext)) \
        + ext
    frame = struct.pack(">I", (1 << 24) | len(header)) + header + b"body"
    command = decode_frame(frame)
    assert (command.code, command.opaque, command.remark, command.ext_fields, command.body) == (
        39, 5, "ok", {"k": "v"}, b"body")


def test_properties_round_trip_and_refuse_separators() -> None:
    properties = {"KEYS": "a b", "traceId": "t-1", "empty": ""}
    assert decode_properties(encode_properties(properties)) == properties
    with pytest.raises(ValueError, match="separator"):
        encode_properties({"bad": "a\x01b"})


@pytest.mark.parametrize("magic", [MESSAGE_MAGIC_V1, MESSAGE_MAGIC_V2])
def test_stored_messages_decode_with_their_ids(magic: int) -> None:
    props = encode_properties({"UNIQ_KEY": "ABC", "KEYS": "k1 k2", "TAGS": "tg"})
    data = encode_stored("bank-transfer", b"{}", properties=props, magic=magic) \
        + encode_stored("bank-transfer", b"zipped" * 10, sys_flag=COMPRESSED_FLAG, magic=magic)
    first, second = decode_messages(data)
    assert (first.topic, first.body, first.msg_id, first.keys, first.tag) == (
        "bank-transfer", b"{}", "ABC", ("k1", "k2"), "tg")
    assert (first.queue_id, first.queue_offset, first.reconsume_times) == (3, 7, 2)
    assert commit_log_offset_of(first.offset_msg_id) == 123456
    assert first.offset_msg_id.startswith("7F000001") and len(first.offset_msg_id) == 32
    assert second.body == b"zipped" * 10
    assert second.msg_id == second.offset_msg_id  # no unique key: the offset id


@pytest.mark.parametrize(
    "data",
    [
        encode_stored("t", b"hello")[:-3],  # truncated
        struct.pack(">ii", 40, 12345) + b"\x00" * 32,  # unknown magic
        struct.pack(">ii", 4, MESSAGE_MAGIC_V1),  # a size smaller than its own header
        # garbage inside
        encode_stored("t", b"hello", sys_flag=COMPRESSED_FLAG)[:60] + b"\x00" * 200,
    ],
)
def test_broken_stored_messages_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_messages(data)


def test_offset_ids_that_are_not_ids_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="not hex"):
        commit_log_offset_of("zz")
    with pytest.raises(ProtocolError, match="bytes"):
        commit_log_offset_of("00" * 5)


@pytest.mark.parametrize(
    ("fastjson", "expected"),
    [
        ('{"brokerAddrs":{0:"127.0.0.1:20911",1:"h:2"}}',
         {"brokerAddrs": {"0": "127.0.0.1:20911", "1": "h:2"}}),
        ('{"s":"{0:\\"x\\"}", "n": {-1 : [1, 2]}}', {"s": '{0:"x"}', "n": {"-1": [1, 2]}}),
    ],
)
def test_routes_of_name_servers_before_4_9_4_are_read(fastjson: str, expected: object) -> None:
    assert json.loads(quote_number_keys(fastjson)) == expected
