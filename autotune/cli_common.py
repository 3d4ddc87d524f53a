"""What every CLI module shares: the consoles, the one-line error wrapper and the cache option."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import typer
from rich.console import Console

from autotune.errors import AutotuneError

console = Console()
err_console = Console(stderr=True)

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
            err_console.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper
