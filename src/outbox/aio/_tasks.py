"""The task an asyncio relay or consumer runs in."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import ConfigurationError


class Background:
    """A loop of work as a task of the running event loop.

    It starts with a context of its own, not the caller's (a request's transaction
    must not follow it), and stops gently: :meth:`stop` waits for the work in hand
    to finish, and cancels the task only past its timeout.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._task: asyncio.Task[None] | None = None

    def start(self, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._task is not None and not self._task.done():
            raise ConfigurationError(f"{self.what} already started")
        self._task = asyncio.get_running_loop().create_task(
            run(), name=f"outbox-{self.what}", context=contextvars.Context())

    async def stop(self, timeout: float | None) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
