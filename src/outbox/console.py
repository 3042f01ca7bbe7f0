"""What the ``outbox`` command shows a person: progress bars on stderr for long work,
and tables on stdout (rich). On a terminal by default; piped or redirected, the
command prints plain lines that scripts can read (``--progress`` and ``--format``
override the choice)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

Choice = Literal["auto", "always", "never"]
CHOICES = ("auto", "always", "never")
FORMATS = ("auto", "table", "plain")


def _wanted(choice: str, stream: TextIO) -> bool:
    if choice == "auto":
        return stream.isatty()
    return choice == "always"


class Progress:
    """Progress of one or more tasks on stderr, or nothing (see the module)."""

    def __init__(self, choice: str = "auto") -> None:
        self.enabled = _wanted(choice, sys.stderr)
        self._bar: RichProgress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Progress:
        if self.enabled:
            console = Console(file=sys.stderr, force_terminal=True)
            self._bar = RichProgress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                console=console, transient=False)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def task(self, name: str, description: str, total: int | None = None) -> None:
        if self._bar is not None:
            self._tasks[name] = self._bar.add_task(description, total=total)

    def update(self, name: str, *, completed: int | None = None, advance: int = 0,
               total: int | None = None, description: str | None = None) -> None:
        if self._bar is None or name not in self._tasks:
            return
        kwargs: dict[str, Any] = {"advance": advance}
        if completed is not None:
            kwargs["completed"] = completed
        if total is not None:
            kwargs["total"] = total
        if description is not None:
            kwargs["description"] = description
        self._bar.update(self._tasks[name], **kwargs)

    def finish(self, name: str) -> None:
        """Mark ``name`` done (its total becomes what it completed)."""
        if self._bar is None or name not in self._tasks:
            return
        task = self._bar.tasks[self._tasks[name]]
        self._bar.update(self._tasks[name], total=task.completed, completed=task.completed)


@contextmanager
def progress(choice: str = "auto") -> Iterator[Progress]:
    with Progress(choice) as p:
        yield p


def age(seconds: float) -> str:
    """A duration as a person reads it: 42s, 3m 07s, 5h 02m, 3d 4h."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m" if hours < 48 else f"{hours // 24}d {hours % 24}h"


def tables_wanted(choice: str) -> bool:
    return choice == "table" or (choice == "auto" and sys.stdout.isatty())


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]],
                *, justify: Sequence[str] = ()) -> None:
    """``rows`` as a table on stdout (values are shown as text, never as markup)."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for i, column in enumerate(columns):
        table.add_column(column, justify=justify[i] if i < len(justify) else "left",  # type: ignore[arg-type]
                         overflow="fold")
    for row in rows:
        table.add_row(*(_plain(value) for value in row))
    Console(file=sys.stdout, markup=False, highlight=False,
            force_terminal=sys.stdout.isatty()).print(table)


def _plain(value: object) -> Any:
    from rich.text import Text

    return Text(str(value))
