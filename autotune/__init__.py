"""autotune: search, fit and compile per-step sampling schedules for diffusion and flow models."""

import os as _os
import time as _time

# when this process began to be autotune: the commands' "finished in" counts from here (progress_cli.command_seconds)
STARTED = _time.monotonic()

__version__ = "0.1.0"


def _parts_of_a_source_checkout() -> list[str]:
    """The repository root, when this folder is the checkout's ``autotune/`` rather than an installed package.

    The checkout keeps each part in a top-level folder (``sampling/``, ``search/``, ...) that setuptools'
    ``package-dir`` maps under ``autotune`` at install; this folder holds the CLI alone. Where the checkout's root
    is on ``sys.path`` (``python -m autotune.cli`` run there, the Ray workers a search starts there) it is found
    before an installed copy, and ``autotune.sampling`` was then missing unless an editable install's finder
    filled in. With the root on ``__path__`` the parts resolve to the checkout's own folders, as installed."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    checkout = (_os.path.isfile(_os.path.join(root, "pyproject.toml"))
                and _os.path.isfile(_os.path.join(root, "sampling", "__init__.py"))
                and not _os.path.isdir(_os.path.join(here, "sampling")))
    return [root] if checkout else []


__path__ += _parts_of_a_source_checkout()


def __getattr__(name: str):
    # lazy: `import autotune` must not import diffusers (an optional dependency)
    if name == "AutotuneScheduler":
        from autotune.diffusers_scheduler import AutotuneScheduler

        return AutotuneScheduler
    if name == "apply_schedule":
        from autotune.diffusers_masks import apply_schedule

        return apply_schedule
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
