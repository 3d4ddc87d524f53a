"""The schedule: an immutable value holding every per-step decision of a sampler.

A schedule with N steps visits the times ``t_start = tau_0 > tau_1 > ... > tau_N >= 0``. Step ``k``
(0-based) evaluates the network once at ``tau_k`` (on the current state), then moves the state from
``tau_k`` to ``tau_{k+1}``. ``tau_N = 0`` means "exactly onto the data" (sigma = 0).

Per step: the time it arrives at, the predictor (``solver`` and ``order``), the parameterisation its
update uses (``prediction``: data or noise), an optional UniC corrector applied once the next model
output is known (it reuses that output: no extra NFE), the DC-Solver compensation ratio applied to the
step's newest model output before the step (1.0 = none), the network units skipped in the step's model
call(s), and the units reused in them (DeepCache): a reused unit is not computed; its output is the one it
produced at the last model call that computed it (cached features, carried between calls). ``shift`` moves the
time the network is *told* at the step's own call by that much log-SNR (0: tau_k itself), while the state and the
solver stay at tau_k: a learned correction of the discretisation error (timestep shifting as in TS-DPM, and the
decoupled model time of LD3), found by gradient refinement (search/gradient.py). ``data_scale`` multiplies the data
prediction of the step's model call(s) (1.0: none; the noise prediction follows, so x = alpha x0 + sigma eps holds):
a learned per-step correction of what the network predicts from a state a few-step solver left, fitted by the same
refinement. ``data_mean`` is the data estimate of an analytic first step (solver ``afs``: no model call at T), one
value per channel (dimension 1 of the state); empty means 0, USF's own estimate for centred data.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from autotune.errors import ScheduleError
from autotune.space.solvers import MAX_ORDER, REGISTRY, SOLVERS

__all__ = ["CORRECTORS", "MAX_CORRECTOR_ORDER", "MAX_DATA_SCALE", "MAX_SHIFT", "MAX_ORDER", "PREDICTIONS",
           "REUSE_ORDERS", "SOLVERS", "Schedule", "Step"]

PREDICTIONS = ("data", "noise")
CORRECTORS = ("none", "bh1", "bh2")
MAX_CORRECTOR_ORDER = 3
# a step's model-time shift, in log-SNR: refinement moves it by tenths; beyond this it is no longer a correction
MAX_SHIFT = 4.0
# a step's data-prediction scale lies in [1 / MAX_DATA_SCALE, MAX_DATA_SCALE]: refinement moves it by percents; a
# factor of 2 would be a different network, not a correction of this one
MAX_DATA_SCALE = 2.0
# how a reused unit's output is formed: 0 copies its last computed output (DeepCache); 1 extrapolates linearly in time
# from its last two, 2 by the parabola through its last three (TaylorSeer's forecasts of order 1 and 2). Which serves
# depends on the pattern: on digits (guidance 2, NFE 20, 128 noises) deep0 reused two steps of three with the last
# two computed is at 1.55x the unpruned mse_ref with order 1 and 1.19x with order 2, where at N=4 order 2 is worse.
REUSE_ORDERS = (0, 1, 2)
# The reuse-only unit of a model with classifier-free guidance that caches the guidance direction (models/guidance.py).
# A call reusing it runs the conditional half alone and records no other unit (its features hold half the batch).
GUIDANCE_UNIT = "guidance"


@dataclass(frozen=True)
class Step:
    """One step of a schedule; see the module docstring for what each field decides."""

    t: float
    order: int = 1
    solver: str = "dpm"
    prediction: str = "data"
    corrector: str = "none"
    corrector_order: int = 0
    ratio: float = 1.0
    skip: tuple[str, ...] = ()
    reuse: tuple[str, ...] = ()
    shift: float = 0.0
    data_mean: tuple[float, ...] = ()
    data_scale: float = 1.0

    def __post_init__(self) -> None:
        # canonical form: numbers as floats (1 == 1.0, -0.0 == 0.0 hash alike), skip and reuse masks sorted
        for name in ("t", "ratio", "shift", "data_scale"):
            object.__setattr__(self, name, _canonical_float(getattr(self, name)))
        if isinstance(self.data_mean, (list, tuple)):
            object.__setattr__(self, "data_mean", tuple(_canonical_float(v) for v in self.data_mean))
        for name in ("skip", "reuse"):
            units = getattr(self, name)
            if isinstance(units, (list, tuple)) and all(isinstance(u, str) for u in units):
                object.__setattr__(self, name, tuple(sorted(units)))


def _canonical_float(x: Any) -> Any:
    """Real numbers as float with -0.0 folded into 0.0; anything else is left for validate() to reject."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        try:
            return float(x) + 0.0
        except OverflowError:
            return math.inf
    return x


@dataclass(frozen=True)
class Schedule:
    """A validated sampling schedule. Build it directly, from a named builder, or from a file.

    Args:
        t_start: the time the ODE starts at (the noise schedule's T for every named schedule).
        steps: the steps, in order; at least one.
        guidance: classifier-free guidance scale the schedule is meant for (None: unguided model).
        final_denoise: after the last step, one more model call at the last time returns its data
            prediction (DPM-Solver's ``denoise_to_zero``); costs one NFE.
        dc_order: order of the Lagrange interpolation DC-Solver compensation uses (needs that many
            earlier model outputs before a ratio other than 1.0 can apply).
        reuse_order: how reused units' outputs are formed (``REUSE_ORDERS``): 0 copies the output of the last
            call that computed the unit; 1 extrapolates linearly in time from the last two such calls, 2 by the
            parabola through the last three (the highest order the calls so far allow: a copy where only one came
            before). Canonically 0 when no step reuses anything.
        name: a label, not part of the schedule's identity.
        metadata: free JSON-compatible provenance (search method, model), not part of the identity.

    Example:
        >>> s = Schedule(1.0, (Step(0.5), Step(0.0)))
        >>> s.nfe, s.times
        (2, (1.0, 0.5, 0.0))
    """

    t_start: float
    steps: tuple[Step, ...]
    guidance: float | None = None
    final_denoise: bool = False
    dc_order: int = 2
    reuse_order: int = 0
    name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if _valid_reuse_order(self.reuse_order) and not any(s.reuse for s in self.steps if isinstance(s, Step)):
            object.__setattr__(self, "reuse_order", 0)  # nothing is reused: the order changes nothing computed
        object.__setattr__(self, "t_start", _canonical_float(self.t_start))
        if self.guidance is not None:
            object.__setattr__(self, "guidance", _canonical_float(self.guidance))
        validate(self)

    @property
    def times(self) -> tuple[float, ...]:
        """All visited times ``tau_0 .. tau_N``."""
        return (self.t_start,) + tuple(s.t for s in self.steps)

    @property
    def nfe(self) -> int:
        """Network evaluations the schedule spends (computed from the solvers' declared calls, never read from a
        file)."""
        return sum(REGISTRY[s.solver].calls(s.order) for s in self.steps) + int(self.final_denoise)

    @property
    def stochastic(self) -> bool:
        """Some step adds fresh noise (an SDE solver): the samples are a draw, not the ODE's solution."""
        return any(REGISTRY[s.solver].stochastic for s in self.steps)

    @property
    def units_used(self) -> frozenset[str]:
        """Units some step skips."""
        return frozenset(u for s in self.steps for u in s.skip)

    @property
    def units_reused(self) -> frozenset[str]:
        """Units some step reuses (takes from the feature cache instead of computing)."""
        return frozenset(u for s in self.steps for u in s.reuse)

    def identity(self) -> dict[str, Any]:
        """The fields that define what the schedule computes (name and metadata excluded)."""
        return {
            "t_start": self.t_start,
            "guidance": self.guidance,
            "final_denoise": self.final_denoise,
            "dc_order": self.dc_order,
            **({"reuse_order": self.reuse_order} if self.reuse_order else {}),  # so schedules without it keep hashes
            "steps": [step_to_dict(s) for s in self.steps],
        }

    def hash(self) -> str:
        """Canonical SHA-256 (hex, 16 chars) of the schedule's identity: its key in caches and engines."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_steps(self, steps: Iterable[Step], **changes: Any) -> "Schedule":
        return replace(self, steps=tuple(steps), **changes)

    def check_units(self, units: Iterable[str], reusable: Iterable[str] | None = None) -> None:
        """Raise ScheduleError naming the first skipped or reused unit the model does not have.

        ``units`` are the units a step may skip (``Denoiser.units``); ``reusable`` those it may reuse, by default
        ``units.reusable`` when ``units`` carries it (``sampling.denoiser.Units``: a model's units list also names
        its reuse-only units, such as a UNet's deep branch), else ``units``.
        """
        if reusable is None:
            reusable = getattr(units, "reusable", None)
        known = set(units)
        known_reuse = set(known if reusable is None else reusable)
        for k, s in enumerate(self.steps):
            for name, names, allowed in (("skip", s.skip, known), ("reuse", s.reuse, known_reuse)):
                for u in names:
                    if u not in allowed:
                        kind = "reusable" if name == "reuse" else "prunable"
                        hint = ", ".join(sorted(allowed)[:6]) or f"the model has no {kind} units"
                        raise ScheduleError(f"steps[{k}].{name}", f"unknown unit {u!r} (known: {hint})")


def step_to_dict(s: Step) -> dict[str, Any]:
    return {
        "t": s.t,
        "order": s.order,
        "solver": s.solver,
        "prediction": s.prediction,
        "corrector": s.corrector,
        "corrector_order": s.corrector_order,
        "ratio": s.ratio,
        "skip": list(s.skip),
        # only when used, so every schedule without reuse keeps its hash and file byte for byte
        **({"reuse": list(s.reuse)} if s.reuse else {}),
        **({"shift": s.shift} if s.shift != 0.0 else {}),
        **({"data_mean": list(s.data_mean)} if s.data_mean else {}),
        **({"data_scale": s.data_scale} if s.data_scale != 1.0 else {}),
    }


def computes_unit(step: Step, unit: str) -> bool:
    """The step's model call(s) run ``unit`` and cache its output: it makes a call, neither skips nor reuses the unit
    or a unit whose dotted name contains it (``a`` contains ``a.b``), and does not reuse ``GUIDANCE_UNIT`` (such a
    call caches nothing)."""
    if REGISTRY[step.solver].calls(step.order) == 0 or GUIDANCE_UNIT in step.reuse:
        return False
    parts = unit.split(".")
    outer = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return not outer & (set(step.skip) | set(step.reuse))



def reusable_for(units: Any, guidance: float | None) -> tuple[str, ...]:
    """The units a schedule with this ``guidance`` may reuse: the model's reusable units (``units.reusable`` when
    it names them, else ``units``), less ``GUIDANCE_UNIT`` when the schedule is unguided."""
    reusable = tuple(getattr(units, "reusable", units))
    return reusable if guidance is not None else tuple(u for u in reusable if u != GUIDANCE_UNIT)

def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _valid_reuse_order(order: Any) -> bool:
    return isinstance(order, int) and not isinstance(order, bool) and order in REUSE_ORDERS


def validate(s: Schedule) -> None:
    """Check every rule a runnable schedule obeys; raise ScheduleError naming the field and the reason."""
    if not _finite(s.t_start) or s.t_start <= 0:
        raise ScheduleError("t_start", f"must be a finite number > 0, got {s.t_start!r}")
    if not s.steps:
        raise ScheduleError("steps", "a schedule needs at least one step")
    if s.guidance is not None and (not _finite(s.guidance) or s.guidance < 0):
        raise ScheduleError("guidance", f"must be null or a finite number >= 0, got {s.guidance!r}")
    if not isinstance(s.final_denoise, bool):
        raise ScheduleError("final_denoise", f"must be true or false, got {s.final_denoise!r}")
    try:
        json.dumps(s.metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ScheduleError("metadata", f"must be JSON-compatible ({e})") from None
    if not isinstance(s.metadata, dict):
        raise ScheduleError("metadata", "must be an object")
    if not isinstance(s.dc_order, int) or isinstance(s.dc_order, bool) or not 1 <= s.dc_order <= 3:
        raise ScheduleError("dc_order", f"must be an integer in 1..3, got {s.dc_order!r}")
    last = len(s.steps) - 1
    prev_t = s.t_start
    for k, step in enumerate(s.steps):
        where = f"steps[{k}]"
        if not isinstance(step, Step):
            raise ScheduleError(where, "must be a Step")
        if not _finite(step.t) or step.t < 0:
            raise ScheduleError(f"{where}.t", f"must be a finite number >= 0, got {step.t!r}")
        if not step.t < prev_t:
            raise ScheduleError(f"{where}.t", f"times must decrease strictly: {step.t!r} follows {prev_t!r}")
        if step.t == 0 and k != last:
            raise ScheduleError(f"{where}.t", "only the last step may end at t = 0")
        prev_t = step.t
        available = k + 1  # model outputs known when step k starts
        if step.solver not in SOLVERS:
            raise ScheduleError(f"{where}.solver", f"unknown solver {step.solver!r} (one of {', '.join(SOLVERS)})")
        if step.prediction not in PREDICTIONS:
            raise ScheduleError(f"{where}.prediction", f"must be 'data' or 'noise', got {step.prediction!r}")
        max_order = MAX_ORDER[step.solver]
        if not isinstance(step.order, int) or isinstance(step.order, bool) or not 1 <= step.order <= max_order:
            raise ScheduleError(f"{where}.order", f"must be an integer in 1..{max_order}, got {step.order!r}")
        if step.order > available and not REGISTRY[step.solver].self_starting:
            raise ScheduleError(
                f"{where}.order", f"order {step.order} needs {step.order} model outputs, only {available} known"
            )
        info = REGISTRY[step.solver]
        if step.t == 0 and step.order > info.onto_data_max_order:
            raise ScheduleError(f"{where}.order", "a step onto t = 0 (lambda = inf) must be first order")
        if info.first_step_only and k != 0:
            raise ScheduleError(f"{where}.solver", f"{step.solver!r} can only be the first step")
        if step.corrector not in CORRECTORS:
            raise ScheduleError(f"{where}.corrector", f"must be one of {', '.join(CORRECTORS)}, got {step.corrector!r}")
        co = step.corrector_order
        if not isinstance(co, int) or isinstance(co, bool):
            raise ScheduleError(f"{where}.corrector_order", f"must be an integer, got {co!r}")
        if step.corrector == "none":
            if co != 0:
                raise ScheduleError(f"{where}.corrector_order", "must be 0 when corrector is 'none'")
        else:
            if k == last:
                raise ScheduleError(
                    f"{where}.corrector", "the last step cannot be corrected (no model output follows it)"
                )
            if not 1 <= co <= MAX_CORRECTOR_ORDER:
                raise ScheduleError(f"{where}.corrector_order", f"must be in 1..{MAX_CORRECTOR_ORDER}, got {co!r}")
            if co > available:
                raise ScheduleError(
                    f"{where}.corrector_order", f"order {co} needs {co} earlier model outputs, only {available} known"
                )
        if not _finite(step.ratio):
            raise ScheduleError(f"{where}.ratio", f"must be a finite number, got {step.ratio!r}")
        if step.ratio != 1.0 and available < s.dc_order + 1:
            raise ScheduleError(
                f"{where}.ratio",
                f"compensation needs {s.dc_order + 1} model outputs (dc_order {s.dc_order}), only {available} known",
            )
        if not _finite(step.shift) or abs(step.shift) > MAX_SHIFT:
            raise ScheduleError(f"{where}.shift", f"must be a log-SNR offset in [-{MAX_SHIFT}, {MAX_SHIFT}], "
                                f"got {step.shift!r}")
        if not _finite(step.data_scale) or not 1.0 / MAX_DATA_SCALE <= step.data_scale <= MAX_DATA_SCALE:
            raise ScheduleError(f"{where}.data_scale", f"must be a factor in [{1.0 / MAX_DATA_SCALE:g}, "
                                f"{MAX_DATA_SCALE:g}], got {step.data_scale!r}")
        if step.data_scale != 1.0 and info.calls(step.order) == 0:
            raise ScheduleError(f"{where}.data_scale", f"solver {step.solver!r} makes no model call here: there is "
                                "no data prediction to scale (leave it at 1)")
        if not isinstance(step.data_mean, tuple) or not all(_finite(v) for v in step.data_mean):
            raise ScheduleError(f"{where}.data_mean", "must be a list of finite numbers (one per channel)")
        if step.data_mean and not info.reads_data_mean:
            raise ScheduleError(f"{where}.data_mean", f"only an analytic first step reads a data mean, not solver "
                                f"{step.solver!r}")
        if not isinstance(step.skip, tuple) or not all(isinstance(u, str) and u for u in step.skip):
            raise ScheduleError(f"{where}.skip", "must be a list of unit names")
        if len(set(step.skip)) != len(step.skip):
            raise ScheduleError(f"{where}.skip", "lists a unit twice")
        if not isinstance(step.reuse, tuple) or not all(isinstance(u, str) and u for u in step.reuse):
            raise ScheduleError(f"{where}.reuse", "must be a list of unit names")
        if len(set(step.reuse)) != len(step.reuse):
            raise ScheduleError(f"{where}.reuse", "lists a unit twice")
        both = sorted(set(step.skip) & set(step.reuse))
        if both:
            raise ScheduleError(f"{where}.reuse", f"unit {both[0]!r} is both skipped and reused in this step")
        if GUIDANCE_UNIT in step.reuse and s.guidance is None:
            raise ScheduleError(f"{where}.reuse", f"unit {GUIDANCE_UNIT!r} (the guidance direction) is reused, but "
                                "the schedule has no guidance")
        if step.reuse and k == 0:
            raise ScheduleError(f"{where}.reuse", "the first step cannot reuse: no earlier call computed anything")
        for u in step.reuse:
            if not any(computes_unit(s.steps[j], u) for j in range(k)):
                raise ScheduleError(f"{where}.reuse", f"unit {u!r} is reused but no earlier model call computed it")
    if not _valid_reuse_order(s.reuse_order):
        raise ScheduleError("reuse_order", f"must be one of {', '.join(map(str, REUSE_ORDERS))}, got {s.reuse_order!r}")
    if s.final_denoise and s.steps[-1].t == 0:
        raise ScheduleError("final_denoise", "the last step already ends on the data (t = 0)")
