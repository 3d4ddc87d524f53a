"""`autotune cache stats|clear|export|check`: look after the persistent cache. Mounted by autotune/cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from autotune.cli_common import console, one_line_errors

cache_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Inspect, check, clear or export the evaluation cache.")

CACHE_HELP = ("cache: a SQLite file path or a SQLAlchemy URL (postgresql://user@host/db); default "
              "$AUTOTUNE_CACHE or ~/.cache/autotune/cache.sqlite")


_one_line_errors = one_line_errors


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


@cache_app.command("stats")
@_one_line_errors
def stats_cmd(cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP)) -> None:
    """Rows per table and size on disk."""
    from autotune.cache.store import open_store

    with open_store(cache) as store:
        st = store.stats()
    console.print(f"{st['cache']} ({st['backend']}, schema {st['schema_version']})", highlight=False, soft_wrap=True)
    from autotune.tables import cache_stats_table

    console.print(cache_stats_table(st["rows"], _size(st["size_bytes"])))


@cache_app.command("clear")
@_one_line_errors
def clear_cmd(
    cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP),
    table: Optional[str] = typer.Option(None, "--table",
                                        help="only this table: evaluations, references, search_states, "
                                             "search_trials, model_memos"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
) -> None:
    """Delete cached rows (all tables, or one with --table)."""
    from autotune.cache.store import TABLES, CacheError, open_store

    if table is not None and table not in TABLES:
        raise CacheError(f"--table must be one of {', '.join(TABLES)}, not {table!r}")
    with open_store(cache) as store:
        what = f"table {table}" if table else "every table"
        if not yes and not typer.confirm(f"Delete {what} of {store.display}?", default=False):
            console.print("nothing deleted")
            raise typer.Exit(1)
        deleted = store.clear(table)
    console.print(", ".join(f"{name}: {n:,} deleted" for name, n in deleted.items()), highlight=False)


@cache_app.command("export")
@_one_line_errors
def export_cmd(
    out: Path = typer.Argument(..., help="a .jsonl file (evaluations only) or a directory (everything)"),
    cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP),
) -> None:
    """Write the cache out as JSON lines (and .npz files for reference arrays)."""
    from autotune.cache.store import open_store

    with open_store(cache) as store:
        counts = store.export(out)
    console.print(f"{out}: " + ", ".join(f"{n:,} {name}" for name, n in counts.items()), highlight=False)


@cache_app.command("check")
@_one_line_errors
def check_cmd(
    cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP),
    quick: bool = typer.Option(False, "--quick", help="SQLite: quick_check (indexes not cross-checked; faster)"),
) -> None:
    """Check the cache database for damage: one line, OK or what is broken (exit 1 when broken)."""
    from autotune.cache.store import open_store

    with open_store(cache, create=False) as store:
        problems = store.check(quick=quick)
    if not problems:
        console.print(f"{store.display}: OK", highlight=False, soft_wrap=True)
        return
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    console.print(f"{store.display}: broken: {problems[0]}{more}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)
