"""The shipped transport contract (outbox.testing.contract) on the project's embedded
transports: the in-memory broker and the SQL transport on every database, each in its
sync and asyncio form (the ``contract_transport`` fixture of conftest.py)."""

from __future__ import annotations

from outbox.testing.contract import TransportContract


class TestEmbeddedTransports(TransportContract):
    """Every test of the contract, on every (backend, flavour)."""
