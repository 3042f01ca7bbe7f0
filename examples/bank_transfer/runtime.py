"""What every process of the example shares: logging, and stopping on a signal."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

import structlog


def configure_logging(service: str, level: int = logging.INFO) -> None:
    """Render structlog events and stdlib records (uvicorn, SQLAlchemy) alike.

    Every line names the ``service``, because the demo's log files are read side
    by side. Colours only when stderr is a terminal, so log files stay plain.
    """
    colors = sys.stderr.isatty()

    def add_service(
        _logger: object, _method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event.setdefault("service", service)
        return event

    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_service,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(colors=colors),
        ],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a loop can finish its batch and exit."""
    stop = threading.Event()

    def handle(_signum: int, _frame: FrameType | None) -> None:
        stop.set()  # only this: logging here could re-enter a handler mid-write

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def url_env_var(option: str) -> str:
    """The environment variable standing in for a ``--db``-style option."""
    return "BANK_TRANSFER_" + option.lstrip("-").replace("-", "_").upper()


def url_option(
    parser: argparse.ArgumentParser, option: str, help_: str, *, required: bool = True
) -> None:
    """A database URL option that may come from the environment instead.

    ``--db`` falls back to ``BANK_TRANSFER_DB`` (and so on): a URL with a password
    on a command line is visible to every local user through ``ps``.
    """
    var = url_env_var(option)
    default = os.environ.get(var)
    parser.add_argument(option, default=default, required=required and default is None,
                        help=f"{help_} (or set {var})")
