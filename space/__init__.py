"""The schedule (an immutable value), its file format and its fixed-length numeric encoding."""

from autotune.space.fileformat import dumps, load, loads, save
from autotune.space.schedule import CORRECTORS, PREDICTIONS, SOLVERS, Schedule, Step

__all__ = ["CORRECTORS", "PREDICTIONS", "SOLVERS", "Schedule", "Step", "dumps", "load", "loads", "save"]
