"""Which transport the services talk through: the embedded SQL transport, RocketMQ,
or any broker by URL.

Every service takes ``--transport sql`` (the default: a queue table in the database
given by ``--transport-db``), ``--transport rocketmq`` (a RocketMQ 5 broker,
reached through its gRPC proxy at ``--rocketmq-endpoints``, or a 4.x one through its
name server at ``--rocketmq-namesrv``) or ``--transport broker --broker URL`` (Kafka,
RabbitMQ, Redis Streams, NATS JetStream or an adapter of your own, by the URL's
scheme: see ``outbox.brokers``).
"""

from __future__ import annotations

import argparse
import os
from typing import Final

from outbox_rocketmq import RocketMQConfig

from .runtime import url_option

SQL: Final = "sql"
ROCKETMQ: Final = "rocketmq"
BROKER: Final = "broker"
TRANSPORTS: Final = (SQL, ROCKETMQ, BROKER)
DEFAULT_ENDPOINTS: Final = "127.0.0.1:8081"
ENDPOINTS_ENV: Final = "BANK_TRANSFER_ROCKETMQ_ENDPOINTS"
NAMESRV_ENV: Final = "BANK_TRANSFER_ROCKETMQ_NAMESRV"
BROKER_ENV: Final = "BANK_TRANSFER_BROKER_URL"
#: The producer group of the services' half messages on 4.x.
PRODUCER_GROUP: Final = "bank-transfer-producer"


def add_transport_options(parser: argparse.ArgumentParser, transport_db_help: str | None) -> None:
    """``--transport``, ``--rocketmq-endpoints`` and, unless ``transport_db_help`` is
    None (bank1 never reads the SQL transport), ``--transport-db``."""
    parser.add_argument("--transport", choices=TRANSPORTS, default=SQL,
                        help="sql (default): the embedded SQL transport; rocketmq: a RocketMQ "
                             "broker; broker: the broker at --broker URL")
    if transport_db_help is not None:
        url_option(parser, "--transport-db", f"{transport_db_help}; with --transport sql",
                   required=False)
    parser.add_argument(
        "--rocketmq-endpoints", default=os.environ.get(ENDPOINTS_ENV, DEFAULT_ENDPOINTS),
        help=f"host:port of the RocketMQ gRPC proxy, with --transport rocketmq "
             f"(default {DEFAULT_ENDPOINTS}, or set {ENDPOINTS_ENV})",
    )
    parser.add_argument(
        "--rocketmq-namesrv", default=os.environ.get(NAMESRV_ENV),
        help=f"host:port of a RocketMQ 4.x name server, with --transport rocketmq: the "
             f"brokers are reached over the remoting protocol instead of the proxy "
             f"(or set {NAMESRV_ENV})",
    )
    parser.add_argument(
        "--broker", default=os.environ.get(BROKER_ENV), metavar="URL",
        help="with --transport broker: the broker's URL, e.g. kafka://127.0.0.1:19092, "
             f"amqp://user:password@127.0.0.1:5672/%%2F, redis://127.0.0.1:6379/0, "
             f"nats://127.0.0.1:4222 (or set {BROKER_ENV})",
    )


def check_transport_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error when ``--transport sql`` lacks ``--transport-db`` or
    ``--transport broker`` lacks ``--broker``."""
    if args.transport == SQL and not args.transport_db:
        parser.error("--transport sql needs --transport-db (or BANK_TRANSFER_TRANSPORT_DB)")
    if args.transport == BROKER and not args.broker:
        parser.error(f"--transport broker needs --broker URL (or {BROKER_ENV})")


def rocketmq_config(endpoints: str, namesrv: str | None = None) -> RocketMQConfig:
    """The adapter's configuration for a broker without ACL (as the demo's): through
    the 5.x proxy, or straight to 4.x brokers when a name server is given."""
    if namesrv:
        return RocketMQConfig(namesrv=namesrv, producer_group=PRODUCER_GROUP)
    return RocketMQConfig(endpoints=endpoints)
