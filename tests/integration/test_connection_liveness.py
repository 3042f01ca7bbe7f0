"""No ping on the hot path: a pooled connection is pinged only after it sat unused
for ``ping_after_idle`` seconds, and a connection the server dropped meanwhile is
replaced before the transaction starts."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import URL, text

import outbox
import outbox.testing

pytestmark = pytest.mark.postgres


def counted_pings(engine: Any) -> list[bool]:
    pings: list[bool] = []
    real = engine.dialect.do_ping

    def ping(dbapi_connection: Any) -> bool:
        try:
            alive = bool(real(dbapi_connection))
        except Exception:
            alive = False
        pings.append(alive)
        return alive

    engine.dialect.do_ping = ping
    return pings


def test_back_to_back_transactions_send_no_ping(postgres_url: URL) -> None:
    engine = outbox.create_engine(postgres_url)
    pings = counted_pings(engine)
    try:
        for _ in range(20):
            with engine.begin() as conn:
                conn.execute(text("SELECT 1"))
        assert pings == []
    finally:
        engine.dispose()


def test_a_connection_dropped_while_idle_is_replaced_before_the_transaction(
        postgres_url: URL) -> None:
    engine = outbox.create_engine(postgres_url, ping_after_idle=0.0, pool_size=1)
    pings = counted_pings(engine)
    admin = outbox.create_engine(postgres_url, ping_after_idle=None)
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with admin.begin() as conn:  # the server drops the idle pooled connection
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        with engine.begin() as conn:  # found dead by the ping, replaced: no error here
            new_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert new_pid != pid
        assert pings[:1] == [False]
    finally:
        engine.dispose()
        admin.dispose()


def test_ping_after_idle_must_not_be_negative(postgres_url: URL) -> None:
    with pytest.raises(outbox.ConfigurationError, match="ping_after_idle"):
        outbox.create_engine(postgres_url, ping_after_idle=-1)


def listening_sessions(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'LISTEN %'")).scalar_one())


def test_a_stopped_relay_leaves_no_listening_connection(postgres_url: URL) -> None:
    engine = outbox.create_engine(postgres_url)
    outbox.metadata.create_all(engine)
    relay = outbox.Relay(engine, outbox.testing.InMemoryBroker(),
                         outbox.RelayConfig(poll_interval=0.05))
    try:
        before = listening_sessions(engine)
        relay.start()
        deadline = time.monotonic() + 10
        while listening_sessions(engine) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert listening_sessions(engine) == before + 1
        relay.stop()
        # stop() returns once the listener closed its connection, not a second later.
        assert listening_sessions(engine) == before
    finally:
        relay.stop()
        engine.dispose()
