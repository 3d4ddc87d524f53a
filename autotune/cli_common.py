"""What every CLI module shares: the stderr console and the one-line error wrapper."""

from __future__ import annotations

import functools
from typing import Callable

import typer
from rich.console import Console

from autotune.errors import AutotuneError

err_console = Console(stderr=True)


def one_line_errors(fn: Callable) -> Callable:
    """Turn every AutotuneError into `error: <what and where>` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AutotuneError as e:
            err_console.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper
