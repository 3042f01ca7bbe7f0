"""Typed configuration of the RocketMQ adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from outbox.errors import ConfigurationError


@dataclass(frozen=True)
class RocketMQConfig:
    """Where the RocketMQ 5 gRPC proxy is and how to talk to it.

    ``endpoints`` is ``host:port`` of the proxy's gRPC port (8081 by default), or
    several separated by ``;``. ``access_key``/``secret_key`` are for brokers with
    ACL; the secret is never shown in ``repr`` or logs.
    """

    endpoints: str = "127.0.0.1:8081"
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    namespace: str = ""
    request_timeout: float = 5.0

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
