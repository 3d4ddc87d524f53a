"""One exception type per domain; each carries what went wrong and where (a field path, a file)."""

from __future__ import annotations


class AutotuneError(Exception):
    """Base of every error the library raises on purpose; the CLI prints it as one line and exits 2."""


class ScheduleError(AutotuneError, ValueError):
    """A schedule (or schedule file) is invalid; ``field`` names the offending field, e.g. ``steps[3].order``,
    or is "" when the file as a whole is wrong (unreadable, not JSON): `schedule.json: not valid JSON (...)`."""

    def __init__(self, field: str, reason: str, source: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{reason}")


class ModelError(AutotuneError, ValueError):
    """A model, model directory or noise-schedule configuration cannot be used."""


class SamplingError(AutotuneError, RuntimeError):
    """The executor cannot run a schedule on a model (e.g. a unit the model does not have)."""


class BackendError(AutotuneError, RuntimeError):
    """An engine cannot be built, loaded or run (missing backend, manifest mismatch, bad inputs)."""


class InputError(AutotuneError, ValueError):
    """A value or file handed to a command is unusable (out of range, wrong dtype, not finite, wrong shape)."""


class OutputError(AutotuneError, OSError):
    """An output path cannot be written (a directory where a file goes, a file where a folder goes, no access)."""
