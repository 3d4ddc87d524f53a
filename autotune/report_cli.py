"""CLI commands (registered on the main app by `register`); being built this session."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `autotune` app."""
