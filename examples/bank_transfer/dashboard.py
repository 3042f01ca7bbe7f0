"""The operator's dashboard over bank1's and bank2's databases (``outbox dashboard``).

Run with ``python -m bank_transfer.dashboard --bank1-db URL --bank2-db URL --port N``;
the URLs may come from the environment instead (BANK_TRANSFER_BANK1_DB, ...), and the
write token from OUTBOX_DASHBOARD_TOKEN (read-only without it). The demo starts it.
"""

from __future__ import annotations

import argparse

from outbox.cli import main as outbox_main

from .runtime import url_option


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_transfer.dashboard",
                                     description=__doc__)
    url_option(parser, "--bank1-db", "bank1's database URL")
    url_option(parser, "--bank2-db", "bank2's database URL")
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    args = parser.parse_args(argv)
    return outbox_main(["dashboard", "--db", args.bank1_db, "--db", args.bank2_db,
                        "--port", str(args.port), "--log-level", "warning"])


if __name__ == "__main__":
    raise SystemExit(main())
