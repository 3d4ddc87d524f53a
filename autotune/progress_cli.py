"""Progress on stderr for the commands' long steps, and the command's wall time.

Every step that can take more than a moment gets a line: a spinner, what it does and its elapsed time, and
under it a bar for each task the library reports while the step runs (``evaluate/progress.py`` events:
reference solves, finalists scored). When the step is done the bars give way to one line with its time.
Outside a terminal (a log, a pipe) steps print nothing: stderr then holds only warnings and errors, and a
failing command says one ``error:`` line.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TaskProgressColumn, TextColumn
from rich.progress import TimeElapsedColumn
from rich.table import Column
from rich.text import Text

from autotune.cli_common import err_console
from autotune.evaluate.progress import ProgressEvent, ProgressFn

def command_seconds() -> float:
    """Wall seconds since the package was first imported, i.e. what the user has waited for the command (the
    imports of torch and the rest included; the interpreter's own start, tens of milliseconds, not).

    Not the process's start time from /proc: a shell that runs ``install && autotune ...`` may exec the last
    command in its own process, whose start was then the install's (``bash -c``, a Dockerfile's RUN)."""
    import autotune

    return time.monotonic() - autotune.STARTED


def _ignore(event: ProgressEvent) -> None:
    """The events' sink where nothing is drawn."""


def _columns() -> tuple:
    # a description too long for the terminal folds onto a second line: left to itself rich keeps it whole on one
    # and squeezes the other columns, in 80 columns cutting the elapsed time of any description over 62 characters
    whole = Column(no_wrap=True)
    return (SpinnerColumn(), TextColumn("{task.description}", markup=False, table_column=Column(overflow="fold")),
            BarColumn(bar_width=16), TaskProgressColumn(table_column=whole), TimeElapsedColumn(table_column=whole))


@contextmanager
def step(description: str) -> Iterator[ProgressFn]:
    """A line for ``description`` while the block runs; yields the callback for the library's events.

    Each distinct event task gets its own bar, indented under the step's line. A step that fails leaves
    nothing behind (the error says what happened).
    """
    if not err_console.is_terminal:  # a log or a pipe: no spinner frames, no stray blank lines
        yield _ignore
        return
    started = time.monotonic()
    with Progress(*_columns(), console=err_console, transient=True) as bar:
        bar.add_task(description, total=None)
        tasks: dict[str, TaskID] = {}

        def on_event(event: ProgressEvent) -> None:
            if event.task not in tasks:
                tasks[event.task] = bar.add_task(f"  {event.task}", total=event.total)
            bar.update(tasks[event.task], completed=event.done, total=event.total)

        yield on_event
    err_console.print(Text.assemble(("done", "green"), f" {description} ({time.monotonic() - started:.1f} s)"))
