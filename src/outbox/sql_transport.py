"""The embedded SQL transport: a queue in a database, shared by several processes.

Publishing inserts a row into ``outbox_transport_messages``. Each consumer group
keeps its own delivery state per message in ``outbox_transport_deliveries``
(visible-at time, attempts, done or dead with a reason), so every group gets every
message, unacknowledged deliveries come back after a visibility timeout, and
nothing published is skipped, whatever order concurrent publishers commit in.

A fetch costs the same with a thousand or a million messages kept: each group
keeps a cursor per topic in ``outbox_transport_cursors`` (the highest seq it has
scanned, and the seqs that were missing below it), so a fetch reads the new rows
and looks again at those gaps only. A publisher that commits after a later
message was already fetched is still delivered, up to ``late_commit_window``
seconds (15 minutes by default) after the fetch that passed its seq; see
:func:`outbox.sql_queue.claim`. A batch is one statement and one transaction.

Each operation on the queue is one function below that takes a
:class:`~sqlalchemy.Connection` with no transaction open and runs its statements in
transactions of its own. :class:`SqlTransport` calls them directly;
:class:`outbox.aio.AsyncSqlTransport` runs the very same functions in the event
loop through ``AsyncConnection.run_sync``. Decisions that sit between calls (how
long a fetch still waits) are small pure objects, also shared.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine

from .message import Message

# The tables and delivery states are named here too, where users look for them.
from .sql_queue import DEAD as DEAD
from .sql_queue import DEFAULT_LATE_COMMIT_WINDOW as DEFAULT_LATE_COMMIT_WINDOW
from .sql_queue import DONE as DONE
from .sql_queue import READY as READY
from .sql_queue import (
    DeadLetter,
    PollWait,
    check_dialect,
    check_late_commit_window,
    check_visibility_timeout,
    claim,
    count_states,
    create_tables,
    drop_tables,
    insert_messages,
    insert_raw,
    list_dead_letters,
    mark_dead,
    mark_done,
    mark_retry,
    pending,
    purge_older,
    wrapped_errors,
)
from .sql_queue import cursors as cursors
from .sql_queue import deliveries as deliveries
from .sql_queue import messages as messages
from .sql_queue import transport_metadata as transport_metadata
from .transport import Delivery

P = ParamSpec("P")
R = TypeVar("R")


class SqlTransport:
    """The queue tables of one database; hands out publishers and subscribers.

    ``poll_interval`` is how often a waiting ``fetch`` looks for new messages.
    ``late_commit_window`` is how long fetches go on looking for a message whose
    seq they passed before its publisher committed (PostgreSQL and MariaDB number
    a row at INSERT, and transactions commit in any order): longer than any
    publish transaction may take between its INSERT and its COMMIT.
    """

    def __init__(self, engine: Engine, *, poll_interval: float = 0.05,
                 late_commit_window: float = DEFAULT_LATE_COMMIT_WINDOW) -> None:
        check_dialect(engine.dialect)
        check_late_commit_window(late_commit_window)
        self.engine = engine
        self.poll_interval = poll_interval
        self.late_commit_window = late_commit_window

    def _run(self, fn: Callable[Concatenate[Connection, P], R], /,
             *args: P.args, **kwargs: P.kwargs) -> R:
        with self.engine.connect() as conn:
            return fn(conn, *args, **kwargs)

    def _call(self, fn: Callable[Concatenate[Connection, P], R], /,
              *args: P.args, **kwargs: P.kwargs) -> R:
        """:meth:`_run` for publishers and subscribers: errors become the project's."""
        with wrapped_errors(self.engine.url):
            return self._run(fn, *args, **kwargs)

    def create_tables(self) -> None:
        """Create the queue tables if they are missing."""
        self._run(create_tables)

    def drop_tables(self) -> None:
        """Drop the queue tables and everything on them."""
        self._run(drop_tables)

    def counts(self, topic: str, group: str) -> dict[str, int]:
        """Messages of ``topic`` by state for ``group``: ``unseen`` (never fetched),
        ``ready`` (waiting or in flight), ``done`` (acknowledged), ``dead``."""
        return self._run(count_states, topic, group)

    def publisher(self) -> SqlPublisher:
        return SqlPublisher(self)

    def subscriber(
        self, topic: str, group: str, *, visibility_timeout: float = 30.0
    ) -> SqlSubscriber:
        """A subscriber of ``topic`` for ``group``; a delivery not acknowledged (or
        retried) within ``visibility_timeout`` seconds is delivered again."""
        return SqlSubscriber(self, topic, group, visibility_timeout=visibility_timeout)

    def put_raw(
        self, topic: str, payload: bytes, *, message_id: str | None = None,
        key: str | None = None, tag: str | None = None, headers: Mapping[str, str] | None = None,
    ) -> None:
        """Put a row on the queue without validating it (for tests of bad input)."""
        self._run(insert_raw, topic, payload, message_id, key, tag, headers)

    def dead_letters(self, group: str, limit: int = 1000) -> list[DeadLetter]:
        """The dead-lettered deliveries of ``group`` with their reasons, oldest first."""
        return self._run(list_dead_letters, group, limit)

    def pending_count(self, topic: str, group: str) -> int:
        """Messages of ``topic`` not yet done or dead for ``group``."""
        return pending(self.counts(topic, group))

    def purge(self, older_than: dt.timedelta, batch_size: int = 1000) -> int:
        """Delete messages older than ``older_than`` (and their deliveries), batch by batch."""
        return self._run(purge_older, older_than, batch_size)


class SqlPublisher:
    """Publisher (and BatchPublisher) onto the SQL transport."""

    def __init__(self, transport: SqlTransport) -> None:
        self.transport = transport
        self.engine = transport.engine

    def publish(self, message: Message) -> None:
        self.publish_batch([message])

    def publish_batch(self, messages_: Sequence[Message]) -> None:
        """Publish all of ``messages_`` in one transaction, or none of them: one
        INSERT statement for the batch, then the commit."""
        self.transport._call(insert_messages, messages_)

    def close(self) -> None:
        pass


class SqlSubscriber:
    """Subscriber of one topic for one consumer group on the SQL transport."""

    #: Delivery.attempt is the broker's own count (outbox.typing.CountsDeliveries).
    counts_deliveries = True

    def __init__(self, transport: SqlTransport, topic: str, group: str, *,
                 visibility_timeout: float) -> None:
        check_visibility_timeout(visibility_timeout)
        self.transport = transport
        self.topic = topic
        self.group = group
        self.visibility_timeout = visibility_timeout

    def fetch(self, max_messages: int, wait_seconds: float) -> list[Delivery]:
        wait = PollWait(wait_seconds, self.transport.poll_interval)
        while True:
            found = self.transport._call(claim, self.topic, self.group, max_messages,
                                         self.visibility_timeout,
                                         self.transport.late_commit_window)
            pause = wait.pause(found)
            if pause is None:
                return found
            time.sleep(pause)

    def ack(self, delivery: Delivery) -> None:
        self.transport._call(mark_done, self.group, delivery)

    def retry(self, delivery: Delivery, delay_seconds: float, error: str) -> None:
        self.transport._call(mark_retry, self.group, delivery, delay_seconds, error)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self.transport._call(mark_dead, self.group, delivery, reason)

    def close(self) -> None:
        pass
