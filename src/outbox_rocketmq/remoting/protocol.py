"""RocketMQ's remoting protocol, the TCP protocol of its name server and broker (4.x,
and 5.x brokers on their remoting port): frames, commands, message properties and
the stored-message format the broker sends back.

A frame is a 4-byte big-endian length of everything after it, then 4 bytes whose
high byte is the header's serialization (0 JSON, 1 RocketMQ's binary form) and whose
low three bytes are the header's length, the header, and the body. The header holds
the request or response code, an ``opaque`` number that pairs a response with its
request, flags (bit 0: response, bit 1: one-way) and string fields.

Nothing here does I/O: :class:`FrameReader` takes bytes as they arrive and gives
whole commands, refusing a peer that breaks the format with :class:`ProtocolError`.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The largest frame either side accepts (the broker's own default limit).
MAX_FRAME_BYTES = 16 * 1024 * 1024
#: The version code sent in every header: 4.9.4's (the ordinal of MQVersion.V4_9_4).
#: From 4.9.4 on the name server answers in standard JSON (older clients get
#: fastjson's, with unquoted numeric keys).
CLIENT_VERSION = 401

JSON_SERIALIZATION = 0
BINARY_SERIALIZATION = 1

RESPONSE_FLAG = 1
ONEWAY_FLAG = 2


class RequestCode:
    """The request codes this client sends or answers (RocketMQ's ``RequestCode``)."""

    SEND_MESSAGE = 10
    PULL_MESSAGE = 11
    QUERY_CONSUMER_OFFSET = 14
    UPDATE_CONSUMER_OFFSET = 15
    SEARCH_OFFSET_BY_TIMESTAMP = 29
    GET_MAX_OFFSET = 30
    GET_MIN_OFFSET = 31
    HEART_BEAT = 34
    UNREGISTER_CLIENT = 35
    CONSUMER_SEND_MSG_BACK = 36
    END_TRANSACTION = 37
    GET_CONSUMER_LIST_BY_GROUP = 38
    CHECK_TRANSACTION_STATE = 39
    NOTIFY_CONSUMER_IDS_CHANGED = 40
    LOCK_BATCH_MQ = 41
    UNLOCK_BATCH_MQ = 42
    GET_ROUTEINFO_BY_TOPIC = 105
    SEND_BATCH_MESSAGE = 320


class ResponseCode:
    """The response codes this client tells apart (RocketMQ's ``ResponseCode``)."""

    SUCCESS = 0
    SYSTEM_ERROR = 1
    SYSTEM_BUSY = 2
    REQUEST_CODE_NOT_SUPPORTED = 3
    FLUSH_DISK_TIMEOUT = 10
    SLAVE_NOT_AVAILABLE = 11
    FLUSH_SLAVE_TIMEOUT = 12
    MESSAGE_ILLEGAL = 13
    SERVICE_NOT_AVAILABLE = 14
    NO_PERMISSION = 16
    TOPIC_NOT_EXIST = 17
    PULL_NOT_FOUND = 19
    PULL_RETRY_IMMEDIATELY = 20
    PULL_OFFSET_MOVED = 21
    QUERY_NOT_FOUND = 22
    SUBSCRIPTION_NOT_EXIST = 24
    SUBSCRIPTION_NOT_LATEST = 25
    SUBSCRIPTION_GROUP_NOT_EXIST = 26


#: ``END_TRANSACTION``'s ``commitOrRollback`` (RocketMQ's ``MessageSysFlag``).
TRANSACTION_NOT_TYPE = 0
TRANSACTION_PREPARED_TYPE = 0x1 << 2
TRANSACTION_COMMIT_TYPE = 0x2 << 2
TRANSACTION_ROLLBACK_TYPE = 0x3 << 2
#: Other message system flags.
COMPRESSED_FLAG = 0x1
MULTI_TAGS_FLAG = 0x1 << 1
BORNHOST_V6_FLAG = 0x1 << 4
STOREHOST_V6_FLAG = 0x1 << 5

#: Separators of the properties string: name \x01 value \x02 ...
NAME_VALUE_SEPARATOR = "\x01"
PROPERTY_SEPARATOR = "\x02"


class ProtocolError(Exception):
    """The peer broke the remoting format: the connection cannot be trusted any more."""


@dataclass
class Command:
    """One request or response."""

    code: int
    ext_fields: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    opaque: int = 0
    flag: int = 0
    remark: str | None = None
    language: str = "PYTHON"
    version: int = CLIENT_VERSION

    @property
    def is_response(self) -> bool:
        return bool(self.flag & RESPONSE_FLAG)

    @property
    def is_oneway(self) -> bool:
        return bool(self.flag & ONEWAY_FLAG)

    def response(self, code: int, remark: str | None = None,
                 ext_fields: Mapping[str, str] | None = None, body: bytes = b"") -> Command:
        """The response to this request."""
        return Command(code, dict(ext_fields or {}), body, self.opaque, RESPONSE_FLAG, remark)

    def encode(self) -> bytes:
        header = json.dumps({
            "code": self.code, "language": self.language, "version": self.version,
            "opaque": self.opaque, "flag": self.flag, "remark": self.remark,
            "extFields": {k: str(v) for k, v in self.ext_fields.items()},
            "serializeTypeCurrentRPC": "JSON",
        }, separators=(",", ":")).encode("utf-8")
        length = 4 + len(header) + len(self.body)
        if length > MAX_FRAME_BYTES:
            raise ProtocolError(f"a frame of {length} bytes is over the limit of "
                                f"{MAX_FRAME_BYTES}")
        return struct.pack(">II", length, (JSON_SERIALIZATION << 24) | len(header)) + header \
            + self.body


def _json_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"a header that is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("code"), int):
        raise ProtocolError("a header without a numeric code")
    return header


def _binary_header(raw: bytes) -> dict[str, Any]:
    # code(2) language(1) version(2) opaque(4) flag(4) remark(4+n) ext(4+n)
    try:
        code, _language, version, opaque, flag, remark_len = struct.unpack_from(">hBhiii", raw)
        at = 17
        remark = raw[at:at + remark_len].decode("utf-8") if remark_len > 0 else None
        at += max(remark_len, 0)
        (ext_len,) = struct.unpack_from(">i", raw, at)
        at += 4
        end = at + ext_len
        if remark_len < 0 or ext_len < 0 or end > len(raw):
            raise ProtocolError("a binary header whose lengths run past its end")
        ext: dict[str, str] = {}
        while at < end:
            (key_len,) = struct.unpack_from(">h", raw, at)
            key = raw[at + 2:at + 2 + key_len].decode("utf-8")
            at += 2 + key_len
            (value_len,) = struct.unpack_from(">i", raw, at)
            value = raw[at + 4:at + 4 + value_len].decode("utf-8")
            at += 4 + value_len
            if key_len < 0 or value_len < 0 or at > end:
                raise ProtocolError("a binary header field runs past its end")
            ext[key] = value
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"a binary header that does not parse: {exc}") from None
    return {"code": code, "version": version, "opaque": opaque, "flag": flag,
            "remark": remark, "extFields": ext}


def decode_frame(frame: bytes) -> Command:
    """One command from a frame without its leading length."""
    if len(frame) < 4:
        raise ProtocolError(f"a frame of {len(frame)} bytes has no header length")
    (mark,) = struct.unpack_from(">I", frame)
    kind, header_len = mark >> 24, mark & 0xFFFFFF
    if header_len > len(frame) - 4:
        raise ProtocolError(f"a header of {header_len} bytes in a frame of {len(frame)}")
    raw = frame[4:4 + header_len]
    if kind == JSON_SERIALIZATION:
        header = _json_header(raw)
    elif kind == BINARY_SERIALIZATION:
        header = _binary_header(raw)
    else:
        raise ProtocolError(f"an unknown header serialization {kind}")
    ext = header.get("extFields") or {}
    if not isinstance(ext, dict):
        raise ProtocolError("header fields that are not an object")
    for name in ("opaque", "flag"):
        if not isinstance(header.get(name, 0), int):
            raise ProtocolError(f"a header whose {name} is not a number")
    remark = header.get("remark")
    return Command(
        code=header["code"], ext_fields={str(k): str(v) for k, v in ext.items()},
        body=frame[4 + header_len:], opaque=header.get("opaque", 0),
        flag=header.get("flag", 0), remark=remark if isinstance(remark, str) else None,
        language=str(header.get("language", "JAVA")),
        version=header.get("version", 0) if isinstance(header.get("version"), int) else 0,
    )


class FrameReader:
    """Whole commands out of a byte stream, as they arrive."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Command]:
        self._buffer += data
        while len(self._buffer) >= 4:
            (length,) = struct.unpack_from(">I", self._buffer)
            if length < 4 or length > self.max_frame:
                raise ProtocolError(f"a frame length of {length} bytes (the limit is "
                                    f"{self.max_frame})")
            if len(self._buffer) < 4 + length:
                return
            frame = bytes(self._buffer[4:4 + length])
            del self._buffer[:4 + length]
            yield decode_frame(frame)

    @property
    def pending(self) -> int:
        """Bytes of a frame not complete yet."""
        return len(self._buffer)


# -- properties ----------------------------------------------------------------------


def encode_properties(properties: Mapping[str, str]) -> str:
    for name, value in properties.items():
        for part in (name, value):
            if NAME_VALUE_SEPARATOR in part or PROPERTY_SEPARATOR in part:
                raise ValueError(f"property {name!r} holds a separator character "
                                 "(\\x01 or \\x02)")
    return "".join(f"{k}{NAME_VALUE_SEPARATOR}{v}{PROPERTY_SEPARATOR}"
                   for k, v in properties.items())


def decode_properties(text: str) -> dict[str, str]:
    properties: dict[str, str] = {}
    for item in text.split(PROPERTY_SEPARATOR):
        name, sep, value = item.partition(NAME_VALUE_SEPARATOR)
        if sep and name:
            properties[name] = value
    return properties


# -- batches (SEND_BATCH_MESSAGE's body) -------------------------------------------------

#: The largest message the broker stores (its default ``maxMessageSize``, 4 MiB); a
#: batch is stored as one append, so all of a batch's stored messages together too.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Properties are a Java ``short``-sized string in every format.
MAX_PROPERTIES_BYTES = 32767


@dataclass(frozen=True)
class BatchItem:
    """One message of a batch: its body, its properties (already encoded with
    :func:`encode_properties`) and its flag."""

    body: bytes
    properties: str
    flag: int = 0


def encode_batch(items: Sequence[BatchItem]) -> bytes:
    """A batch as Java's ``MessageDecoder.encodeMessages`` writes it, the body of
    SEND_BATCH_MESSAGE: per message its total size, a magic code and a body CRC
    (both 0: the broker computes the CRC), its flag, the body with its length, and
    the properties with a 2-byte length."""
    parts = []
    for item in items:
        props = item.properties.encode("utf-8")
        if len(props) > MAX_PROPERTIES_BYTES:
            raise ValueError(f"a message's properties take {len(props)} bytes; RocketMQ "
                             f"takes at most {MAX_PROPERTIES_BYTES}")
        size = 4 + 4 + 4 + 4 + 4 + len(item.body) + 2 + len(props)
        parts.append(struct.pack(">iiiii", size, 0, 0, item.flag, len(item.body)) + item.body
                     + struct.pack(">h", len(props)) + props)
    return b"".join(parts)


def decode_batch(data: bytes) -> list[BatchItem]:
    """The messages of an encoded batch (Java's ``MessageDecoder.decodeMessages``):
    what a fake broker in a test reads out of SEND_BATCH_MESSAGE."""
    items = []
    at = 0
    try:
        while at < len(data):
            size, _magic, _crc, flag, body_len = struct.unpack_from(">iiiii", data, at)
            body = data[at + 20:at + 20 + body_len]
            (props_len,) = struct.unpack_from(">h", data, at + 20 + body_len)
            start = at + 22 + body_len
            props = data[start:start + props_len].decode("utf-8")
            if size != 22 + body_len + props_len or body_len < 0 or props_len < 0 \
                    or start + props_len > len(data):
                raise ProtocolError(f"a batch message of {size} bytes at {at} does not add up")
            items.append(BatchItem(body, props, flag))
            at += size
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"a batch that does not parse: {exc}") from None
    return items


def stored_size(body_bytes: int, properties_bytes: int, topic_bytes: int) -> int:
    """How many bytes the broker stores for a message (IPv4 hosts): what counts
    against ``maxMessageSize``."""
    return 91 + body_bytes + topic_bytes + properties_bytes


def java_string_hash(text: str) -> int:
    """Java's ``String.hashCode()``: ``s[0]*31^(n-1) + ... + s[n-1]`` over the UTF-16
    code units, as a signed 32-bit int."""
    value = 0
    units = text.encode("utf-16-be")
    for i in range(0, len(units), 2):
        value = (31 * value + ((units[i] << 8) | units[i + 1])) & 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def hash_index(key: str, count: int) -> int:
    """The index RocketMQ's ``SelectMessageQueueByHash`` picks among ``count``
    queues for ``key``: Java's remainder of the key's hash code, made positive."""
    if count < 1:
        raise ValueError("no queue to choose from")
    # Java: Math.abs(hash % count), its % keeping the dividend's sign: the same as
    # abs(hash) % count in Python's integers (Integer.MIN_VALUE included).
    return abs(java_string_hash(key)) % count


# -- stored messages (pull results, check-back requests) ------------------------------

MESSAGE_MAGIC_V1 = -626843481
MESSAGE_MAGIC_V2 = -626843477


@dataclass(frozen=True)
class StoredMessage:
    """A message as the broker stored it."""

    topic: str
    body: bytes
    properties: dict[str, str]
    queue_id: int
    queue_offset: int
    commit_log_offset: int
    sys_flag: int
    born_timestamp: int
    store_timestamp: int
    reconsume_times: int
    prepared_transaction_offset: int
    offset_msg_id: str

    @property
    def msg_id(self) -> str:
        """The id users see: the producer's unique key, else the offset id."""
        return self.properties.get("UNIQ_KEY") or self.offset_msg_id

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.properties.get("KEYS", "").split(" ") if k)

    @property
    def tag(self) -> str | None:
        return self.properties.get("TAGS") or None


def offset_msg_id(host: bytes, port: int, commit_log_offset: int) -> str:
    """The broker's id of a stored message: its store address and commit log offset."""
    return (host + struct.pack(">iq", port, commit_log_offset)).hex().upper()


def commit_log_offset_of(offset_id: str) -> int:
    """The commit log offset inside an offset message id (IPv4 or IPv6 store host)."""
    try:
        raw = bytes.fromhex(offset_id)
    except ValueError:
        raise ProtocolError(f"an offset message id that is not hex: {offset_id!r}") from None
    if len(raw) not in (16, 28):
        raise ProtocolError(f"an offset message id of {len(raw)} bytes: {offset_id!r}")
    (offset,) = struct.unpack_from(">q", raw, len(raw) - 8)
    return int(offset)


def decode_messages(data: bytes) -> list[StoredMessage]:
    """Every stored message in a pull result's body, in order."""
    messages = []
    at = 0
    while at < len(data):
        message, at = _decode_one(data, at)
        messages.append(message)
    return messages


def _decode_one(data: bytes, at: int) -> tuple[StoredMessage, int]:
    try:
        size, magic = struct.unpack_from(">ii", data, at)
        end = at + size
        if size < 20 or end > len(data):
            raise ProtocolError(f"a stored message of {size} bytes at {at} in {len(data)}")
        if magic not in (MESSAGE_MAGIC_V1, MESSAGE_MAGIC_V2):
            raise ProtocolError(f"a stored message with an unknown magic code {magic}")
        (_crc, queue_id, _flag, queue_offset, physical_offset, sys_flag,
         born_ts) = struct.unpack_from(">iiiqqiq", data, at + 8)
        pos = at + 8 + 40
        pos += (16 if sys_flag & BORNHOST_V6_FLAG else 4) + 4
        (store_ts,) = struct.unpack_from(">q", data, pos)
        pos += 8
        host_len = 16 if sys_flag & STOREHOST_V6_FLAG else 4
        store_host = data[pos:pos + host_len]
        (store_port,) = struct.unpack_from(">i", data, pos + host_len)
        pos += host_len + 4
        reconsume, prepared_offset, body_len = struct.unpack_from(">iqi", data, pos)
        pos += 16
        body = data[pos:pos + body_len]
        pos += body_len
        if sys_flag & COMPRESSED_FLAG:
            body = zlib.decompress(body)
        if magic == MESSAGE_MAGIC_V2:
            (topic_len,) = struct.unpack_from(">h", data, pos)
            pos += 2
        else:
            topic_len = data[pos]
            pos += 1
        topic = data[pos:pos + topic_len].decode("utf-8")
        pos += topic_len
        (props_len,) = struct.unpack_from(">h", data, pos)
        pos += 2
        properties = decode_properties(data[pos:pos + props_len].decode("utf-8"))
        pos += props_len
        if body_len < 0 or props_len < 0 or pos > end:
            raise ProtocolError("a stored message whose fields run past its size")
    except (struct.error, IndexError, UnicodeDecodeError, zlib.error) as exc:
        raise ProtocolError(f"a stored message that does not parse: {exc}") from None
    return StoredMessage(
        topic=topic, body=body, properties=properties, queue_id=queue_id,
        queue_offset=queue_offset, commit_log_offset=physical_offset, sys_flag=sys_flag,
        born_timestamp=born_ts, store_timestamp=store_ts, reconsume_times=reconsume,
        prepared_transaction_offset=prepared_offset,
        offset_msg_id=offset_msg_id(store_host, store_port, physical_offset),
    ), end


def encode_stored(topic: str, body: bytes, *, properties: str = "", queue_id: int = 3,
                  queue_offset: int = 7, commit_log_offset: int = 123456, sys_flag: int = 0,
                  reconsume_times: int = 2, magic: int = MESSAGE_MAGIC_V1) -> bytes:
    """A message in the broker's stored format (IPv4 hosts): what a fake broker in a
    test sends back in a pull result or a check-back."""
    raw_body = zlib.compress(body) if sys_flag & COMPRESSED_FLAG else body
    topic_bytes = topic.encode("utf-8")
    topic_part = (struct.pack(">h", len(topic_bytes)) if magic == MESSAGE_MAGIC_V2
                  else bytes([len(topic_bytes)])) + topic_bytes
    props = properties.encode("utf-8")
    rest = (
        struct.pack(">iiiqqiq", 0, queue_id, 0, queue_offset, commit_log_offset, sys_flag,
                    1000)
        + bytes([127, 0, 0, 1]) + struct.pack(">i", 5555)
        + struct.pack(">q", 2000) + bytes([127, 0, 0, 1]) + struct.pack(">i", 20911)
        + struct.pack(">iqi", reconsume_times, 99, len(raw_body)) + raw_body + topic_part
        + struct.pack(">h", len(props)) + props
    )
    return struct.pack(">ii", 8 + len(rest), magic) + rest
