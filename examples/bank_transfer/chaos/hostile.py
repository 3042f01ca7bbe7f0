"""Malformed and hostile messages, put straight onto the topic, and where they end.

Each must end dead-lettered with a reason that names what is wrong (the keyword
below), and change no balance. On the SQL transport they are rows put with
``SqlTransport.put_raw``; on RocketMQ 5, sends of a raw client producer (gRPC); on
RocketMQ 4.9, sends of a bare remoting client (``RemotingClient.send``); on the
brokers reached by URL, records or entries written with the broker's own client,
in the adapter's format where the case has the field. Every one carries its case in
property or header ``CHAOS_CASE`` (copied onto a dead letter),
and, where it has one, an id starting with the scenario's prefix so that bank2's
run filter passes it on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DataError, IntegrityError

from outbox import Delivery, SqlTransport
from outbox.brokers import open_broker, scheme_of
from outbox.codec import DEFAULT_MAX_PAYLOAD_BYTES
from outbox_rocketmq import RocketMQConfig, RocketMQSubscriber
from outbox_rocketmq._client import client_configuration, rocketmq
from outbox_rocketmq.mapping import MESSAGE_ID_PROPERTY
from outbox_rocketmq.remoting.client import RemotingClient

from .. import DEAD_LETTER_TOPIC, TOPIC

CASE_PROPERTY = "CHAOS_CASE"
#: A dead letter's reason and group (user properties OUTBOX_DEAD_REASON and
#: OUTBOX_DEAD_GROUP), as headers of the delivery, whichever client received it.
REASON_HEADER = "outbox-dead-reason"
GROUP_HEADER = "outbox-dead-group"


@dataclass(frozen=True)
class Case:
    name: str
    message_id: str | None
    payload: bytes
    reason: str  # a word the dead letter's reason must contain (lower case)


def _body(transfer_no: str, amount: Any = "1.00", to_account: Any = "2", **extra: Any) -> bytes:
    body = {"transfer_no": transfer_no, "to_account": to_account, "amount": amount, **extra}
    return json.dumps(body).encode()


def cases(prefix: str) -> list[Case]:
    """The hostile messages of one scenario; ids are ``<prefix>-X<case>``."""
    def mid(tag: str) -> str:
        return f"{prefix}-X{tag}"

    sql_id = mid("q'; DELETE FROM credits; --")
    out = [
        Case("missing-id", None, _body(mid("none")), "no message id"),
        Case("empty-payload", mid("empty"), b"", "empty"),
        Case("not-json", mid("notjson"), b"{transfer_no: nope", "json"),
        Case("invalid-utf8", mid("utf8"), b'{"transfer_no": "\xff\xfe\xfd"}', "utf-8"),
        Case("oversized", mid("big"),
             _body(mid("big"), pad="x" * (DEFAULT_MAX_PAYLOAD_BYTES + 16)), "limit"),
        Case("json-array", mid("array"), b"[1, 2, 3]", "json object"),
        Case("json-string", mid("string"), b'"pay me"', "json object"),
        Case("deep-json", mid("deep"), b"[" * 100_000 + b"]" * 100_000, "json"),
        Case("id-mismatch", mid("mismatch"), _body(mid("other")), "differs"),
        Case("id-too-long", mid("long" + "9" * 80), _body(mid("long" + "9" * 80)), "limit"),
        Case("amount-missing", mid("noamount"), _body(mid("noamount"), amount=None), "amount"),
        Case("amount-negative", mid("neg"), _body(mid("neg"), amount="-5.00"), "amount"),
        Case("amount-zero", mid("zero"), _body(mid("zero"), amount="0.00"), "amount"),
        Case("amount-text", mid("text"), _body(mid("text"), amount="abc"), "amount"),
        Case("amount-nan", mid("nan"), _body(mid("nan"), amount="NaN"), "amount"),
        Case("amount-decimals", mid("dec"), _body(mid("dec"), amount="1.001"), "amount"),
        Case("amount-float", mid("float"), _body(mid("float"), amount=1.5), "amount"),
        Case("amount-exponent", mid("exp"), _body(mid("exp"), amount="1e400"), "amount"),
        Case("amount-huge", mid("huge"),
             _body(mid("huge"), amount="99999999999999999999999999.99"), "amount"),
        Case("account-unknown", mid("acct"), _body(mid("acct"), to_account="999"), "account"),
        Case("account-number", mid("acctint"), _body(mid("acctint"), to_account=2), "account"),
        Case("account-sql", mid("acctsql"),
             _body(mid("acctsql"), to_account="2' OR '1'='1"), "account"),
        Case("account-nul", mid("acctnul"), _body(mid("acctnul"), to_account="2\u0000"),
             "account"),
        Case("transfer-no-sql", sql_id, _body(sql_id), "transfer_no"),
    ]
    return out


def put_sql(transport: SqlTransport, items: list[Case], prefix: str) -> dict[str, str]:
    """Put the cases onto the SQL transport's topic; returns case -> why the queue
    table refused it (an id longer than its column, on a server database)."""
    refused: dict[str, str] = {}
    for case in items:
        try:
            transport.put_raw(TOPIC, case.payload, message_id=case.message_id,
                              headers={CASE_PROPERTY: f"{prefix}:{case.name}"})
        except (DataError, IntegrityError) as exc:
            refused[case.name] = f"{type(exc.orig).__name__}: the queue table refused it"
    return refused


def sql_dead_letters(transport: SqlTransport, group: str, items: list[Case]) -> dict[str, str]:
    """Case name -> dead-letter reason, for the cases dead-lettered on the SQL transport."""
    by_id = {case.message_id: case.name for case in items}
    return {by_id[d.message_id]: d.reason or "" for d in transport.dead_letters(group, 10_000)
            if d.message_id in by_id}


#: On a shared broker bank2 acknowledges, unprocessed, every message that is not its
#: run's (``OnlyRun``), and a message without an id is no run's: it cannot be sent
#: to one chaos scenario. The SQL transport (no run filter) covers that case.
NOT_ON_ROCKETMQ = ("missing-id",)


def put_rocketmq(config: RocketMQConfig, items: list[Case], prefix: str) -> dict[str, str]:
    """Send the cases with a raw producer; returns case -> why the broker refused it
    (an empty body, say, never reaches the topic)."""
    items = [case for case in items if case.name not in NOT_ON_ROCKETMQ]
    if config.namesrv is not None:
        return _put_remoting(config.namesrv, items, prefix, config.request_timeout)
    rmq = rocketmq()
    producer = rmq.Producer(client_configuration(config), (TOPIC,))
    producer.startup()
    refused: dict[str, str] = {}
    try:
        for case in items:
            try:
                message = rmq.Message()
                message.topic = TOPIC
                message.body = case.payload
                message.add_property(CASE_PROPERTY, f"{prefix}:{case.name}")
                if case.message_id is not None:
                    message.add_property(MESSAGE_ID_PROPERTY, case.message_id)
                producer.send(message)
            except Exception as exc:  # the client's own checks: the message is not sent
                refused[case.name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    finally:
        producer.shutdown()
    return refused


def _put_remoting(namesrv: str, items: list[Case], prefix: str,
                  timeout: float) -> dict[str, str]:
    """The cases onto a 4.x topic, sent over the remoting protocol by a client of no
    producer group (plain sends, nothing the mapping adds)."""
    client = RemotingClient(namesrv, request_timeout=timeout).start([TOPIC])
    refused: dict[str, str] = {}
    try:
        for case in items:
            properties = {CASE_PROPERTY: f"{prefix}:{case.name}"}
            if case.message_id is not None:
                properties[MESSAGE_ID_PROPERTY] = case.message_id
            try:
                client.send(TOPIC, case.payload, properties)
            except Exception as exc:  # refused by the client's encoding or by the broker
                refused[case.name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    finally:
        client.close()
    return refused


class DeadLetterReader:
    """Reads the RocketMQ dead-letter topic with a group of its own, for a whole run
    (one per broker: 5.x through the proxy, 4.9 through its name server).

    Created (and received from once) before any scenario sends, because a new group
    may start at the end of the topic's queues (on 5.x; on 4.x it starts at the
    beginning and reads the topic's history once).
    """

    def __init__(self, config: RocketMQConfig, group: str) -> None:
        self.subscriber = RocketMQSubscriber(config, DEAD_LETTER_TOPIC, group,
                                             dead_letter_topic=TOPIC, invisible_seconds=10)
        self.seen: dict[str, tuple[str, str]] = {}  # CHAOS_CASE -> (group, reason)

    def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.poll()
                return
            except Exception:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def poll(self, rounds: int = 20) -> None:
        """Receive what is there: full batches are followed by another fetch (a 4.x
        group starts with the topic's history), at most ``rounds`` of them."""
        wait = 1.0
        for _ in range(rounds):
            got = self.subscriber.fetch(32, wait)
            for delivery in got:
                headers = delivery.headers
                case = headers.get(CASE_PROPERTY)
                if case:
                    self.seen[case] = (headers.get(GROUP_HEADER, ""),
                                       headers.get(REASON_HEADER, ""))
                self.subscriber.ack(delivery)
            if len(got) < 32:
                return
            wait = 0.0

    def reasons(self, prefix: str, group: str) -> dict[str, str]:
        """Case name -> reason, for this scenario's cases dead-lettered by ``group``."""
        out = {}
        for key, (dead_group, reason) in self.seen.items():
            scenario, _, name = key.partition(":")
            if scenario == prefix and dead_group == group:
                out[name] = reason
        return out

    def close(self) -> None:
        self.subscriber.close()


def put_native(url: str, items: list[Case], prefix: str) -> dict[str, str]:
    """The cases onto the topic of the broker at ``url``, written with its own client
    (Kafka records, Redis stream entries), bypassing the adapter's publisher."""
    items = [case for case in items if case.name not in NOT_ON_ROCKETMQ]
    broker = open_broker(url)
    refused: dict[str, str] = {}
    try:
        scheme = scheme_of(url)
        if scheme == "kafka":
            _put_kafka(broker, items, prefix, refused)
        elif scheme in ("redis", "rediss"):
            _put_redis(broker, items, prefix, refused)
        elif scheme in ("nats", "tls"):
            _put_nats(url, broker, items, prefix, refused)
        elif scheme in ("amqp", "amqps"):
            _put_amqp(url, broker, items, prefix, refused)
        else:
            raise RuntimeError(f"no raw writer for {scheme}:// brokers")
    finally:
        broker.close()
    return refused


def _put_kafka(broker: Any, items: list[Case], prefix: str, refused: dict[str, str]) -> None:
    from confluent_kafka import Producer

    from outbox_kafka.mapping import ID_HEADER, topic_name

    name = topic_name(broker.options.prefix, TOPIC)
    broker.options.ensure_topics([name])
    producer = Producer(broker.options.base)
    for case in items:
        headers: list[tuple[str, str | bytes | None]] = [
            (CASE_PROPERTY, f"{prefix}:{case.name}".encode())]
        if case.message_id is not None:
            headers.append((ID_HEADER, case.message_id.encode()))

        def receipt(error: Any, _record: Any, name: str = case.name) -> None:
            if error is not None:
                refused[name] = f"KafkaError: {error.str()[:120]}"
        try:
            producer.produce(name, value=case.payload, headers=headers, on_delivery=receipt)
        except Exception as exc:  # refused by the client (too large, say)
            refused[case.name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    producer.flush(30)


def _put_redis(broker: Any, items: list[Case], prefix: str, refused: dict[str, str]) -> None:
    from outbox_redis.mapping import HEADER_PREFIX, ID, PAYLOAD, stream_key

    key = stream_key(broker.options.prefix, TOPIC)
    for case in items:
        fields = {PAYLOAD: case.payload,
                  HEADER_PREFIX + CASE_PROPERTY.encode(): f"{prefix}:{case.name}".encode()}
        if case.message_id is not None:
            fields[ID] = case.message_id.encode()
        try:
            broker.client.xadd(key, fields)
        except Exception as exc:
            refused[case.name] = f"{type(exc).__name__}: {str(exc)[:120]}"


def _put_nats(url: str, broker: Any, items: list[Case], prefix: str,
              refused: dict[str, str]) -> None:
    import asyncio

    import nats

    from outbox_nats.mapping import MSG_ID, check_subject

    subject = check_subject(broker.options.prefix, TOPIC)

    async def put() -> None:
        client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            stream = client.jetstream()
            for case in items:
                headers = {CASE_PROPERTY: f"{prefix}:{case.name}"}
                if case.message_id is not None:
                    headers[MSG_ID] = case.message_id
                try:
                    await stream.publish(subject, case.payload, headers=headers, timeout=10)
                except Exception as exc:  # too large for the server, say
                    refused[case.name] = f"{type(exc).__name__}: {str(exc)[:120]}"
        finally:
            await client.close()

    asyncio.run(put())


def _put_amqp(url: str, broker: Any, items: list[Case], prefix: str,
              refused: dict[str, str]) -> None:
    import pika

    from outbox_rabbitmq.mapping import exchange_name

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for case in items:
            properties = pika.BasicProperties(
                message_id=case.message_id, delivery_mode=2,
                headers={CASE_PROPERTY: f"{prefix}:{case.name}"})
            try:
                channel.basic_publish(exchange_name(broker.options.prefix), TOPIC,
                                      case.payload, properties, mandatory=True)
            except Exception as exc:  # unroutable or refused by the server
                refused[case.name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    finally:
        connection.close()


class BrokerDeadLetters:
    """The dead letters of the topic on a broker reached by URL, as the adapter lists
    them (``dead_letters(topic, group)``), read afresh on each poll."""

    def __init__(self, url: str, group: str) -> None:
        self.broker: Any = open_broker(url)
        self.group = group
        self.seen: dict[str, tuple[str, str]] = {}

    def ready(self) -> None:
        self.poll()

    def poll(self) -> None:
        for item in self.broker.dead_letters(TOPIC, self.group):
            case, reason = _case_and_reason(item)
            if case:
                self.seen[case] = (self.group, reason)

    def reasons(self, prefix: str, group: str) -> dict[str, str]:
        return {name: reason for key, (dead_group, reason) in self.seen.items()
                for scenario, _, name in [key.partition(":")]
                if scenario == prefix and dead_group == group}

    def close(self) -> None:
        self.broker.close()


def _case_and_reason(item: Any) -> tuple[str, str]:
    """(CHAOS_CASE, reason) of one dead letter: a Delivery (Kafka: headers), a record
    with its own ``reason`` (NATS) or, from Redis, the entry's fields."""
    if isinstance(item, Delivery):
        return item.headers.get(CASE_PROPERTY, ""), item.headers.get(REASON_HEADER, "")
    if hasattr(item, "headers") and hasattr(item, "reason"):
        return item.headers.get(CASE_PROPERTY, ""), item.reason or ""
    fields = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in item.items()}
    return fields.get(f"h:{CASE_PROPERTY}", ""), fields.get("dead-reason", "")


#: Either reader of dead letters.
DeadLetters = DeadLetterReader | BrokerDeadLetters
