"""Typed configuration of the RocketMQ adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from outbox.errors import ConfigurationError

#: The producer group of a 4.x producer when none is given.
DEFAULT_PRODUCER_GROUP = "outbox-producer"


@dataclass(frozen=True)
class RocketMQConfig:
    """Where RocketMQ is and how to talk to it.

    RocketMQ 5 through its gRPC proxy: ``endpoints`` is ``host:port`` of the proxy's
    gRPC port (8081 by default), or several separated by ``;``.

    RocketMQ 4.x (or a 5.x broker without the proxy): ``namesrv`` is the name
    server's ``host:port`` (9876 by default; several separated by ``;``); the
    adapter then speaks the remoting protocol to the brokers itself and
    ``endpoints`` is not used. ``producer_group`` names the transactional
    producer's group there: the broker sends a half message's check-backs to the
    producers of the group that sent it.

    ``access_key``/``secret_key`` are for brokers with ACL (5.x proxy); the secret
    is never shown in ``repr`` or logs.
    """

    endpoints: str = "127.0.0.1:8081"
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    namespace: str = ""
    request_timeout: float = 5.0
    namesrv: str | None = None
    producer_group: str = DEFAULT_PRODUCER_GROUP

    @property
    def where(self) -> str:
        """Where the adapter connects, for logs and errors."""
        if self.namesrv is not None:
            return f"name server {self.namesrv} (remoting)"
        return f"proxy {self.endpoints} (gRPC)"

    def __post_init__(self) -> None:
        if not self.endpoints or any(
            ":" not in part for part in self.endpoints.split(";") if part
        ):
            raise ConfigurationError(
                f"RocketMQ endpoints {self.endpoints!r} must be host:port of the gRPC proxy, "
                "e.g. 127.0.0.1:8081"
            )
        if (self.access_key is None) != (self.secret_key is None):
            raise ConfigurationError("give both access_key and secret_key, or neither")
        if self.request_timeout <= 0:
            raise ConfigurationError("request_timeout must be positive")
        if self.namesrv is not None and (not self.namesrv.strip() or any(
                ":" not in part for part in self.namesrv.split(";") if part.strip())):
            raise ConfigurationError(
                f"RocketMQ namesrv {self.namesrv!r} must be host:port of the name server, "
                "e.g. 127.0.0.1:9876")
        if self.namesrv is not None and self.access_key is not None:
            raise ConfigurationError(
                "access_key/secret_key are for the 5.x proxy; the remoting client does not "
                "sign requests yet")
        if not self.producer_group or not self.producer_group.strip():
            raise ConfigurationError("producer_group must not be empty")
