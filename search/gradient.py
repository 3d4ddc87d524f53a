"""`gradient`: refine a schedule's time grid, its model-time shifts and (``ratios=True``) its DC-Solver
compensation ratios by backpropagating the error to the reference through the differentiable executor (in the
spirit of LD3, Tong et al. 2024, which learns the grid and a decoupled model time, and of DC-Solver's ratio fit,
here joint with the grid), as a finishing step for any search.

The interior times are parameterised so that every iterate is a valid, strictly decreasing grid: log-SNR
positions are the cumulative sums of softmax weights between lambda(T) and lambda(t_min); the step onto
t = 0 (if any) and every per-step decision stay as they are. Each step's ``shift`` (the log-SNR offset of the
time its model call tells the network) moves freely. The noise is a fixed part of the search set (the first
``samples``), so every iterate is scored on the same noise and "the best iterate" means something; random
mini-batches made the best iterate the one with the luckiest batch (digits: 3.35e-3 on validation vs 2.56e-3 for a
fixed 64).

The loss is tail-aware by default (``aggregate="rms"``): the root mean square of the per-sample errors (each
sample's mean squared error against the reference solution), whose gradient weighs every sample by its own
error, so a grid that is excellent on most noises and sends a few to another mode pays for those few. The plain
mean (``aggregate="mean"``) lowered the mean on fresh noise and made its 99th percentile worse than both the
stage-1 winner's and the best named schedule's. Measured (scratch runs on the default search's stage-1 winner, 60
steps, report set of 1024 noises; the best diffusers-equivalent named schedule in brackets):

    digits NFE 5 (unipc-bh1-o3: mean 6.68e-3, p99 2.79e-2)     mean      p99
      stage-1 winner                                         4.07e-3   2.04e-2
      mean loss, first 64 noises (the old default, 35 s)     3.13e-3   2.68e-2
      mean loss, all 128 (79 s)                              3.30e-3   2.48e-2
      rms loss, all 128 (75 s)                               2.92e-3   1.53e-2
    gmm64 NFE 5 (p99 of the best peer 0.158) / NFE 6 (0.081), all 128 noises:
      mean loss                                  4.36e-3 / 4.35e-3   0.190 / 0.222
      rms loss                                   6.07e-3 / 3.69e-3   0.093 / 0.112

On gmm64 a separate set of 512 noises did better still (NFE 6, mean loss: p99 0.057), which says the tail is
limited by how many noises the loss sees. The price is some of the mean where the tail was not the problem: the
default search on digits-flow NFE 5 closed at 1.55x the best named schedule's mean with rms (p99 5.05e-3 vs
8.84e-3), 1.68x with the mean loss on 64 noises. A prototype that applied the shift through a model wrapper gave digits
2.97e-3 with shifts alone, and with times alone at the same step size it diverged (2.1e-2), which is why the best
iterate is returned, never the last.

The ratios (every step from ``dc_order`` on; search/dc_fit.py says what a ratio does) are a few more free
numbers of the same loss, and the job moves them with the grid. Measured on the default search's stage-1
winners at NFE 5, 40 steps of the rms loss, report set of 1024 noises (scratch runs, 2026-12-02):

                                              grid + shifts        + ratios
    digits-flow (unipc-bh2-o3 1.16e-3 / 8.84e-3)  6.90e-4 / 3.34e-3   5.92e-4 / 2.71e-3    (mean / p99)
    digits (stage 1: 3.78e-3 / 1.44e-2)           3.28e-3 / 1.80e-2   3.10e-3 / 1.26e-2

(At half the step, 60 steps, digits-flow reached only 8.15e-4: the loss is not convex in these parameters, and
the step size is the one tuned on digits.) The search-set values (digits 1.86e-3 / 1.54e-3) sit well below the
report set's: 128 noises are what the refinement fits, and what it learns carries over only in part.

Where the descent ends depends on where it starts, and the best start is often not stage 1's best. digits-flow
NFE 5, 40 steps from each start (report set of 1024 noises; unipc-flow 1.23e-3; scratch runs, 2026-12-03):

    seed 1 start (search-set mean)          refined, report mean    seed 0 start              refined
    stage 1's best (1.107e-3)                1.03e-3                 best = unipc-bh2-o3       5.29e-4
    trial 72 (1.118e-3)                      7.45e-4                 trial 12 (9.72e-4)        9.04e-4
    unipc-bh2-o3 (1.155e-3)                  6.57e-4                 unipc-flow (9.89e-4)      5.92e-4
    unipc-flow (1.230e-3)                    6.24e-4

On rgb32-v (the v-prediction photo-patch UNet) the step of 0.03 overshoots: refining unipc-bh1-o2 with an analytic
first step at NFE 5 (40 steps, 128 noises) the loss went 5.5e-3 at step 15 -> 2.7e-2 at step 20 and ended the run
at 5.47e-3 best (report mean, 256 noises: 5.91e-3). Now an iterate over BACKOFF x the best so far puts the parameters
back at the best iterate and halves the step (a fresh Adam from there): the same run descends smoothly to 4.69e-3
(report 4.83e-3, -18 %); on the README's digits search no refinement spikes (the same iterates, to the digit).
The step after a backoff uses the best iterate's own loss and gradient, kept from when it was computed, so a
backoff costs no evaluation (it used to compute the best iterate again): rgb32-v NFE 6 from unipc-bh1-o3 (128
noises, ratios) backs off twice in its first 8 steps and so had 38 distinct iterates of 40, now 40 (the same path,
two steps longer; the best, 3.63e-3, came before the end either way). Also tried there and not kept (scratch runs,
2026-12-05, report set of 1024 noises): 256 noises instead of 128 (4 backoffs, the step ended at 1/16: report mean
4.84e-3 vs 3.89e-3), and a 5-step warm-up of the step with 1.2x regrowth after each new best (the loss oscillated
between 4.4e-3 and 1.2e-2: report 4.37e-3).

Where a backoff happens, Adam is the wrong tool: the loss has a stiff direction. On rgb32-v NFE 6 from the AFS start
(unipc-bh1-o2+afs, 128 noises, scratch, 2026-12-06) the loss along the first interior time alone rises 1.6x within
0.0024 of its minimum, and Adam's first step (lr x the gradient's sign in every parameter) moves that time 0.007:
40 steps ended at 4.10e-3 (report mean 4.35e-3). Smaller steps did not cure it (lr 0.01: 4.04e-3, report 4.22e-3;
the grid's logits at a tenth of the step: report 4.49e-3; BACKOFF 1.1: slower at NFE 5 and 6). L-BFGS
(:class:`QuasiNewtonDescent`, torch's with a strong Wolfe line search, the same 40 evaluations) learns the
curvature: 3.29e-3, report 3.43e-3; but from NFE 5's AFS start, farther from its optimum, it ended at 7.78e-3
against Adam's 4.78e-3, and on digits NFE 5 at 1.22e-3 against 1.14e-3. Adam for 20 steps and L-BFGS for 20 was
worse than the better of the two in all three. Neither wins everywhere, so the job races them where Adam backed
off (search/job.py: QUASI_NEWTON).

A race of starts was tried and not kept (commit 2582fde, reverted): stage 1's best, its next distinct trial and the
2 best named schedules took 10 steps each on 32 noises and the lowest went on. Going on from the race iterate:
digits-flow seed 1 1.50x -> 1.97x the best named schedule, but the README's digits search 2.97x -> 1.68x (a start
2 % lower in the race; 2.22x when stage 1's best was kept unless another was 10 % lower, the race iterate fit to 32
noises). Refining the chosen start afresh: digits unchanged, digits-flow seed 1 only 1.65x, and 15-30 s more on
every default search (the race's 40 extra calls). The loss after 10 steps told the poor start from the good ones,
not always the best of the good (seed 0: 6.30e-4 / 1.14e-3 / 6.12e-4 at 10 steps, 5.07e-4 / 8.48e-4 / 5.67e-4 at 40).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Generator, Optional

import torch

from autotune.evaluate.reference import Reference
from autotune.evaluate.sets import EvalSet
from autotune.sampling.denoiser import Denoiser
from autotune.sampling.executor import sample
from autotune.space.schedule import MAX_DATA_SCALE, MAX_SHIFT, Schedule
from autotune.space.solvers import solver_info

DEFAULT_LR = 0.03  # Adam's step on the grid logits and the shifts; 0.05 and up overshoot on digits
# an iterate whose loss is over this many times the best so far sends the parameters back to the best iterate, and
# Adam starts again from there at half its step (at most MAX_BACKOFFS times)
BACKOFF = 1.5
MAX_BACKOFFS = 4
# the log data scales are parameters at SCALE_STEP x their size: Adam's step of lr in a log scale would be a 3 %
# change of a whole call's data prediction; moved with the grid at that step, gmm64 NFE 10's descents backed off
# and ended worse (scratch, 2026-12-07). Adam at 0.01 on the log scales alone of a refined schedule lowered
# digits-dit NFE 5's report mean by 17 %. (The job fits them alone, by L-BFGS: search/job.py, SCALE_FIT.)
SCALE_STEP = 1.0 / 3.0
AGGREGATES = ("rms", "mean")  # how the per-sample errors make the loss (the module's docstring says why rms)
# the power of the per-sample errors whose sum each (part of the) set contributes: rms sums squares
POWERS = {"rms": 2, "mean": 1}
VALUES = ("times", "shifts", "ratios", "data_scales")  # the executor's overrides the loss differentiates, by name

# Values -> (the summed per-sample errors to the power, their gradient with respect to each value given): the loss
# on all of the noises, or on parts of them summed (RayPool.gradient_split); refine_times only adds them up.
ErrorSum = Callable[[dict[str, Optional[torch.Tensor]]], tuple[float, dict[str, torch.Tensor]]]


@dataclass
class Refinement:
    schedule: Schedule
    losses: list[float]  # the loss of each iterate, in order (the first is the schedule as given)
    gave_up: bool = False  # stopped halfway: its best loss then was over the caller's give_up_above


def _free_times(schedule: Schedule) -> int:
    """How many interior times move: all but the start, and the last one when it lands on t = 0."""
    n = len(schedule.steps)
    return n - 1 if schedule.steps[-1].t == 0.0 else n


def error_sum(model: Denoiser, schedule: Schedule, noise: torch.Tensor, labels: Any, target: torch.Tensor,
              power: int, values: dict[str, Optional[torch.Tensor]]) -> tuple[float, dict[str, torch.Tensor]]:
    """The sum over ``noise`` of each sample's mean squared error to ``target``, to the ``power``, with
    ``schedule`` run on the ``values`` (times, shifts, ratios: None keeps the schedule's own), and its gradient
    with respect to each value given (an :data:`ErrorSum` once the rest is bound)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in values.items() if v is not None}
    out = sample(model, schedule, noise, labels, differentiable=True, **leaves)
    per_sample = ((out.sample.double() - target.double()) ** 2).flatten(1).mean(1)
    total = (per_sample ** power).sum()
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return float(total.detach()), {k: torch.zeros_like(v) if g is None else g
                                   for (k, v), g in zip(leaves.items(), grads)}


def refine_times(
    model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference, *, iterations: int = 40,
    lr: float = DEFAULT_LR, samples: int = 0, shifts: bool = True, aggregate: str = "rms", ratios: bool = False,
    split: Optional[Callable[..., Optional[ErrorSum]]] = None, give_up_above: float = math.inf,
    data_scales: bool = False, move_grid: bool = True,
) -> Refinement:
    """Adam on the softmax parameterisation of the log-SNR grid (unless ``move_grid`` is False), on the steps' shifts
    (unless ``shifts`` is False), on the compensation ratios of the steps from ``dc_order`` on when ``ratios``, and
    on the data scales of the steps that call the model when ``data_scales``; returns the best iterate seen. The
    loss is the ``aggregate`` ("rms" or "mean") of the per-sample errors on the set's first ``samples`` noises (0:
    all). ``split(model, schedule, noise, labels, target, power)``
    may hand the loss's samples out in parts (RayPool.gradient_split: the search's idle workers); it returns
    an :data:`ErrorSum`, or None to compute it here. A run whose best loss after half its ``iterations`` is still
    over ``give_up_above`` stops there (``gave_up``), returning that best. (:class:`Descent` runs the same
    descent in parts.)"""
    run = Descent(model, schedule, eval_set, reference, iterations=iterations, lr=lr, samples=samples,
                  shifts=shifts, aggregate=aggregate, ratios=ratios, split=split, data_scales=data_scales,
                  move_grid=move_grid)
    run.halfway()
    if run.above(give_up_above):
        return run.give_up()
    return run.finish()


class _InParts:
    """What :class:`Descent` and :class:`QuasiNewtonDescent` share: a descent of ``iterations`` evaluations that
    ``run(n)`` takes on to n, its ``result`` once it has ended, its best iterate ``so_far`` and ``best_loss``."""

    iterations: int
    result: Optional[Refinement]
    best_loss: float
    so_far: Refinement

    def run(self, evaluations: int) -> None:
        raise NotImplementedError

    def halfway(self) -> None:
        self.run(self.iterations // 2)

    def above(self, bar: float) -> bool:
        """Still going, a loss seen, and the best iterate's over ``bar``: the give-up rule's test at halfway."""
        return self.result is None and bool(self.so_far.losses) and self.best_loss > bar

    def finish(self) -> Refinement:
        """Run the remaining evaluations: the best iterate."""
        self.run(self.iterations)
        return self.result if self.result is not None else self.so_far


class Descent(_InParts):
    """One refinement (:func:`refine_times`'s descent, the same iterates) that runs in parts, so that a caller can
    take several starts to their halfway point before it decides which go on (search/job.py: RACE)."""

    def __init__(self, model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference, *,
                 iterations: int = 40, lr: float = DEFAULT_LR, samples: int = 0, shifts: bool = True,
                 aggregate: str = "rms", ratios: bool = False,
                 split: Optional[Callable[..., Optional[ErrorSum]]] = None, data_scales: bool = False,
                 move_grid: bool = True) -> None:
        self.iterations = iterations
        self._steps = _descend(model, schedule, eval_set, reference, iterations, lr, samples, shifts, aggregate,
                               ratios, split, data_scales, move_grid)
        self.evaluations, self.so_far, self.best_loss = 0, Refinement(schedule, []), math.inf
        self.backoffs = 0  # how many times it has gone back to its best iterate at a smaller step (BACKOFF)
        self.result: Optional[Refinement] = None  # the best iterate once the descent has ended (best_loss its loss)
        self._advance()

    def _advance(self) -> None:
        try:
            self.evaluations, self.so_far, self.best_loss, self.backoffs = next(self._steps)
        except StopIteration as end:
            self.result, self.best_loss = end.value

    def run(self, evaluations: int) -> None:
        """Go on until ``evaluations`` evaluations are done, or the descent ends."""
        while self.result is None and self.evaluations < evaluations:
            self._advance()

    def give_up(self) -> Refinement:
        """Stop here: the best iterate so far, marked ``gave_up`` (a descent that has ended: its result)."""
        if self.result is not None:
            return self.result
        self._steps.close()
        return dataclasses.replace(self.so_far, gave_up=True)


@dataclass
class _Problem:
    """What a descent moves and what it minimises, shared by Adam (:func:`_descend`) and L-BFGS
    (:class:`QuasiNewtonDescent`): the parameters (the grid's logits, the shifts, the movable ratios, the log data
    scales; those that move are ``params``), the executor's values they give, and the loss on the noises."""

    schedule: Schedule
    params: list[torch.Tensor]
    given: Callable[[], dict[str, Optional[torch.Tensor]]]  # the executor's overrides from the params, differentiable
    errors: ErrorSum
    count: int
    power: int

    def value(self, total: float) -> float:
        """The loss from the summed per-sample errors to the power."""
        return math.sqrt(total / self.count) if self.power == 2 else total / self.count

    def candidate(self, given: dict[str, Optional[torch.Tensor]]) -> Optional[Schedule]:
        t, shift, ratio, scale = (given[k] for k in VALUES)
        steps = self.schedule.steps
        shifts = shift if shift is not None else torch.tensor([s.shift for s in steps], dtype=torch.float64)
        ratios = ratio if ratio is not None else torch.tensor([s.ratio for s in steps], dtype=torch.float64)
        scales = scale if scale is not None else torch.tensor([s.data_scale for s in steps], dtype=torch.float64)
        return _with_values(self.schedule, t.detach(), shifts.detach(), ratios.detach(), scales.detach())

    def backward(self, given: dict[str, Optional[torch.Tensor]], grads: dict[str, torch.Tensor], value: float
                 ) -> bool:
        """The loss's gradient into the params' ``.grad``; False when nothing moves or it is not finite."""
        # the chain rule from the summed errors to the loss (d sqrt(S/n) / dS = 1 / (2 n loss)), then to the params
        scale = 1.0 / (2.0 * self.count * value) if self.power == 2 else 1.0 / self.count
        moved = [k for k in grads if given[k] is not None and given[k].requires_grad]
        if not moved or value == 0.0:
            return False
        torch.autograd.backward([given[k] for k in moved], [grads[k] * scale for k in moved])
        return all(p.grad is None or torch.isfinite(p.grad).all() for p in self.params)


def _problem(model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference, samples: int,
             shifts: bool, aggregate: str, ratios: bool, split: Optional[Callable[..., Optional[ErrorSum]]],
             data_scales: bool = False, move_grid: bool = True) -> _Problem:
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    ns = model.noise
    free = _free_times(schedule)
    times = torch.tensor(schedule.times, dtype=torch.float64)
    lam_start = ns.lambda_(times[0])
    lam_end = ns.lambda_(torch.tensor(ns.t_min, dtype=torch.float64))
    lam = ns.lambda_(times[1: free + 1])
    # initial logits reproduce the current grid: increments between consecutive lambdas, slack to lam_end
    points = torch.cat([lam_start.reshape(1), lam, lam_end.reshape(1)])
    increments = (points[1:] - points[:-1]).clamp_min(1e-6)
    logits = torch.log(increments / increments.sum()).clone().requires_grad_(free >= 1 and move_grid)

    def interior_lambdas(logit: torch.Tensor) -> torch.Tensor:
        return lam_start + (lam_end - lam_start) * torch.cumsum(torch.softmax(logit, 0), 0)[:free]

    with torch.no_grad():
        start_times = ns.t_of_lambda(interior_lambdas(logits))
    offsets = torch.tensor([s.shift for s in schedule.steps], dtype=torch.float64, requires_grad=shifts)
    # a ratio moves only where compensation can apply (dc_order earlier outputs known); the others stay 1
    movable = torch.tensor([ratios and k >= schedule.dc_order for k in range(len(schedule.steps))])
    fixed_ratios = torch.tensor([s.ratio for s in schedule.steps], dtype=torch.float64)
    ratio_free = fixed_ratios.clone().requires_grad_(bool(movable.any()))
    # a data scale moves on every step that calls the model (an analytic step has no prediction to scale), as its
    # logarithm, so that a factor and its inverse are equally far; kept in [1 / MAX_DATA_SCALE, MAX_DATA_SCALE]
    scaled = torch.tensor([data_scales and solver_info(s.solver).calls(s.order) > 0 for s in schedule.steps])
    fixed_scales = torch.tensor([s.data_scale for s in schedule.steps], dtype=torch.float64)
    log_scales = (torch.log(fixed_scales) / SCALE_STEP).requires_grad_(bool(scaled.any()))
    part = slice(None) if samples <= 0 else slice(0, samples)
    noise = eval_set.noise(torch.float32)[part]
    labels = eval_set.conditions()
    labels = None if labels is None else labels[part]
    target = reference.final[part].double()
    power = POWERS[aggregate]
    errors = split(model, schedule, noise, labels, target, power) if split is not None else None
    if errors is None:
        errors = functools.partial(error_sum, model, schedule, noise, labels, target, power)

    def grid(logit: torch.Tensor) -> torch.Tensor:
        if free < 1:
            return times
        # the given times moved by the change in t(lambda): the first iterate is the schedule as given, exactly
        # (t_of_lambda is not an exact inverse of lambda_)
        inner = times[1: free + 1] + (ns.t_of_lambda(interior_lambdas(logit)) - start_times)
        tail = times[free + 1:]
        return torch.cat([times[:1], inner, tail])

    def given() -> dict[str, Optional[torch.Tensor]]:
        shift = offsets.clamp(-MAX_SHIFT, MAX_SHIFT)
        ratio = torch.where(movable, ratio_free, fixed_ratios)
        bound = math.log(MAX_DATA_SCALE)
        scale = torch.where(scaled, torch.exp((SCALE_STEP * log_scales).clamp(-bound, bound)), fixed_scales)
        return dict(zip(VALUES, (grid(logits), shift if shifts else None,
                                 ratio if ratio_free.requires_grad else None,
                                 scale if log_scales.requires_grad else None)))

    params = [p for p in (logits, offsets, ratio_free, log_scales) if p.requires_grad]
    return _Problem(schedule, params, given, errors, noise.shape[0], power)


def _detached(given: dict[str, Optional[torch.Tensor]]) -> dict[str, Optional[torch.Tensor]]:
    return {k: None if v is None else v.detach() for k, v in given.items()}


def _descend(model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference, iterations: int,
             lr: float, samples: int, shifts: bool, aggregate: str, ratios: bool,
             split: Optional[Callable[..., Optional[ErrorSum]]], data_scales: bool = False,
             move_grid: bool = True
             ) -> Generator[tuple[int, Refinement, float, int], None, tuple[Refinement, float]]:
    """Adam's descent as a generator: before each evaluation it yields how many are done, the best iterate so far,
    its loss and how many times it has backed off; it returns the best iterate and its loss when done (or when the
    loss stops being finite)."""
    problem = _problem(model, schedule, eval_set, reference, samples, shifts, aggregate, ratios, split, data_scales,
                       move_grid)
    params = problem.params
    if not params:
        return Refinement(schedule, []), math.inf
    optimiser = torch.optim.Adam(params, lr=lr)
    best = (float("inf"), schedule)
    best_params = [p.detach().clone() for p in params]
    best_errors: Optional[tuple[float, dict[str, torch.Tensor]]] = None  # what errors() gave at the best iterate
    known = None  # after a backoff: the best iterate's errors, so the step from it costs no evaluation
    losses: list[float] = []
    step_size, backoffs, evaluations = lr, 0, 0
    while evaluations < iterations:
        yield evaluations, Refinement(best[1], list(losses)), best[0], backoffs
        given = problem.given()
        fresh = known is None
        if fresh:
            total, grads = problem.errors(_detached(given))
            evaluations += 1
        else:  # back at the best iterate after a backoff: its loss and gradient are known
            (total, grads), known = known, None
        value = problem.value(total)
        if fresh:
            spiked = not math.isfinite(value) or value > BACKOFF * best[0]
            if not math.isfinite(value) and backoffs >= MAX_BACKOFFS:
                break
            if math.isfinite(value):
                losses.append(value)
                candidate = problem.candidate(given)
                if candidate is not None and value < best[0]:
                    best, best_errors = (value, candidate), (total, grads)
                    best_params = [p.detach().clone() for p in params]
            if spiked and backoffs < MAX_BACKOFFS:
                with torch.no_grad():
                    for p, kept in zip(params, best_params):
                        p.copy_(kept)
                step_size, backoffs = step_size / 2, backoffs + 1
                optimiser = torch.optim.Adam(params, lr=step_size)
                known = best_errors
                continue
        optimiser.zero_grad()
        if not problem.backward(given, grads, value):
            break
        optimiser.step()
    return Refinement(best[1], losses), best[0]


class QuasiNewtonDescent(_InParts):
    """The same refinement (parameters, loss, noises) by L-BFGS with a strong Wolfe line search
    (torch.optim.LBFGS), in parts like :class:`Descent`: ``run(n)`` goes on until n evaluations are done. Every
    evaluation counts once: one at a point already evaluated (where a part begins) is remembered; a part whose
    budget ends inside a line search goes back to where that iteration began, and the next takes it again. The job
    runs it beside an Adam descent that backed off and after one (search/job.py: QUASI_NEWTON, POLISH say why and
    what they measured)."""

    def __init__(self, model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference, *,
                 iterations: int = 40, samples: int = 0, shifts: bool = True, aggregate: str = "rms",
                 ratios: bool = False, split: Optional[Callable[..., Optional[ErrorSum]]] = None,
                 history: int = 10, data_scales: bool = False, move_grid: bool = True) -> None:
        self.iterations = iterations
        self.problem = _problem(model, schedule, eval_set, reference, samples, shifts, aggregate, ratios, split,
                                data_scales, move_grid)
        self.evaluations, self.best_loss = 0, math.inf
        self._best: Schedule = schedule
        self._losses: list[float] = []
        self._seen: dict[tuple[float, ...], tuple[float, list[torch.Tensor]]] = {}
        self._ended = not self.problem.params  # for good: nothing to move, converged, or a loss not finite
        self.result: Optional[Refinement] = None
        self._limit = 0  # the evaluations the current part may reach
        self._optimiser = torch.optim.LBFGS(self.problem.params, lr=1.0, max_iter=1, max_eval=10 ** 9,
                                            history_size=history,
                                            line_search_fn="strong_wolfe", tolerance_grad=0.0,
                                            tolerance_change=0.0) if self.problem.params else None
        if self._ended:
            self.result = Refinement(schedule, [])

    @property
    def so_far(self) -> Refinement:
        return Refinement(self._best, list(self._losses))

    def _key(self) -> tuple[float, ...]:
        return tuple(float(v) for p in self.problem.params for v in p.detach().reshape(-1))

    def _closure(self) -> torch.Tensor:
        key = self._key()
        if key not in self._seen and self.evaluations >= self._limit:
            raise _Spent
        if key not in self._seen:
            problem = self.problem
            for p in problem.params:
                p.grad = None
            given = problem.given()
            total, grads = problem.errors(_detached(given))
            self.evaluations += 1
            value = problem.value(total)
            if not math.isfinite(value) or not problem.backward(given, grads, value):
                raise _Stop
            self._losses.append(value)
            candidate = problem.candidate(given)
            if candidate is not None and value < self.best_loss:
                self._best, self.best_loss = candidate, value
            self._seen[key] = (value, [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                       for p in problem.params])
        value, grads = self._seen[key]
        for p, g in zip(self.problem.params, grads):
            p.grad = g.clone()
        return torch.tensor(value, dtype=torch.float64)

    def run(self, evaluations: int) -> None:
        """Go on until ``evaluations`` evaluations are done, or the descent ends."""
        self._limit = evaluations
        while self.result is None and not self._ended and self.evaluations < evaluations:
            done = self.evaluations
            # one L-BFGS iteration a call (max_iter 1); kept to go back to where it began if the budget ends inside
            # its line search (whose evaluations torch bounds only to one over max_eval)
            at = [p.detach().clone() for p in self.problem.params]
            state = copy.deepcopy(self._optimiser.state_dict())
            try:
                self._optimiser.step(self._closure)
            except _Spent:  # a later part takes the same step again, the points it evaluated remembered
                with torch.no_grad():
                    for p, kept in zip(self.problem.params, at):
                        p.copy_(kept)
                self._optimiser.load_state_dict(state)
                break
            except _Stop:  # a loss or gradient that is not finite: the best so far stands
                self._ended = True
            if self.evaluations == done:  # converged: no step left to take
                self._ended = True
        if self.result is None and (self._ended or self.evaluations >= self.iterations):
            self.result = self.so_far

    def go_on(self, more: int) -> Refinement:
        """Take the descent ``more`` evaluations on from where it ended (its budget, or given up), its curvature
        history kept (POLISH in search/job.py: why); one that converged or stopped stays as it ended. Its best
        iterate."""
        if not self._ended:
            self.iterations, self.result = self.evaluations + more, None
        return self.finish()

    def give_up(self) -> Refinement:
        """Stop here: the best iterate so far, marked ``gave_up`` (a descent that has ended: its result)."""
        if self.result is not None:
            return self.result
        self.result = dataclasses.replace(self.so_far, gave_up=True)
        return self.result


class _Stop(Exception):
    """Raised inside L-BFGS's closure to end the descent (the loss or its gradient is not finite)."""


class _Spent(Exception):
    """Raised inside L-BFGS's closure when a new evaluation would go over the part's budget."""


def _with_values(schedule: Schedule, times: torch.Tensor, shifts: torch.Tensor, ratios: torch.Tensor,
                 scales: torch.Tensor) -> Schedule | None:
    """The schedule on the new grid with the new shifts, ratios and data scales, or None if rounding made it invalid
    (ties)."""
    from autotune.errors import ScheduleError

    values = [float(v) for v in times]
    try:
        steps = [dataclasses.replace(s, t=values[k + 1], shift=float(shifts[k]), ratio=float(ratios[k]),
                                     data_scale=float(scales[k]))
                 for k, s in enumerate(schedule.steps)]
        return schedule.with_steps(steps)
    except ScheduleError:
        return None
