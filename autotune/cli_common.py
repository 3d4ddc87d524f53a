"""What every CLI module shares: the consoles, the one-line error wrapper and the cache option.

The consoles print with Rich markup off: what we print is full of user text (paths, schedule and model
names, error messages quoting them), and with markup on, ``[/x]`` in a file name crashed the printer and
``[bold red]`` restyled the output. Style goes in as ``rich.text.Text`` spans, never as markup in strings.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.text import Text

from autotune.errors import AutotuneError

console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

CACHE_HELP = "cache file or SQLAlchemy URL (default: the per-user cache; see `autotune cache stats`)"


def open_store_option(cache: Optional[str], no_cache: bool):
    """The store named by ``--cache`` (the per-user cache when None), or None with ``--no-cache``."""
    if no_cache:
        return None
    from autotune.cache.store import open_store

    return open_store(cache)


def one_line_errors(fn: Callable) -> Callable:
    """Turn every AutotuneError into `error: <what and where>` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AutotuneError as e:
            err_console.print(Text.assemble(("error:", "red"), f" {e}"), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper
