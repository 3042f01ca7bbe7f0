"""Readiness probe for the local RocketMQ started by scripts/rocketmq.

Sends one message to a NORMAL topic and receives it back with a SimpleConsumer,
both through the gRPC proxy, using the official client (rocketmq-python-client,
module `rocketmq`). A listening port is not enough: the proxy accepts gRPC
connections before its broker can store or deliver anything, and
Producer.startup() succeeds even with no proxy at all.

Exit status 0 when the message came back before --timeout, 1 otherwise.
Run it with HOME pointing at a scratch folder: importing `rocketmq` writes its
log file under ~/logs/rocketmq_python.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", default="127.0.0.1:8081", help="gRPC proxy host:port")
    ap.add_argument("--topic", default="outbox-probe", help="an existing NORMAL or MIXED topic")
    ap.add_argument("--group", default="outbox-probe", help="consumer group of the probe")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up")
    args = ap.parse_args()

    start = time.monotonic()
    deadline = start + args.timeout

    # Imported here, not at the top: the import itself configures logging.
    from rocketmq import (
        ClientConfiguration,
        Credentials,
        FilterExpression,
        Message,
        Producer,
        SimpleConsumer,
    )

    config = ClientConfiguration(args.endpoint, Credentials(), request_timeout=5)
    token = f"probe-{uuid.uuid4().hex}"
    attempt = 0
    last_error: BaseException | None = None

    while time.monotonic() < deadline:
        attempt += 1
        producer = consumer = None
        try:
            consumer = SimpleConsumer(
                config, args.group, {args.topic: FilterExpression("*")}, await_duration=5
            )
            consumer.startup()
            producer = Producer(config, (args.topic,))
            producer.startup()
            # A new consumer group may start reading at the queue's end, after
            # a message sent just before its first receive: so send again
            # whenever a few receives did not bring the token back.
            while time.monotonic() < deadline:
                msg = Message()
                msg.topic = args.topic
                msg.body = token.encode()
                msg.tag = "probe"
                msg.keys = token
                receipt = producer.send(msg)
                for _ in range(3):
                    if time.monotonic() >= deadline:
                        break
                    for got in consumer.receive(16, 15):
                        # Ack everything, leftovers of earlier probes included,
                        # so the probe topic never piles up unconsumed messages.
                        consumer.ack(got)
                        if got.body == token.encode():
                            print(
                                f"probe ok: message {receipt.message_id} sent and received "
                                f"via {args.endpoint} in {time.monotonic() - start:.1f} s "
                                f"(attempt {attempt})"
                            )
                            return 0
        except Exception as exc:  # any failure means "not ready yet": retry until the deadline
            last_error = exc
            time.sleep(1)
        finally:
            for client in (producer, consumer):
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.shutdown()

    detail = (
        f"{type(last_error).__name__}: {last_error}" if last_error else "message never came back"
    )
    print(
        f"probe failed after {time.monotonic() - start:.1f} s ({attempt} attempts) "
        f"against {args.endpoint}, topic {args.topic}: {detail}",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
