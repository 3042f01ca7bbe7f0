"""The relay: publishes bank1's committed outbox rows onto the SQL transport.

Run with ``python -m bank_transfer.relay --db BANK1_URL --transport-db URL``; it
stops on SIGTERM or SIGINT after the batch in hand.
"""

from __future__ import annotations

import argparse

import structlog

from outbox import Relay, RelayConfig, SqlTransport, create_engine
from outbox.db import safe_url

from .runtime import configure_logging, stop_on_signals, url_option

log = structlog.get_logger("bank_transfer.relay")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bank_transfer.relay", description=__doc__)
    url_option(parser, "--db", "bank1's database URL (its outbox table)")
    url_option(parser, "--transport-db", "the SQL transport's database URL")
    # The nudge after a commit only works inside bank1's process; here we poll.
    parser.add_argument("--poll-interval", type=float, default=0.1, help="seconds (default 0.1)")
    args = parser.parse_args(argv)
    configure_logging("relay")
    stop = stop_on_signals()
    bank1 = create_engine(args.db)
    transport = SqlTransport(create_engine(args.transport_db))
    relay = Relay(bank1, transport.publisher(), RelayConfig(poll_interval=args.poll_interval))
    log.info("relay_started", db=safe_url(args.db), transport=safe_url(args.transport_db))
    try:
        relay.run(stop)
    finally:
        bank1.dispose()
        transport.engine.dispose()
    log.info("relay_stopped")


if __name__ == "__main__":
    main()
