"""Which transport the services talk through: the embedded SQL transport or RocketMQ.

Every service takes ``--transport sql`` (the default: a queue table in the database
given by ``--transport-db``) or ``--transport rocketmq`` (a RocketMQ 5 broker,
reached through its gRPC proxy at ``--rocketmq-endpoints``).
"""

from __future__ import annotations

import argparse
import os
from typing import Final

from outbox_rocketmq import RocketMQConfig

from .runtime import url_option

SQL: Final = "sql"
ROCKETMQ: Final = "rocketmq"
TRANSPORTS: Final = (SQL, ROCKETMQ)
DEFAULT_ENDPOINTS: Final = "127.0.0.1:8081"
ENDPOINTS_ENV: Final = "BANK_TRANSFER_ROCKETMQ_ENDPOINTS"


def add_transport_options(parser: argparse.ArgumentParser, transport_db_help: str | None) -> None:
    """``--transport``, ``--rocketmq-endpoints`` and, unless ``transport_db_help`` is
    None (bank1 never reads the SQL transport), ``--transport-db``."""
    parser.add_argument("--transport", choices=TRANSPORTS, default=SQL,
                        help="sql (default): the embedded SQL transport; rocketmq: a broker")
    if transport_db_help is not None:
        url_option(parser, "--transport-db", f"{transport_db_help}; with --transport sql",
                   required=False)
    parser.add_argument(
        "--rocketmq-endpoints", default=os.environ.get(ENDPOINTS_ENV, DEFAULT_ENDPOINTS),
        help=f"host:port of the RocketMQ gRPC proxy, with --transport rocketmq "
             f"(default {DEFAULT_ENDPOINTS}, or set {ENDPOINTS_ENV})",
    )


def check_transport_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error when ``--transport sql`` lacks ``--transport-db``."""
    if args.transport == SQL and not args.transport_db:
        parser.error("--transport sql needs --transport-db (or BANK_TRANSFER_TRANSPORT_DB)")


def rocketmq_config(endpoints: str) -> RocketMQConfig:
    """The adapter's configuration for a broker without ACL (as the demo's)."""
    return RocketMQConfig(endpoints=endpoints)
