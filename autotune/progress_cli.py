"""Progress on stderr for the commands' long steps, and the command's wall time.

Every step that can take more than a moment gets a line: a spinner, what it does and its elapsed time, and
under it a bar for each task the library reports while the step runs (``evaluate/progress.py`` events:
reference solves, finalists scored). When the step is done the bars give way to one line with its time.
Outside a terminal (a log, a pipe) steps print nothing: stderr then holds only warnings and errors, and a
failing command says one ``error:`` line.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TaskProgressColumn, TextColumn
from rich.progress import TimeElapsedColumn
from rich.text import Text

from autotune.cli_common import err_console
from autotune.evaluate.progress import ProgressEvent, ProgressFn

_IMPORTED = time.monotonic()


def command_seconds() -> float:
    """Wall seconds since this process started, i.e. what the user has waited (imports included).

    Linux says when the process started (/proc); elsewhere the clock starts when the CLI is imported,
    a fraction of a second later.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def _ignore(event: ProgressEvent) -> None:
    """The events' sink where nothing is drawn."""


def _columns() -> tuple:
    return (SpinnerColumn(), TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=16), TaskProgressColumn(), TimeElapsedColumn())


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
