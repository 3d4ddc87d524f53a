"""What every CLI module shares: the consoles, the one-line error wrapper and the cache option.

The consoles print with Rich markup off: what we print is full of user text (paths, schedule and model
names, error messages quoting them), and with markup on, ``[/x]`` in a file name crashed the printer and
``[bold red]`` restyled the output. Style goes in as ``rich.text.Text`` spans, never as markup in strings.
"""

from __future__ import annotations

import functools
from pathlib import Path
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


# ---------------------------------------------------------------------------------------------- input bounds
# Beyond these a command would run for hours or exhaust memory instead of answering; say so at once.
MAX_BATCH = 65536  # samples per set, batch, --num, --datapoints
MAX_THREADS = 256
MAX_ITERATIONS = 100_000  # optimiser steps, timed repeats, search budgets
MAX_GUIDANCE = 100.0  # classifier-free guidance scales in use are 1..20
MAX_SEED = 2**63 - 1  # torch and numpy seeds are 64-bit


def check_guidance(value: Optional[float], flag: str = "--guidance") -> Optional[float]:
    """A guidance scale from the command line: None, or a finite number in [0, MAX_GUIDANCE]."""
    import math

    from autotune.errors import InputError

    if value is not None and not (math.isfinite(value) and 0.0 <= value <= MAX_GUIDANCE):
        raise InputError(f"{flag} {value:g}: expected a guidance scale in 0..{MAX_GUIDANCE:g}")
    return value


def _first_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: Optional[Path], flag: str) -> Optional[Path]:
    """Refuse, before any work, an output file that cannot be written: a directory, a path under a file,
    a folder without write access."""
    import os

    from autotune.errors import OutputError

    if path is None:
        return None
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory; give a file path")
    base = _first_existing(path.parent)
    if not base.is_dir():
        raise OutputError(f"{flag} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: {base} is not writable")
    return path


def check_output_dir(path: Optional[Path], flag: str) -> Optional[Path]:
    """Refuse, before any work, an output folder that cannot be made or written: an existing file, a path
    under a file, a folder without write access."""
    import os

    from autotune.errors import OutputError

    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: is a file; give a folder")
    base = _first_existing(path)
    if not base.is_dir():
        raise OutputError(f"{flag} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: {base} is not writable")
    return path
