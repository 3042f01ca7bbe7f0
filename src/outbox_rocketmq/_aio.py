"""What the asyncio forms of the adapter share: a small bounded thread pool for the
client's blocking calls, and the follow-up tasks an adapter must keep alive.

The client's transactional send, its end-transaction calls, startup, shutdown, ack
and change-invisible-duration block the calling thread (``ack_async`` of the
SimpleConsumer returns nothing, and the future behind it is an asyncio future
resolved from a client thread, which is not safe). They run here, on a few threads
owned by the adapter object, never one thread per message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from outbox.errors import ConfigurationError
from outbox.log import get_logger

log = get_logger("outbox.rocketmq")

T = TypeVar("T")

#: Threads of one adapter object's pool, unless its constructor says otherwise.
DEFAULT_WORKERS = 4


def check_workers(workers: int) -> int:
    if workers < 1:
        raise ConfigurationError("workers must be at least 1")
    return workers


class BlockingCalls:
    """A bounded pool of ``workers`` threads, created on first use, for blocking calls
    awaited from an event loop. :meth:`shutdown` lets queued calls finish; the pool
    comes back on the next call (a closed adapter may be started again)."""

    def __init__(self, name: str, workers: int = DEFAULT_WORKERS) -> None:
        self.name = name
        self.workers = check_workers(workers)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)``; returns its future at once."""
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.workers, thread_name_prefix=self.name)
            return self._pool.submit(fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the pool, awaited. A cancelled caller stops waiting; a call
        already running finishes on its thread."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    async def run_to_end(self, fn: Callable[..., T], *args: Any) -> T:
        """Like :meth:`run`, but once queued the call is never withdrawn, even if the
        caller is cancelled (an end-transaction call decided on must go out)."""
        return await asyncio.shield(asyncio.wrap_future(self.submit(fn, *args)))

    def shutdown(self, *, wait: bool) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait)


class FollowUps:
    """Tasks scheduled after a local outcome (end-transaction, guard settle), kept
    referenced until they finish so that the event loop cannot drop them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None],
                 what: str) -> None:
        """Run ``coro`` as a task of ``loop`` without blocking the caller. From another
        thread it is handed over thread-safely; a loop that is gone leaves the work
        undone (the broker's check-back settles it) and says so in the log."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._keep(loop.create_task(coro))
            return
        try:
            loop.call_soon_threadsafe(lambda: self._keep(loop.create_task(coro)))
        except RuntimeError:  # the loop is closed
            coro.close()
            log.warning("rocketmq_follow_up_dropped", what=what,
                        reason="its event loop is closed; the broker's check-back settles it")

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float | None) -> bool:
        """Wait until every scheduled task of the running loop finished (tasks scheduled
        meanwhile included); False if ``timeout`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        await asyncio.sleep(0)  # hand-overs from other threads become tasks
        while True:
            mine = [t for t in self._tasks if t.get_loop() is loop and not t.done()]
            if not mine:
                return True
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            await asyncio.wait(mine, timeout=left)
