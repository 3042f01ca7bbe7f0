"""One TCP connection of the remoting protocol: requests paired with their responses,
one-way sends, and requests the peer sends us (a broker's check-back), each handed to
a handler off the reading thread.

A peer that breaks the format, closes the connection or stops answering fails the
requests waiting on it at once, with an error that says which peer and what it did;
the connection is then closed for good and the caller opens a new one.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError

from outbox.errors import BrokerUnavailableError
from outbox.log import get_logger

from .protocol import Command, FrameReader, ProtocolError

log = get_logger("outbox.rocketmq.remoting")

#: What a request from the peer is handed to (with the connection to answer on).
RequestHandler = Callable[["Connection", Command], None]


class RemotingError(BrokerUnavailableError):
    """A name server or broker could not be reached, broke the protocol, or did not
    answer in time: the request may be tried again (on a new connection)."""


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


class Connection:
    """A connection to ``address`` (``host:port``), open from construction.

    ``sent`` counts the requests sent on it by request code (a client passes one
    counter to all its connections)."""

    def __init__(self, address: str, *, connect_timeout: float = 3.0,
                 on_request: RequestHandler | None = None,
                 handlers: Executor | None = None,
                 sent: Counter[int] | None = None) -> None:
        self.address = address
        self._on_request = on_request
        self._handlers = handlers
        self.sent: Counter[int] = Counter() if sent is None else sent
        try:
            self._sock = socket.create_connection(parse_address(address), connect_timeout)
        except (OSError, ValueError) as exc:
            raise RemotingError(f"cannot connect to RocketMQ at {address}: {exc}; check "
                                "that the name server or broker runs there") from None
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Command]] = {}
        self._pending_lock = threading.Lock()
        self._opaque = itertools.count(1)
        self._closed: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"outbox-rmq-{address}",
                                        daemon=True)
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # -- sending -----------------------------------------------------------------------

    def request(self, command: Command, timeout: float) -> Command:
        """Send ``command`` and wait for its response."""
        future = self.request_async(command)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise RemotingError(
                f"RocketMQ at {self.address} did not answer request {command.code} in "
                f"{timeout:g} s") from None

    def request_async(self, command: Command) -> Future[Command]:
        """Send ``command``; its response comes as the result of the future returned
        (a RemotingError when the connection fails first). The caller bounds the
        wait; cancelling the future forgets the request (a late answer is dropped)."""
        command.opaque = opaque = next(self._opaque)
        future: Future[Command] = Future()
        with self._pending_lock:
            self._check_open()
            self._pending[opaque] = future
        future.add_done_callback(lambda _f: self._forget(opaque))
        self._send(command)
        return future

    def _forget(self, opaque: int) -> None:
        with self._pending_lock:
            self._pending.pop(opaque, None)

    def oneway(self, command: Command) -> None:
        """Send ``command`` without waiting for an answer."""
        command.opaque = next(self._opaque)
        command.flag |= 2
        self._send(command)

    def reply(self, response: Command) -> None:
        """Answer a request of the peer (``response`` from :meth:`Command.response`)."""
        self._send(response)

    def _send(self, command: Command) -> None:
        data = command.encode()
        with self._send_lock:
            self._check_open()
            if not command.is_response:
                self.sent[command.code] += 1
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._fail(f"the connection broke while sending ({exc})")
                raise RemotingError(f"RocketMQ at {self.address}: the connection broke "
                                    f"while sending ({exc})") from None

    def _check_open(self) -> None:
        if self._closed is not None:
            raise RemotingError(f"RocketMQ at {self.address}: {self._closed}")

    # -- receiving ---------------------------------------------------------------------

    def _read(self) -> None:
        reader = FrameReader()
        try:
            while True:
                try:
                    data = self._sock.recv(65536)
                except OSError as exc:
                    return self._fail(f"the connection broke ({exc})")
                if not data:
                    partly = f" in the middle of a frame ({reader.pending} bytes)" \
                        if reader.pending else ""
                    return self._fail(f"the peer closed the connection{partly}")
                try:
                    for command in reader.feed(data):
                        self._dispatch(command)
                except ProtocolError as exc:
                    log.warning("rocketmq_protocol_error", address=self.address,
                                error=str(exc))
                    return self._fail(f"the peer broke the remoting protocol ({exc}); the "
                                      "connection is closed and a new one will be opened")
        except Exception as exc:  # never let the reading thread die silently
            log.error("rocketmq_reader_failed", address=self.address,
                      error=f"{type(exc).__name__}: {exc}")
            self._fail(f"reading failed ({type(exc).__name__}: {exc})")

    def _dispatch(self, command: Command) -> None:
        if command.is_response:
            with self._pending_lock:
                future = self._pending.pop(command.opaque, None)
            if future is None:
                log.debug("rocketmq_late_response", address=self.address,
                          opaque=command.opaque, code=command.code)
                return
            with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                future.set_result(command)
            return
        if self._on_request is None:
            log.warning("rocketmq_unexpected_request", address=self.address, code=command.code)
            return
        if self._handlers is not None:
            self._handlers.submit(self._handle, command)
        else:
            self._handle(command)

    def _handle(self, command: Command) -> None:
        assert self._on_request is not None
        try:
            self._on_request(self, command)
        except Exception as exc:
            log.error("rocketmq_request_handler_failed", address=self.address,
                      code=command.code, error=f"{type(exc).__name__}: {exc}")

    # -- closing -----------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        with self._pending_lock:
            if self._closed is None:
                self._closed = reason
            futures = list(self._pending.values())
            self._pending.clear()
        for future in futures:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(RemotingError(f"RocketMQ at {self.address}: {reason}"))
        with contextlib.suppress(OSError):
            self._sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._fail("the connection was closed by this client")
        if threading.current_thread() is not self._reader:
            self._reader.join(2.0)
