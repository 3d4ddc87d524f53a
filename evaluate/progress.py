"""Progress events: how long library steps tell the CLI how far they are, without printing anything.

A step that can take more than a moment (solving a reference, scoring the finalists) takes an optional
``progress`` callback and calls it with a :class:`ProgressEvent` as it goes; the CLI turns the events into
progress bars on stderr (``autotune/progress_cli.py``). Torch-free, so any layer may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of the task ``task`` (a short label such as "reference, search set")."""

    task: str
    done: int
    total: int


ProgressFn = Callable[[ProgressEvent], None]


def report(progress: Optional[ProgressFn], task: str, done: int, total: int) -> None:
    """Send one event when someone listens."""
    if progress is not None:
        progress(ProgressEvent(task, done, total))
