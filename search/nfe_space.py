"""A schedule space whose NFE varies (``--nfe 4-10``): the union of fixed-NFE ScheduleSpaces, one vector.

The fixed-NFE :class:`~autotune.space.encoding.ScheduleSpace` stays as it is; this wrapper lays one vector
over the union: an ``nfe`` coordinate (int, low..high) followed by the coordinates of the widest space. A
vector decodes with the space of its NFE, reading that space's coordinates by name (``t[k]``, ``order[k]``,
... of an n-step space are a subset of the widest space's names), so every vector decodes to a valid schedule
and ``decode(encode(s)) == s``. Encoding an n-step schedule fills the coordinates it does not use: the
spare times at the midpoints of its widest gaps (so raising ``nfe`` refines the grid rather than piling steps
at one end) and the spare steps' choices copied from its second-to-last step. Searches that vary the NFE
use this space through the same attributes as a ScheduleSpace (coords, bounds, encode, decode, contains,
sample_prior, t_start, t_end, units), so evolution and the Optuna strategies run on it unchanged.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Sequence

import numpy as np

from autotune.errors import ScheduleError
from autotune.space.encoding import Coord, CoordinateViews, ScheduleSpace
from autotune.space.schedule import Schedule

NFE = "nfe"  # the name and family of the extra coordinate


@dataclasses.dataclass(frozen=True)
class NFERangeSpace(CoordinateViews):
    """The schedules of ``template`` with any step count in ``low..high`` (each as ``template`` at that count).

    Args:
        template: a ScheduleSpace; its ``n_steps`` is ignored, every other field is shared.
        low, high: the inclusive range of step counts (NFE when ``final_denoise`` is off).

    Example:
        >>> base = ScheduleSpace(4, 1.0, 0.0, solvers=("dpm",), predictions=("data",), allow_corrector=False,
        ...                      ratio_range=None, max_order=1)
        >>> space = NFERangeSpace(base, 2, 4)
        >>> space.names
        ('nfe', 't[0]', 't[1]', 't[2]')
        >>> space.decode([2, 0.5, 0.9, 0.1]).times
        (1.0, 0.5, 0.0)
    """

    template: ScheduleSpace
    low: int
    high: int

    def __post_init__(self) -> None:
        if not (isinstance(self.low, int) and isinstance(self.high, int) and 1 <= self.low <= self.high):
            raise ScheduleError("nfe", f"the range must be integers 1 <= low <= high, got {self.low}-{self.high}")

    def space(self, n: int) -> ScheduleSpace:
        """The fixed-step-count space of ``n`` steps."""
        if not self.low <= n <= self.high:
            raise ScheduleError("steps", f"{n} steps lie outside the space's range {self.low}-{self.high}")
        return self._spaces[n - self.low]

    @cached_property
    def _spaces(self) -> tuple[ScheduleSpace, ...]:
        return tuple(dataclasses.replace(self.template, n_steps=n) for n in range(self.low, self.high + 1))

    # -- the ScheduleSpace attributes the strategies read ---------------------------------------------------

    @property
    def widest(self) -> ScheduleSpace:
        return self.space(self.high)

    @property
    def t_start(self) -> float:
        return self.template.t_start

    @property
    def t_end(self) -> float:
        return self.template.t_end

    @property
    def units(self) -> tuple[str, ...]:
        return self.template.units

    @cached_property
    def coords(self) -> tuple[Coord, ...]:
        return (Coord(NFE, NFE, -1, self.low, self.high, "int"),) + self.widest.coords

    @cached_property
    def _index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    # -- membership, encode, decode -------------------------------------------------------------------------

    def check(self, s: Schedule) -> None:
        """Raise ScheduleError naming the first field by which ``s`` lies outside the space."""
        self.space(len(s.steps)).check(s)

    def contains(self, s: Schedule) -> bool:
        try:
            self.check(s)
        except ScheduleError:
            return False
        return True

    def encode(self, s: Schedule) -> np.ndarray:
        """The vector of ``s`` (its own coordinates exact; the spare ones filled as the module says)."""
        n = len(s.steps)
        sub = self.space(n)
        own = dict(zip(sub.names, sub.encode(s)))
        vec = np.empty(self.dim, dtype=np.float64)
        vec[0] = n
        spare_times = iter(_gap_midpoints(list(s.times), self.high - n))
        donor = max(n - 2, 0)
        for i, c in enumerate(self.coords[1:], start=1):
            if c.name in own:
                vec[i] = own[c.name]
            elif c.family == "t":
                vec[i] = next(spare_times)
            else:
                vec[i] = own[c.name.replace(f"[{c.step}]", f"[{donor}]", 1)]
        return vec

    def decode(self, vec: Sequence[float] | np.ndarray, name: str = "", metadata: dict | None = None) -> Schedule:
        """The valid schedule a vector stands for, decoded by the space of its (clamped, rounded) NFE."""
        v = np.asarray(vec, dtype=np.float64).reshape(-1)
        if v.shape != (self.dim,):
            raise ScheduleError("vector", f"expected {self.dim} values, got {v.size}")
        n = int(np.clip(np.floor(v[0] + 0.5) if np.isfinite(v[0]) else self.low, self.low, self.high))
        sub = self.space(n)
        return sub.decode([v[self._index[name_]] for name_ in sub.names], name, metadata)

    def sample_prior(self, rng: np.random.Generator, skip_prob: float = 0.1) -> Schedule:
        """A step count uniform in the range, then the prior of that space."""
        return self.space(int(rng.integers(self.low, self.high + 1))).sample_prior(rng, skip_prob)

    def __repr__(self) -> str:  # part of search ids: stable and complete
        return f"NFERangeSpace({self.template!r}, {self.low}, {self.high})"


def _gap_midpoints(times: list[float], count: int) -> list[float]:
    """``count`` new times, each the midpoint of the widest gap of the grid so far (descending grid)."""
    grid = sorted(times, reverse=True)
    out = []
    for _ in range(count):
        k = max(range(len(grid) - 1), key=lambda i: grid[i] - grid[i + 1])
        mid = 0.5 * (grid[k] + grid[k + 1])
        grid.insert(k + 1, mid)
        out.append(mid)
    return out


def parse_nfe(text: str) -> tuple[int, int]:
    """``"5"`` -> (5, 5); ``"4-10"`` -> (4, 10)."""
    parts = text.strip().split("-")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        low = high = 0
    if not 1 <= low <= high:
        raise ScheduleError("--nfe", f"expected a count like 5 or a range like 4-10, got {text!r}")
    return low, high

