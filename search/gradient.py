"""`gradient`: refine a schedule's time grid by backpropagating the error to the reference through the
differentiable executor (in the spirit of LD3, Tong et al. 2024), as a finishing step for any search.

The interior times are parameterised so that every iterate is a valid, strictly decreasing grid: log-SNR
positions are the cumulative sums of softmax weights between lambda(T) and lambda(t_min); the step onto
t = 0 (if any) and every per-step decision stay as they are. The loss is the mean squared error of the
final samples against the reference solution on (a batch of) the search set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from autotune.evaluate.reference import Reference
from autotune.evaluate.sets import EvalSet
from autotune.sampling.denoiser import Denoiser
from autotune.sampling.executor import sample
from autotune.space.schedule import Schedule


@dataclass
class Refinement:
    schedule: Schedule
    losses: list[float]


def _free_times(schedule: Schedule) -> int:
    """How many interior times move: all but the start, and the last one when it lands on t = 0."""
    n = len(schedule.steps)
    return n - 1 if schedule.steps[-1].t == 0.0 else n


def refine_times(
    model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference, *, iterations: int = 40,
    lr: float = 0.05, batch: int = 32, seed: int = 0,
) -> Refinement:
    """Adam on the softmax parameterisation of the log-SNR grid; returns the best grid seen (by batch loss)."""
    ns = model.noise
    free = _free_times(schedule)
    if free < 1:
        return Refinement(schedule, [])
    times = torch.tensor(schedule.times, dtype=torch.float64)
    lam_start = ns.lambda_(times[0])
    lam_end = ns.lambda_(torch.tensor(ns.t_min, dtype=torch.float64))
    lam = ns.lambda_(times[1: free + 1])
    # initial logits reproduce the current grid: increments between consecutive lambdas, slack to lam_end
    points = torch.cat([lam_start.reshape(1), lam, lam_end.reshape(1)])
    increments = (points[1:] - points[:-1]).clamp_min(1e-6)
    logits = torch.log(increments / increments.sum()).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    noise = eval_set.noise(torch.float32)
    labels = eval_set.conditions()
    g = torch.Generator().manual_seed(seed)

    def grid(logit: torch.Tensor) -> torch.Tensor:
        fractions = torch.cumsum(torch.softmax(logit, 0), 0)[:free]
        new_lam = lam_start + (lam_end - lam_start) * fractions
        inner = ns.t_of_lambda(new_lam)
        tail = times[free + 1:]
        return torch.cat([times[:1], inner, tail])

    best = (float("inf"), schedule)
    losses = []
    for _ in range(iterations):
        idx = torch.randperm(noise.shape[0], generator=g)[:batch]
        t = grid(logits)
        out = sample(model, schedule, noise[idx], None if labels is None else labels[idx], differentiable=True,
                     times=t)
        loss = ((out.sample.double() - reference.final[idx].double()) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        if not torch.isfinite(logits.grad).all():
            break
        value = float(loss.detach())
        losses.append(value)
        candidate = _with_times(schedule, t.detach())
        if candidate is not None and value < best[0]:
            best = (value, candidate)
        optimiser.step()
    return Refinement(best[1], losses)


def _with_times(schedule: Schedule, times: torch.Tensor) -> Schedule | None:
    """The schedule on the new grid, or None if rounding made it invalid (ties)."""
    from autotune.errors import ScheduleError

    values = [float(v) for v in times]
    try:
        steps = [dataclasses.replace(s, t=values[k + 1]) for k, s in enumerate(schedule.steps)]
        return schedule.with_steps(steps)
    except ScheduleError:
        return None
