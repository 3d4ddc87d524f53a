"""One scored candidate of a search: a trial, as the runner records it and the store keeps it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from autotune.space.fileformat import loads
from autotune.space.schedule import Schedule


@dataclass(frozen=True)
class Trial:
    """A candidate's scores: ``value`` is its first objective, ``objectives`` all of them (as measured, not negated);
    ``schedule`` the JSON of what was scored (with fitted or CPR ratios under ``--ratios``, the candidate with its
    ratios). ``latency_ms`` only when the pool timed it; ``feasible`` only when the search has limits; ``screened``
    only when the search's screen stopped it early (search/runner.py's Screening)."""

    number: int
    hash: str
    value: float
    objectives: Mapping[str, float]
    schedule: str
    mse_ref: float = math.inf
    nfe: int = 0
    cached: bool = False
    diverged: bool = False
    method: str = ""
    elapsed: float = 0.0
    latency_ms: float | None = None
    feasible: bool | None = None
    screened: int | None = None  # stopped by the search's screen after this many noises (value: an estimate)
    cost: float | None = None  # the share of an evaluation it cost, when the strategy asked a partial score (None: 1)
    extra: Mapping[str, Any] = field(default_factory=dict)  # row keys this version does not know, kept as read

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)

    def schedule_value(self) -> Schedule:
        return loads(self.schedule)

    def row(self) -> dict[str, Any]:
        """The store's row for the trial (its number and hash are the row's keys, not part of it)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("number", "hash", "extra")}
        out["objectives"] = dict(self.objectives)
        for optional in ("latency_ms", "feasible", "screened", "cost"):
            if out[optional] is None:
                del out[optional]
        return {**self.extra, **out}

    @classmethod
    def from_row(cls, number: int, schedule_hash: str, row: Mapping[str, Any]) -> "Trial":
        """The trial of a stored row (``store.trials``: trial_number, schedule_hash, metrics)."""
        known = {k for k in cls.__dataclass_fields__ if k not in ("number", "hash", "extra")}
        fields = {k: v for k, v in row.items() if k in known}
        extra = {k: v for k, v in row.items() if k not in known}
        return cls(number=int(number), hash=schedule_hash, **fields, extra=extra)
