"""DC-Solver ratio fitting: the compensation ratios of a schedule, fitted by gradient through the executor.

DC-Solver (Zhao, Wang, Zhou, Lu, ECCV 2024; code: wl-zhao/DC-Solver) compensates the misalignment of
predictor-corrector samplers. What the paper (and its two code bases, ``ldm/.../dc_solver.py`` and the
diffusers ``DCSolverMultistepScheduler``) does, and what we do:

* **Compensation.** Before the predictor of step k, the newest model output m_k is replaced by the Lagrange
  polynomial through the last ``dc_order + 1`` outputs m_k .. m_{k-dc_order}, interpolated in *time t* (their
  code interpolates over the timesteps, not over lambda), evaluated at ``rho_k tau_k + (1 - rho_k) tau_{k-1}``.
  rho = 1 is no compensation. The compensated output stays in the history (their buffer is overwritten), so
  later interpolations and the UniC corrector of step k (run once m_{k+1} is known) use it. Before
  ``dc_order + 1`` outputs exist the ratio is 1 (their code skips the warm-up steps). For predictor-only
  samplers (DPM-Solver++) the same replacement happens before the predictor. We do exactly this:
  ``sampling.coefficients.compensation`` builds the weights and ``make_plan`` applies them per step;
  the executor replaces ``hist[k]`` in place after the previous step's corrector and before the predictor.
* **Ground truth.** Theirs: a 200-step (diffusers) or 999-step DDIM run from the same noise, states looked
  up at the nearest stored timestep. Ours: the evaluation issue's reference (100-step UniPC-3 with
  corrector), states interpolated in lambda at the schedule's times (``Reference.state_at``).
* **Loss and optimiser.** Theirs: AdamW, lr 0.1, 40 iterations (ldm code; the diffusers port defaults to
  20), ratio initialised at 1.0 and unbounded, on about 10 datapoints; the ratios are searched *greedily*,
  one step at a time in step order, each minimising the MSE between the state reached at tau_{k+1} (after
  the corrector) and the ground-truth state there, the earlier ratios frozen. Ours: the same optimiser and
  defaults; ``method="greedy"`` is their sequential procedure (each objective re-runs the executor up to
  tau_{k+1}); ``method="joint"`` (the default, several times cheaper on long schedules) minimises the
  trajectory loss — the mean over the schedule's times of the per-time state MSE against the reference —
  in all ratios at once through one differentiable run per iteration. Both keep the best iterate seen
  (the initial ratios included), where the paper keeps the last one.
* **Caching (search integration).** A fit is remembered in the store under (model fingerprint, schedule
  hash with every ratio reset to 1, fit set and reference, fit settings); a search candidate's evaluation
  is then stored under the *fitted* schedule's hash (see ``attach_ratio_source``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from autotune.errors import AutotuneError
from autotune.evaluate.reference import Reference
from autotune.evaluate.sets import EvalSet
from autotune.sampling.denoiser import Denoiser
from autotune.sampling.executor import sample
from autotune.space.schedule import Schedule

FIT_METHODS = ("joint", "greedy")
FIT_VERSION = "dcfit1"  # bump when the fitting procedure changes what it returns for the same inputs


class DCFitError(AutotuneError, ValueError):
    """Ratio fitting or prediction cannot run as asked (bad settings, a schedule without compensable steps)."""


@dataclass(frozen=True)
class FitSettings:
    """How ratios are fitted. Defaults: the paper's AdamW, lr 0.1, 40 iterations, 10 datapoints.

    Example:
        >>> FitSettings(method="greedy").iterations
        40
    """

    datapoints: int = 10
    iterations: int = 40
    lr: float = 0.1
    method: str = "joint"

    def __post_init__(self) -> None:
        if self.method not in FIT_METHODS:
            raise DCFitError(f"fit method: must be one of {', '.join(FIT_METHODS)}, got {self.method!r}")
        if not isinstance(self.datapoints, int) or self.datapoints < 1:
            raise DCFitError(f"fit datapoints: must be an integer >= 1, got {self.datapoints!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise DCFitError(f"fit iterations: must be an integer >= 0, got {self.iterations!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise DCFitError(f"fit lr: must be a finite number > 0, got {self.lr!r}")

    def as_dict(self) -> dict[str, Any]:
        return {"datapoints": self.datapoints, "iterations": self.iterations, "lr": float(self.lr),
                "method": self.method, "version": FIT_VERSION}


@dataclass(frozen=True)
class RatioFit:
    """A fitted schedule and how the trajectory loss on the fit datapoints moved."""

    schedule: Schedule
    loss_before: float  # trajectory loss with every ratio 1
    loss_after: float  # with the fitted ratios
    seconds: float
    model_calls: int  # model evaluations spent by the fit (forward, most with a backward)

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(s.ratio for s in self.schedule.steps)


def compensable_steps(schedule: Schedule) -> tuple[int, ...]:
    """Steps whose ratio may differ from 1: those with ``dc_order + 1`` model outputs known."""
    return tuple(range(schedule.dc_order, len(schedule.steps)))


def with_ratios(schedule: Schedule, ratios) -> Schedule:
    """The schedule with one ratio per step (1.0 = no compensation)."""
    values = [float(r) for r in ratios]
    if len(values) != len(schedule.steps):
        raise DCFitError(f"ratios: {len(values)} given for a schedule of {len(schedule.steps)} steps")
    return schedule.with_steps(dataclasses.replace(s, ratio=r) for s, r in zip(schedule.steps, values))


def without_ratios(schedule: Schedule) -> Schedule:
    """The schedule with every ratio reset to 1 (its identity as a fitting problem)."""
    return with_ratios(schedule, [1.0] * len(schedule.steps))


def _fit_batch(eval_set: EvalSet, reference: Reference, n: int):
    """(noise, labels, reference states) of the first n datapoints of the set."""
    n = min(n, eval_set.size)
    noise = eval_set.noise(torch.float32)[:n]
    labels = eval_set.conditions()
    return noise, None if labels is None else labels[:n], n


def trajectory_targets(reference: Reference, noise_schedule, schedule: Schedule, n: int) -> list[torch.Tensor]:
    """Reference states of the first n datapoints at the schedule's times after the start (interpolated in
    lambda); with ``final_denoise`` the last state is the denoised sample, so its target is the final one."""
    targets = [reference.state_at(noise_schedule, float(t))[:n].double() for t in schedule.times[1:]]
    if schedule.final_denoise:
        targets[-1] = reference.final[:n].double()
    return targets


def _state_errors(states: list[torch.Tensor], targets: list[torch.Tensor]) -> list[torch.Tensor]:
    return [((s.double() - g) ** 2).mean() for s, g in zip(states[1:], targets)]


def _run(model: Denoiser, schedule: Schedule, noise, labels, ratios: torch.Tensor, differentiable: bool):
    return sample(model, schedule, noise, labels, differentiable=differentiable, ratios=ratios, keep_states=True)


def trajectory_loss(model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference,
                    datapoints: int = 10) -> float:
    """Mean over the schedule's times of the state MSE against the reference, on the first datapoints."""
    noise, labels, n = _fit_batch(eval_set, reference, datapoints)
    targets = trajectory_targets(reference, model.noise, schedule, n)
    ratios = torch.tensor([s.ratio for s in schedule.steps], dtype=torch.float64)
    with torch.no_grad():
        states = _run(model, schedule, noise, labels, ratios, False).states
    return float(torch.stack(_state_errors(states, targets)).mean())


def _adamw(initial: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], settings: FitSettings):
    """AdamW on ``objective(param)``; returns (best param seen, its loss). The paper's lr and iterations."""
    param = initial.clone().requires_grad_(True)
    optimiser = torch.optim.AdamW([param], lr=settings.lr)
    best = (math.inf, initial.clone())
    for _ in range(settings.iterations):
        loss = objective(param)
        value = float(loss.detach())
        if not math.isfinite(value):
            break  # a ratio that makes the sampler diverge: keep the best finite iterate
        if value < best[0]:
            best = (value, param.detach().clone())
        optimiser.zero_grad()
        loss.backward()
        if not bool(torch.isfinite(param.grad).all()):
            break
        optimiser.step()
    else:
        with torch.no_grad():
            value = float(objective(param.detach()))
        if value < best[0]:
            best = (value, param.detach().clone())
    return best[1], best[0]


def _truncated(schedule: Schedule, k: int) -> Schedule:
    """Steps 0..k, plus step k+1 (its corrector dropped) when step k has a corrector: that corrector runs
    at the start of step k+1, once the output at tau_{k+1} is known. Its own predictor costs no model call."""
    steps = list(schedule.steps[: k + 1])
    if schedule.steps[k].corrector != "none":
        steps.append(dataclasses.replace(schedule.steps[k + 1], corrector="none", corrector_order=0))
    final = schedule.final_denoise and k + 1 == len(schedule.steps)
    return schedule.with_steps(steps, final_denoise=final)


def fit_ratios(model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference,
               settings: FitSettings = FitSettings()) -> RatioFit:
    """Fit the schedule's compensation ratios to the reference trajectory on the first datapoints of a set.

    Args:
        model: the Denoiser (its guidance comes from ``schedule.guidance``).
        schedule: any schedule; steps before ``dc_order`` keep ratio 1, the others start from their own ratio.
        eval_set, reference: the set (usually the search set) and its reference at the schedule's guidance.
        settings: datapoints, AdamW lr and iterations, "joint" or "greedy" (see the module docstring).

    Returns:
        RatioFit with the fitted schedule and the trajectory loss before (ratios 1) and after.

    Example:
        >>> from autotune.models.registry import load_model
        >>> from autotune.evaluate.evaluator import Evaluator
        >>> from autotune.sampling.named import build
        >>> m = load_model("gmm2d", torch.float64)
        >>> ev = Evaluator(m, "search", size=16)
        >>> fit = fit_ratios(m, build("unipc-bh2-o2", m.noise, 5), ev.eval_set, ev.reference())
        >>> fit.loss_after <= fit.loss_before
        True
    """
    steps = compensable_steps(schedule)
    if not steps:
        raise DCFitError(f"schedule: {len(schedule.steps)} steps leave none to compensate "
                         f"(dc_order {schedule.dc_order} needs {schedule.dc_order + 1} model outputs first)")
    start = time.perf_counter()
    noise, labels, n = _fit_batch(eval_set, reference, settings.datapoints)
    targets = trajectory_targets(reference, model.noise, schedule, n)
    base = torch.tensor([s.ratio if k in steps else 1.0 for k, s in enumerate(schedule.steps)], dtype=torch.float64)
    calls = [0]

    def run(sched: Schedule, ratios: torch.Tensor, differentiable: bool = True) -> list[torch.Tensor]:
        result = _run(model, sched, noise, labels, ratios, differentiable)
        calls[0] += result.nfe
        return result.states

    with torch.no_grad():
        loss_before = float(torch.stack(_state_errors(run(schedule, torch.ones_like(base), False), targets)).mean())
    index = torch.tensor(steps)
    if settings.method == "joint":
        def objective(free: torch.Tensor) -> torch.Tensor:
            ratios = base.index_put((index,), free)
            return torch.stack(_state_errors(run(schedule, ratios), targets)).mean()

        best, _ = _adamw(base[index], objective, settings)
        fitted = base.index_put((index,), best)
    else:  # greedy, the paper's procedure: step by step, earlier ratios frozen at their fitted values
        fitted = base.clone()
        for k in steps:
            sub = _truncated(schedule, k)

            def objective(r: torch.Tensor, k: int = k, sub: Schedule = sub) -> torch.Tensor:
                ratios = torch.cat([fitted[:k], r.reshape(1), torch.ones(len(sub.steps) - k - 1, dtype=r.dtype)])
                states = run(sub, ratios)
                return ((states[k + 1].double() - targets[k]) ** 2).mean()

            best, _ = _adamw(fitted[k: k + 1].reshape(()), objective, settings)
            fitted[k] = best
    fitted_schedule = with_ratios(schedule, fitted.tolist())
    with torch.no_grad():
        loss_after = float(torch.stack(_state_errors(run(fitted_schedule, fitted, False), targets)).mean())
    if not loss_after <= loss_before:
        # the best iterate is chosen on the same loss, so this only happens when the schedule's own starting
        # ratios were worse than none: fall back to ratios 1 explicitly rather than return a worse schedule
        fitted_schedule, loss_after = without_ratios(schedule), loss_before
    return RatioFit(fitted_schedule, loss_before, loss_after, time.perf_counter() - start, calls[0])


# ---------------------------------------------------------------------------------------- search integration


def fit_key(fingerprint: str, schedule: Schedule, fit_set: str, settings: FitSettings) -> str:
    """Store key of a fit: (model, schedule without ratios, fit set + reference, settings)."""
    text = json.dumps({"model": fingerprint, "schedule": without_ratios(schedule).hash(), "set": fit_set,
                       "fit": settings.as_dict()}, sort_keys=True)
    return "dc-fit:" + hashlib.sha256(text.encode()).hexdigest()[:24]


def with_fitted_ratios(model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference,
                       settings: FitSettings = FitSettings(), *, store: Any = None, fingerprint: str | None = None,
                       ref_version: str = "") -> Schedule:
    """The schedule with fitted ratios, fitted once per (model, schedule without ratios, set, settings).

    With a store (``autotune.cache``) the fitted ratios are remembered across runs; a schedule without
    compensable steps is returned with ratios 1.
    """
    if not compensable_steps(schedule):
        return without_ratios(schedule)
    fingerprint = fingerprint or model.fingerprint()
    key = fit_key(fingerprint, schedule, f"{eval_set.id}/{ref_version}", settings)
    if store is not None:
        found = store.get_search_state(key)
        if found is not None:
            return with_ratios(schedule, found["ratios"])
    fit = fit_ratios(model, without_ratios(schedule), eval_set, reference, settings)
    if store is not None:
        store.put_search_state(key, {"ratios": list(fit.ratios), "loss_before": fit.loss_before,
                                     "loss_after": fit.loss_after, "seconds": fit.seconds,
                                     "unfitted_hash": without_ratios(schedule).hash(),
                                     "fitted_hash": fit.schedule.hash(), "fit": settings.as_dict()})
    return with_ratios(schedule, fit.ratios)


class FittedRatios:
    """Evaluator ratio source: every candidate's ratios are fitted on the evaluator's own set and reference."""

    def __init__(self, settings: FitSettings = FitSettings()) -> None:
        self.settings = settings
        self._memo: dict[str, Schedule] = {}

    def __call__(self, evaluator, schedule: Schedule) -> Schedule:
        key = without_ratios(schedule).hash()
        if key not in self._memo:
            self._memo[key] = with_fitted_ratios(
                evaluator.model, schedule, evaluator.eval_set, evaluator.reference(schedule.guidance, nfe=schedule.nfe),
                self.settings, store=evaluator.store, fingerprint=evaluator.fingerprint,
                ref_version=evaluator.reference_version(schedule.guidance, nfe=schedule.nfe))
        return with_ratios(schedule, [s.ratio for s in self._memo[key].steps])


class CPRRatios:
    """Evaluator ratio source: every candidate's ratios predicted instantly by a CPR file (no fitting)."""

    def __init__(self, cpr) -> None:
        self.cpr = cpr

    def __call__(self, evaluator, schedule: Schedule) -> Schedule:
        self.cpr.check_model(evaluator.fingerprint)
        return self.cpr.apply(schedule)


def ratio_source(spec: str, settings: FitSettings = FitSettings()):
    """The ratio source named by a ``--ratios`` value: ``fit`` or ``cpr:FILE``."""
    if spec == "fit":
        return FittedRatios(settings)
    if spec.startswith("cpr:") and len(spec) > 4:
        from autotune.predictors.cpr import load_cpr

        return CPRRatios(load_cpr(spec[4:]))
    raise DCFitError(f"--ratios: expected 'fit' or 'cpr:FILE', got {spec!r}")


def attach_ratio_source(evaluator, spec: str | None, settings: FitSettings = FitSettings()):
    """Make ``evaluator.evaluate(candidate)`` score the candidate with fitted or CPR-predicted ratios.

    The evaluation is stored under the fitted schedule's hash, and the returned metrics carry the schedule
    actually evaluated (``evaluated_schedule``, JSON). ``spec`` None detaches.
    """
    evaluator.ratio_source = None if spec is None else ratio_source(spec, settings)
    return evaluator


# ------------------------------------------------------------------------------------- grid fits for CPR


@dataclass(frozen=True)
class GridFit:
    """The ratios fitted directly for one (NFE, guidance) configuration of a named solver."""

    nfe: int
    guidance: float | None
    fit: RatioFit


def base_schedule(model: Denoiser, solver: str, nfe: int, guidance: float | None) -> Schedule:
    """The named schedule ``solver`` at ``nfe`` on the model's noise schedule, for that guidance."""
    from autotune.sampling.named import build

    return dataclasses.replace(build(solver, model.noise, nfe), guidance=guidance)


def fit_grid(model: Denoiser, solver: str, nfes, guidances, settings: FitSettings = FitSettings(), *,
             store: Any = None, callback: Callable[[GridFit], None] | None = None) -> list[GridFit]:
    """Fit ratios for every (NFE, guidance) of the grid on the first datapoints of the search set.

    ``guidances`` may be ``[None]`` for an unguided model. The reference of each guidance is computed once
    (and kept in the store, if any) on a search set of ``settings.datapoints`` samples.
    """
    from autotune.evaluate.evaluator import Evaluator

    evaluator = Evaluator(model, "search", size=settings.datapoints, store=store)
    out = []
    for g in guidances:
        reference = evaluator.reference(g)
        for n in nfes:
            fit = fit_ratios(model, base_schedule(model, solver, n, g), evaluator.eval_set, reference, settings)
            out.append(GridFit(n, g, fit))
            if callback is not None:
                callback(out[-1])
    return out


def regress_grid(fits: list[GridFit], model_fingerprint: str, solver: str, degrees=None, settings=None):
    """CPR over a grid of direct fits (``autotune.predictors.cpr.fit_cpr``)."""
    from autotune.predictors.cpr import DEFAULT_DEGREES, RatioSample, fit_cpr

    if not fits:
        raise DCFitError("cpr: no configurations were fitted")
    samples = [RatioSample(f.nfe, f.guidance, f.fit.ratios) for f in fits]
    info = {"fit_settings": settings.as_dict() if settings else None,
            "fit_seconds": round(sum(f.fit.seconds for f in fits), 3)}
    return fit_cpr(samples, model_fingerprint, solver, fits[0].fit.schedule.dc_order, degrees or DEFAULT_DEGREES, info)
