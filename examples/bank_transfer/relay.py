"""The relay: publishes bank1's committed outbox rows onto the transport.

Run with ``python -m bank_transfer.relay --db BANK1_URL --transport-db URL`` (the
SQL transport), or ``--transport rocketmq [--rocketmq-endpoints HOST:PORT]``: then
bank1 sends half messages itself, and the relay publishes only the rows written
while the broker could not be reached; or ``--transport broker --broker URL``: every
transfer's message is an outbox row that the relay publishes to that broker. It
stops on SIGTERM or SIGINT after the batch in hand.
"""

from __future__ import annotations

import argparse

import structlog
import tenacity
from sqlalchemy import Engine

from outbox import Relay, RelayConfig, SqlTransport, create_engine
from outbox.brokers import Broker, masked, open_broker
from outbox.db import safe_url
from outbox.typing import Publisher
from outbox_rocketmq import RocketMQPublisher

from . import TOPIC
from .chaos import faults
from .observability import observe
from .runtime import configure_logging, stop_on_signals, url_option
from .transports import (
    BROKER,
    ROCKETMQ,
    add_transport_options,
    check_transport_options,
    rocketmq_config,
)

log = structlog.get_logger("bank_transfer.relay")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bank_transfer.relay", description=__doc__)
    url_option(parser, "--db", "bank1's database URL (its outbox table)")
    add_transport_options(parser, transport_db_help="the SQL transport's database URL")
    # The nudge after a commit only works inside bank1's process; here we poll.
    parser.add_argument("--poll-interval", type=float, default=0.1, help="seconds (default 0.1)")
    parser.add_argument("--max-attempts", type=int, default=RelayConfig.max_attempts,
                        help="failed publishes before a row is parked dead (default %(default)s)")
    parser.add_argument("--max-backoff", type=float, default=300.0,
                        help="longest wait between publish attempts, seconds (default 300)")
    args = parser.parse_args(argv)
    check_transport_options(parser, args)
    configure_logging("relay")
    stop = stop_on_signals()
    bank1 = create_engine(args.db)
    publisher: Publisher
    transport_engine: Engine | None = None
    broker: Broker | None = None
    if args.transport == ROCKETMQ:
        # Connects on the first row to publish: normal sends to the MIXED topic.
        config = rocketmq_config(args.rocketmq_endpoints, args.rocketmq_namesrv)
        publisher = RocketMQPublisher(config, [TOPIC])
        where = f"rocketmq {config.where}"
    elif args.transport == BROKER:
        broker = open_broker(args.broker)
        publisher = broker.publisher()
        where = masked(args.broker)
    else:
        transport_engine = create_engine(args.transport_db)
        publisher = SqlTransport(transport_engine).publisher()
        where = safe_url(args.transport_db)
    # Chaos runs only (see bank_transfer.chaos.faults): may die in the middle of a batch.
    publisher = faults.wrap_publisher(publisher)
    backoff = tenacity.wait_exponential(multiplier=1, min=min(1.0, args.max_backoff),
                                        max=args.max_backoff) + tenacity.wait_random(0, 0.5)
    relay = Relay(bank1, publisher, RelayConfig(
        poll_interval=args.poll_interval, max_attempts=args.max_attempts, backoff=backoff))
    log.info("relay_started", db=safe_url(args.db), transport=where)
    stop_observing = observe("relay", {"bank1": bank1})
    try:
        relay.run(stop)
    finally:
        stop_observing()
        publisher.close()
        if broker is not None:
            broker.close()
        bank1.dispose()
        if transport_engine is not None:
            transport_engine.dispose()
    log.info("relay_stopped")


if __name__ == "__main__":
    main()
