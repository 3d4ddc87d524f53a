"""A fixed-length numeric encoding of schedules (for predictors and Optuna) and its always-valid decoder.

A :class:`ScheduleSpace` is the set of schedules with exactly ``n_steps`` steps that start at ``t_start`` and
whose last step arrives at ``t_end`` (``0.0`` = onto the data), built from the allowed solvers, predictions,
correctors, DC ratios and skippable units. Its vector is laid out family by family (every family in step
order), and a family whose value cannot vary in the space is left out entirely:

====================  =====================  =====  ================================================
name                  present when           kind   value
====================  =====================  =====  ================================================
``t[k]``, k < N-1     N > 1                  real   the time step k arrives at, in [t_end, t_start]
``order[k]``          order cap > 1          int    predictor order, 1..cap
``solver[k]``         > 1 solver             cat    index into ``solvers``
``prediction[k]``     > 1 prediction         cat    index into ``predictions``
``corrector[k]``      allow_corrector        cat    index into ``("none", "bh1", "bh2")``
``corrector_order[k]`` allow_corrector       int    0 (no corrector) .. 3
``ratio[k]``          ratio_range not None   real   DC-Solver ratio, in ratio_range
``skip[k].<unit>``    per unit in ``units``  bool   1.0 = the unit is skipped at step k
``reuse[k].<unit>``   per unit in            bool   1.0 = the unit's cached output is reused at step
                      ``reusable``, k >= 1          k (DeepCache; step 0 has nothing cached)
``reuse_order``       ``reusable`` and       int    ``Schedule.reuse_order`` (one per schedule,
                      max_reuse_order > 0           ``step`` -1), 0..max_reuse_order
====================  =====================  =====  ================================================

Times are encoded *as themselves* (not as normalised positions or increments) so that encoding is exact:
``decode(encode(s)) == s`` holds bit for bit for every schedule of the space, whose times stand at least TIME_NUDGE
of the time span apart. The decoder makes any vector monotone by sorting the interior times in decreasing order
(the encoding is invariant to permuting them) and moving ties, hits on an end point and near-ties that far apart
(single ulps left two nodes of a multistep update at one log-SNR, a singular system; S3's children kept a time 2
ulps below t_start until 2026-12-06). Everything else is clamped to the bounds, rounded (half up) where discrete,
then clamped to what the step may use: the order to the solver's maximum, the history (``k + 1`` outputs)
and to 1 on a step onto ``t = 0`` for dpm/unip; no corrector on the last step; ratio 1.0 while
``k < dc_order``; a unit both skipped and reused at a step is skipped, and a reuse no earlier call computed the
unit for is dropped (the reuse order is 0 when nothing is reused). NaN decodes to the middle of a coordinate's
bounds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from autotune.errors import ScheduleError
from autotune.space.schedule import (
    CORRECTORS,
    MAX_CORRECTOR_ORDER,
    MAX_ORDER,
    PREDICTIONS,
    REUSE_ORDERS,
    Schedule,
    Step,
    computes_unit,
)
from autotune.space.solvers import REGISTRY, SEARCH_SOLVERS

# solvers a fixed-length vector can choose per step: one model call per step at every order, any step, and a
# deterministic update (a stochastic one is scored against a distribution, not the ODE reference)
SPACE_SOLVERS = tuple(name for name, info in REGISTRY.items()
                      if not info.calls_by_order and not info.first_step_only and not info.stochastic)

FAMILIES = ("t", "order", "solver", "prediction", "corrector", "corrector_order", "ratio", "skip", "reuse",
            "reuse_order")
KINDS = ("real", "int", "cat", "bool")
DEFAULT_RATIO_RANGE = (0.8, 1.2)
# the share of (t_start - t_end) that decoding puts between tied times or between a time and an end point it hit
# (a mutation clamped at t_start); one ulp was too little: UniP-3's node system became singular (a search crashed)
TIME_NUDGE = 1e-7


@dataclass(frozen=True)
class Coord:
    """One coordinate of the vector: its name, family, step, unit (skip only), bounds and kind."""

    name: str
    family: str
    step: int
    low: float
    high: float
    kind: str
    unit: str = ""


class CoordinateViews:
    """Names, dimension, bounds and kinds of a space, derived from its ``coords`` (shared by every space)."""

    @cached_property
    def names(self) -> tuple[str, ...]:
        """A name per coordinate, e.g. ``"t[3]"`` or ``"skip[3].<unit>"``."""
        return tuple(c.name for c in self.coords)

    @property
    def dim(self) -> int:
        """Length of the vector."""
        return len(self.coords)

    @cached_property
    def bounds(self) -> np.ndarray:
        """(dim, 2) float64 array of inclusive (low, high) per coordinate."""
        b = np.array([(c.low, c.high) for c in self.coords], dtype=np.float64).reshape(len(self.coords), 2)
        b.setflags(write=False)
        return b

    @cached_property
    def kinds(self) -> tuple[str, ...]:
        """Per coordinate: "real", "int", "cat" (an index into :meth:`choices`) or "bool"."""
        return tuple(c.kind for c in self.coords)


@dataclass(frozen=True)
class ScheduleSpace(CoordinateViews):
    """The schedules with ``n_steps`` steps from ``t_start`` down to ``t_end``; see the module docstring.

    Args:
        n_steps: number of steps (model evaluations, plus one if ``final_denoise``).
        t_start: the time every schedule starts at.
        t_end: the time the last step arrives at (0.0 = onto the data).
        units: prunable units a step may skip (a ``skip[k].<unit>`` coordinate each).
        reusable: units whose cached output a step may reuse (a ``reuse[k].<unit>`` coordinate each, k >= 1).
        max_reuse_order: the largest ``Schedule.reuse_order`` (a ``reuse_order`` coordinate when > 0).
        solvers: predictors allowed.
        allow_corrector: whether steps may carry a UniC corrector.
        predictions: parameterisations allowed.
        max_order: cap on the predictor order (None: the largest any allowed solver supports).
        ratio_range: (low, high) for DC-Solver ratios, containing 1.0; None fixes every ratio at 1.0.
        dc_order, guidance, final_denoise: fixed schedule-level fields shared by the whole space.

    Example:
        >>> space = ScheduleSpace(3, 1.0, 0.0, solvers=("dpm",), predictions=("data",), allow_corrector=False,
        ...                       ratio_range=None)
        >>> space.names
        ('t[0]', 't[1]', 'order[0]', 'order[1]', 'order[2]')
        >>> space.decode([0.2, 0.7, 2, 2, 3]).times
        (1.0, 0.7, 0.2, 0.0)
    """

    n_steps: int
    t_start: float
    t_end: float
    units: tuple[str, ...] = ()
    solvers: tuple[str, ...] = SEARCH_SOLVERS
    allow_corrector: bool = True
    predictions: tuple[str, ...] = PREDICTIONS
    max_order: int | None = None
    ratio_range: tuple[float, float] | None = DEFAULT_RATIO_RANGE
    dc_order: int = 2
    guidance: float | None = None
    final_denoise: bool = False
    reusable: tuple[str, ...] = ()
    max_reuse_order: int = 0

    def __post_init__(self) -> None:
        # canonical form: tuples and floats, so equal spaces build equal (equally hashed) schedules
        for name in ("units", "solvers", "predictions", "ratio_range", "reusable"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        for name in ("t_start", "t_end", "guidance"):
            if _is_finite(getattr(self, name)):
                object.__setattr__(self, name, float(getattr(self, name)))
        _check_space(self)

    # -- layout ---------------------------------------------------------------------------------------------

    @classmethod
    def for_schedule(cls, s: Schedule, **overrides: Any) -> "ScheduleSpace":
        """The space with ``s``'s step count, end points and schedule-level fields (``overrides`` win)."""
        fields = dict(
            n_steps=len(s.steps), t_start=s.t_start, t_end=s.steps[-1].t, units=tuple(sorted(s.units_used)),
            dc_order=s.dc_order, guidance=s.guidance, final_denoise=s.final_denoise,
            reusable=tuple(sorted(s.units_reused)), max_reuse_order=s.reuse_order,
        )
        return cls(**{**fields, **overrides})

    @property
    def correctors(self) -> tuple[str, ...]:
        """Correctors a step may carry ("none" first)."""
        return CORRECTORS if self.allow_corrector else ("none",)

    @property
    def order_cap(self) -> int:
        """The largest predictor order any step of the space may use."""
        solver_max = max(MAX_ORDER[s] for s in self.solvers)
        return solver_max if self.max_order is None else min(self.max_order, solver_max)

    @cached_property
    def coords(self) -> tuple[Coord, ...]:
        """Every coordinate of the vector, in order."""
        return tuple(_layout(self))


    def choices(self, family: str) -> tuple[str, ...]:
        """The values a categorical family's index selects from ("solver", "prediction", "corrector")."""
        table = {"solver": self.solvers, "prediction": self.predictions, "corrector": self.correctors}
        if family not in table:
            raise ScheduleError("family", f"{family!r} is not categorical (one of {', '.join(table)})")
        return table[family]

    # -- membership, encode, decode -------------------------------------------------------------------------

    def check(self, s: Schedule) -> None:
        """Raise ScheduleError naming the first field by which ``s`` lies outside the space."""
        _check_member(self, s)

    def contains(self, s: Schedule) -> bool:
        """Whether ``s`` lies in the space (``encode`` accepts it and ``decode`` gives it back)."""
        try:
            _check_member(self, s)
        except ScheduleError:
            return False
        return True

    def encode(self, s: Schedule) -> np.ndarray:
        """The float64 vector of a schedule in the space (raises ScheduleError naming the field otherwise)."""
        _check_member(self, s)
        return np.array([_coord_value(self, c, s) for c in self.coords], dtype=np.float64)

    def decode(self, vec: Sequence[float] | np.ndarray, name: str = "", metadata: dict | None = None) -> Schedule:
        """The valid schedule a vector stands for: clamp, round, sort times, clamp to what each step may use."""
        v = _sanitize(self, vec)
        value = {c.name: float(x) for c, x in zip(self.coords, v)}
        inner = [value[f"t[{k}]"] for k in range(self.n_steps - 1)]
        times = _strictly_decreasing(inner, self.t_start, self.t_end) + [self.t_end]
        steps = _computed_reuse([_decode_step(self, k, t, value) for k, t in enumerate(times)])
        order = int(value.get("reuse_order", 0)) if any(st.reuse for st in steps) else 0
        return self._schedule(steps, name, metadata, order)

    def sample_prior(self, rng: np.random.Generator, skip_prob: float = 0.1) -> Schedule:
        """A random valid schedule: uniform times and choices within each step's validity; skips w.p. skip_prob."""
        inner = rng.uniform(self.t_end, self.t_start, self.n_steps - 1)
        times = _strictly_decreasing(list(inner), self.t_start, self.t_end) + [self.t_end]
        steps = [_sample_step(self, k, t, rng, skip_prob) for k, t in enumerate(times)]
        return self._schedule(steps, "", None)

    def _schedule(self, steps: list[Step], name: str, metadata: dict | None, reuse_order: int = 0) -> Schedule:
        return Schedule(
            t_start=self.t_start, steps=tuple(steps), guidance=self.guidance, final_denoise=self.final_denoise,
            dc_order=self.dc_order, name=name, metadata=dict(metadata or {}), reuse_order=reuse_order,
        )


# -- space validation and layout ------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_choices(field: str, values: tuple, known: tuple) -> None:
    """A non-empty tuple of distinct known values."""
    if not values:
        raise ScheduleError(field, "needs at least one value")
    for v in values:
        if v not in known:
            raise ScheduleError(field, f"unknown value {v!r} (one of {', '.join(known)})")
    if len(set(values)) != len(values):
        raise ScheduleError(field, "lists a value twice")


def _check_space(sp: ScheduleSpace) -> None:
    """Raise ScheduleError naming the first inconsistent field of a space."""
    if not _is_int(sp.n_steps) or sp.n_steps < 1:
        raise ScheduleError("n_steps", f"must be an integer >= 1, got {sp.n_steps!r}")
    if not _is_finite(sp.t_start) or sp.t_start <= 0:
        raise ScheduleError("t_start", f"must be a finite number > 0, got {sp.t_start!r}")
    if not _is_finite(sp.t_end) or not 0 <= sp.t_end < sp.t_start:
        raise ScheduleError("t_end", f"must be a finite number in [0, t_start), got {sp.t_end!r}")
    if sp.t_start - sp.t_end <= 2 * sp.n_steps * np.spacing(float(sp.t_start)):
        raise ScheduleError("t_end", f"too close to t_start to fit {sp.n_steps} distinct times")
    _check_choices("solvers", sp.solvers, SPACE_SOLVERS)
    _check_choices("predictions", sp.predictions, PREDICTIONS)
    if not isinstance(sp.allow_corrector, bool):
        raise ScheduleError("allow_corrector", f"must be true or false, got {sp.allow_corrector!r}")
    if sp.max_order is not None and (not _is_int(sp.max_order) or not 1 <= sp.max_order <= max(MAX_ORDER.values())):
        raise ScheduleError("max_order", f"must be None or an integer in 1..{max(MAX_ORDER.values())}")
    if not all(isinstance(u, str) and u for u in sp.units):
        raise ScheduleError("units", "must be non-empty unit names")
    if len(set(sp.units)) != len(sp.units):
        raise ScheduleError("units", "lists a unit twice")
    if not all(isinstance(u, str) and u for u in sp.reusable):
        raise ScheduleError("reusable", "must be non-empty unit names")
    if len(set(sp.reusable)) != len(sp.reusable):
        raise ScheduleError("reusable", "lists a unit twice")
    if not _is_int(sp.max_reuse_order) or sp.max_reuse_order not in REUSE_ORDERS:
        raise ScheduleError("max_reuse_order", f"must be one of {', '.join(map(str, REUSE_ORDERS))}, got "
                                               f"{sp.max_reuse_order!r}")
    if sp.ratio_range is not None:
        ok = isinstance(sp.ratio_range, tuple) and len(sp.ratio_range) == 2 and all(map(_is_finite, sp.ratio_range))
        if not ok or not sp.ratio_range[0] <= 1.0 <= sp.ratio_range[1] or not sp.ratio_range[0] < sp.ratio_range[1]:
            raise ScheduleError("ratio_range", f"must be None or finite (low, high) with low <= 1 <= high, "
                                               f"got {sp.ratio_range!r}")
    # the schedule-level fields: let Schedule's own rules judge them (one probe schedule)
    inner = _strictly_decreasing([sp.t_start] * (sp.n_steps - 1), sp.t_start, sp.t_end)
    probe = [Step(t) for t in inner] + [Step(sp.t_end)]
    Schedule(sp.t_start, tuple(probe), guidance=sp.guidance, final_denoise=sp.final_denoise, dc_order=sp.dc_order)


def _layout(sp: ScheduleSpace) -> list[Coord]:
    """The coordinates, family by family, each family in step order."""
    n, out = sp.n_steps, []
    out += [Coord(f"t[{k}]", "t", k, sp.t_end, sp.t_start, "real") for k in range(n - 1)]
    if sp.order_cap > 1:
        out += [Coord(f"order[{k}]", "order", k, 1, sp.order_cap, "int") for k in range(n)]
    if len(sp.solvers) > 1:
        out += [Coord(f"solver[{k}]", "solver", k, 0, len(sp.solvers) - 1, "cat") for k in range(n)]
    if len(sp.predictions) > 1:
        out += [Coord(f"prediction[{k}]", "prediction", k, 0, len(sp.predictions) - 1, "cat") for k in range(n)]
    if sp.allow_corrector:
        out += [Coord(f"corrector[{k}]", "corrector", k, 0, len(CORRECTORS) - 1, "cat") for k in range(n)]
        out += [Coord(f"corrector_order[{k}]", "corrector_order", k, 0, MAX_CORRECTOR_ORDER, "int") for k in range(n)]
    if sp.ratio_range is not None:
        lo, hi = sp.ratio_range
        out += [Coord(f"ratio[{k}]", "ratio", k, lo, hi, "real") for k in range(n)]
    out += [Coord(f"skip[{k}].{u}", "skip", k, 0, 1, "bool", u) for k in range(n) for u in sp.units]
    out += [Coord(f"reuse[{k}].{u}", "reuse", k, 0, 1, "bool", u) for k in range(1, n) for u in sp.reusable]
    if sp.reusable and sp.max_reuse_order > 0:
        out.append(Coord("reuse_order", "reuse_order", -1, 0, sp.max_reuse_order, "int"))
    return out


# -- membership and encoding ----------------------------------------------------------------------------------


def _check_member(sp: ScheduleSpace, s: Schedule) -> None:
    """Raise ScheduleError naming the first field by which ``s`` lies outside ``sp``."""
    if len(s.steps) != sp.n_steps:
        raise ScheduleError("steps", f"the space has {sp.n_steps} steps, the schedule {len(s.steps)}")
    for field in ("t_start", "guidance", "final_denoise", "dc_order"):
        if getattr(s, field) != getattr(sp, field):
            raise ScheduleError(field, f"the space has {getattr(sp, field)!r}, the schedule {getattr(s, field)!r}")
    last = sp.n_steps - 1
    if s.steps[last].t != sp.t_end:
        raise ScheduleError(f"steps[{last}].t", f"the space ends at {sp.t_end!r}, the schedule at {s.steps[last].t!r}")
    for k, step in enumerate(s.steps):
        _check_member_step(sp, k, step)
    if s.reuse_order > sp.max_reuse_order:
        raise ScheduleError("reuse_order", f"{s.reuse_order} exceeds the space's max_reuse_order {sp.max_reuse_order}")


def _check_member_step(sp: ScheduleSpace, k: int, step: Step) -> None:
    """Raise ScheduleError naming the first field of step ``k`` the space does not allow."""
    where = f"steps[{k}]"
    for field, allowed in (("solver", sp.solvers), ("prediction", sp.predictions), ("corrector", sp.correctors)):
        if getattr(step, field) not in allowed:
            value = getattr(step, field)
            raise ScheduleError(f"{where}.{field}", f"{value!r} is not in the space ({', '.join(allowed)})")
    if step.order > sp.order_cap:
        raise ScheduleError(f"{where}.order", f"order {step.order} exceeds the space's cap {sp.order_cap}")
    lo, hi = sp.ratio_range if sp.ratio_range is not None else (1.0, 1.0)
    if not lo <= step.ratio <= hi:
        raise ScheduleError(f"{where}.ratio", f"{step.ratio!r} lies outside the space's range [{lo}, {hi}]")
    for u in step.skip:
        if u not in sp.units:
            raise ScheduleError(f"{where}.skip", f"unit {u!r} is not in the space")
    for u in step.reuse:
        if u not in sp.reusable:
            raise ScheduleError(f"{where}.reuse", f"unit {u!r} is not reusable in the space")


def _coord_value(sp: ScheduleSpace, c: Coord, s: Schedule) -> float:
    """The value coordinate ``c`` takes for the schedule ``s`` (its step's, or the schedule's own)."""
    if c.family == "reuse_order":
        return float(s.reuse_order)
    step = s.steps[c.step]
    if c.family == "reuse":
        return float(c.unit in step.reuse)
    if c.family == "t":
        return step.t
    if c.family in ("solver", "prediction", "corrector"):
        return sp.choices(c.family).index(getattr(step, c.family))
    if c.family == "skip":
        return float(c.unit in step.skip)
    return getattr(step, c.family)  # order, corrector_order, ratio


# -- decoding -------------------------------------------------------------------------------------------------


def _sanitize(sp: ScheduleSpace, vec: Sequence[float] | np.ndarray) -> np.ndarray:
    """The vector as float64, NaN at mid-bounds, clamped to the bounds, discrete coordinates rounded half up."""
    try:
        v = np.array(vec, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ScheduleError("vector", f"must be {sp.dim} numbers ({e})") from None
    if v.shape != (sp.dim,):
        raise ScheduleError("vector", f"expected {sp.dim} values, got {v.size}")
    low, high = sp.bounds[:, 0], sp.bounds[:, 1]
    v = np.where(np.isnan(v), (low + high) / 2, v)
    v = np.clip(v, low, high)
    discrete = np.array([k != "real" for k in sp.kinds], dtype=bool)
    v[discrete] = np.floor(v[discrete] + 0.5)
    return v


def _strictly_decreasing(ts: list[float], hi: float, lo: float) -> list[float]:
    """Sort descending and move times closer than TIME_NUDGE of the span to the one before (ties, end-point hits,
    and near-ties: S3's children kept a time 2 ulps below t_start) that far apart (by ulps where that is less than
    two ulps) so that hi > t_0 > ... > t_m > lo, each gap at least the nudge (tested as the difference, as the
    property test's members are drawn: a time that far apart is kept bit for bit)."""
    out = sorted((min(max(float(t), lo), hi) for t in ts), reverse=True)
    gap = (hi - lo) * TIME_NUDGE
    tiny = gap <= 2 * np.spacing(hi)
    prev = hi
    for i, t in enumerate(out):
        if tiny:
            out[i] = t if t < prev else float(np.nextafter(prev, -np.inf))
        else:
            out[i] = t if prev - t >= gap else prev - gap
        prev = out[i]
    nxt = lo
    for i in range(len(out) - 1, -1, -1):
        if tiny:
            out[i] = out[i] if out[i] > nxt else float(np.nextafter(nxt, np.inf))
        else:
            out[i] = out[i] if out[i] - nxt >= gap else nxt + gap
        nxt = out[i]
    return out


def _order_limit(sp: ScheduleSpace, k: int, t: float, solver: str) -> int:
    """The largest order step ``k`` (arriving at ``t``) may use with ``solver``."""
    if t == 0:
        return min(REGISTRY[solver].onto_data_max_order, sp.order_cap, k + 1)
    return min(sp.order_cap, MAX_ORDER[solver], k + 1)


def _corrector_limit(sp: ScheduleSpace, k: int) -> int:
    """The largest corrector order step ``k`` may use (0: no corrector allowed)."""
    return 0 if k == sp.n_steps - 1 or not sp.allow_corrector else min(MAX_CORRECTOR_ORDER, k + 1)


def _ratio_allowed(sp: ScheduleSpace, k: int) -> bool:
    """Whether step ``k`` may carry a DC ratio other than 1.0."""
    return sp.ratio_range is not None and k >= sp.dc_order


def _pick(sp: ScheduleSpace, family: str, k: int, value: dict[str, float]) -> str:
    """The categorical value of ``family`` at step ``k`` (its only choice when the family is absent)."""
    options = sp.choices(family)
    return options[int(value[f"{family}[{k}]"])] if len(options) > 1 else options[0]


def _decode_step(sp: ScheduleSpace, k: int, t: float, value: dict[str, float]) -> Step:
    """Step ``k`` of a decoded vector, clamped to what the step may use."""
    solver = _pick(sp, "solver", k, value)
    order = min(int(value.get(f"order[{k}]", 1)), _order_limit(sp, k, t, solver))
    corrector = _pick(sp, "corrector", k, value) if _corrector_limit(sp, k) else "none"
    corrector_order = 0
    if corrector != "none":
        corrector_order = min(max(int(value[f"corrector_order[{k}]"]), 1), _corrector_limit(sp, k))
    return Step(
        t=t, order=order, solver=solver, prediction=_pick(sp, "prediction", k, value),
        corrector=corrector, corrector_order=corrector_order,
        ratio=value[f"ratio[{k}]"] if _ratio_allowed(sp, k) else 1.0,
        skip=(skip := tuple(u for u in sp.units if value[f"skip[{k}].{u}"] >= 0.5)),
        reuse=tuple(u for u in sp.reusable if u not in skip and value.get(f"reuse[{k}].{u}", 0.0) >= 0.5),
    )


def _computed_reuse(steps: list[Step]) -> list[Step]:
    """``steps`` with each reuse of a unit that no earlier step computed dropped (in step order, so a reuse kept
    may make a later one invalid only through what it computes, which the pass sees)."""
    out: list[Step] = []
    for step in steps:
        kept = tuple(u for u in step.reuse if any(computes_unit(earlier, u) for earlier in out))
        out.append(step if kept == step.reuse else dataclasses.replace(step, reuse=kept))
    return out


def _sample_step(sp: ScheduleSpace, k: int, t: float, rng: np.random.Generator, skip_prob: float) -> Step:
    """A random valid step ``k`` arriving at ``t`` (a fixed sequence of draws, so a seed fixes the schedule)."""
    solver = sp.solvers[rng.integers(len(sp.solvers))]
    order = int(rng.integers(1, _order_limit(sp, k, t, solver) + 1))
    prediction = sp.predictions[rng.integers(len(sp.predictions))]
    co_max = _corrector_limit(sp, k)
    corrector = sp.correctors[rng.integers(len(sp.correctors))] if co_max else "none"
    corrector_order = int(rng.integers(1, co_max + 1)) if corrector != "none" else 0
    ratio = float(rng.uniform(*sp.ratio_range)) if _ratio_allowed(sp, k) else 1.0
    skip = tuple(u for u in sp.units if rng.random() < skip_prob)
    return Step(t, order, solver, prediction, corrector, corrector_order, ratio, skip)
