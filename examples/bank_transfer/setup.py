"""The setup step: tables, outbox tables and seed accounts of both banks.

Run ``python -m bank_transfer.setup --bank1-db URL --bank2-db URL --transport-db URL``
before starting the services by hand (without ``--transport-db`` over RocketMQ);
the demo does this itself (with ``--reset``).
"""

from __future__ import annotations

import argparse

from sqlalchemy import Engine, select

import outbox
from outbox import SqlTransport, create_engine
from outbox.db import safe_url

from .models import BANKS, BankName


def setup(engine: Engine, bank: BankName, *, reset: bool = False) -> None:
    """Create the bank's tables and the outbox tables, and seed its accounts if absent.

    ``reset`` first drops them all, so that a run on a server database can repeat.
    """
    metadata, accounts, seeds = BANKS[bank]
    if reset:
        metadata.drop_all(engine)
        outbox.metadata.drop_all(engine)
    metadata.create_all(engine)
    outbox.metadata.create_all(engine)
    with engine.begin() as conn:
        for seed in seeds:
            found = conn.scalar(select(accounts.c.id)
                                .where(accounts.c.account_no == seed.account_no))
            if found is None:
                conn.execute(accounts.insert().values(
                    id=seed.id, account_name=seed.account_name, account_no=seed.account_no,
                    balance=seed.balance, frozen=seed.frozen,
                ))


def setup_transport(engine: Engine, *, reset: bool = False) -> None:
    """Create the SQL transport's queue tables, dropping them first if ``reset``."""
    transport = SqlTransport(engine)
    if reset:
        transport.drop_tables()
    transport.create_tables()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bank_transfer.setup", description=__doc__)
    parser.add_argument("--bank1-db", required=True)
    parser.add_argument("--bank2-db", required=True)
    parser.add_argument("--transport-db", help="the SQL transport's database (if used)")
    parser.add_argument("--reset", action="store_true", help="drop the tables first")
    args = parser.parse_args(argv)
    banks: list[tuple[BankName, str]] = [("bank1", args.bank1_db), ("bank2", args.bank2_db)]
    for bank, url in banks:
        engine = create_engine(url)
        setup(engine, bank, reset=args.reset)
        engine.dispose()
        print(f"{bank}: ready at {safe_url(url)}")
    if args.transport_db:
        engine = create_engine(args.transport_db)
        setup_transport(engine, reset=args.reset)
        engine.dispose()
        print(f"transport: ready at {safe_url(args.transport_db)}")


if __name__ == "__main__":
    main()
