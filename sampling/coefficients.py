"""Schedule + noise schedule -> Plan: the instructions of one run, every coefficient precomputed.

Per step k, in this order (UniPC's, extended): the model call at tau_k (or the solver's replacement for it),
the corrector of step k - 1 (it needed this output), DC-Solver's compensation of the new output, then the
step's solver moves the state to tau_{k+1}. The solver's own instructions come from its module under
``sampling/solvers/`` (the registry in ``space/solvers.py`` names it); this module only orders the steps,
adds the per-step decisions every solver shares (corrector, compensation, skip and reuse masks, final denoise) and frees
what no later instruction reads. Coefficients are torch tensors, differentiable in the times and the ratios.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from autotune.errors import ScheduleError
from autotune.sampling.noise import NoiseSchedule
from autotune.sampling.program import (
    Call, Combine, Compensate, Copy, Instruction, Mark, Plan, state_register, with_frees,
)
from autotune.sampling.solvers import implementation
from autotune.sampling.solvers.base import PlanContext
from autotune.sampling.solvers.unipc import unic_update
from autotune.space.schedule import Schedule

__all__ = ["Plan", "compensation", "make_plan"]


def compensation(k: int, ratio: torch.Tensor, dc_order: int, times: torch.Tensor) -> Compensate:
    """DC-Solver dynamic compensation (Zhao et al. 2024, eq. of Sec. 3.2 and ``dynamic_compensation`` in their
    code): Lagrange interpolation in t (not lambda) through m_k .. m_{k-dc_order} at
    ``ratio * tau_k + (1 - ratio) * tau_{k-1}`` (ratio 1 returns m_k). The outputs m_j are the stored ones,
    themselves compensated at their own step, as in the paper's code, which overwrites its output buffer.
    What the paper does and what we do is written down in ``autotune.search.dc_fit``."""
    target_t = ratio * times[k] + (1.0 - ratio) * times[k - 1]
    nodes = [k - i for i in range(dc_order + 1)]
    weights = []
    for i in nodes:
        w = torch.ones((), dtype=times.dtype)
        for j in nodes:
            if j != i:
                w = w * (target_t - times[j]) / (times[i] - times[j])
        weights.append((i, w))
    return Compensate(k, tuple(weights))


def model_times(noise: NoiseSchedule, times: torch.Tensor, lam: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """The time each step's own model call tells the network: tau_k moved by the step's log-SNR shift, kept in
    [t_min, T] (the range the network was trained on). An unshifted step gets tau_k itself, bit for bit."""
    n = shifts.shape[0]
    if not shifts.requires_grad and not bool((shifts != 0).any()):
        return times[:n]
    # tau + (t(lambda + shift) - t(lambda)), not t(lambda + shift): exactly tau at shift 0 (t_of_lambda is not an
    # exact inverse), while the gradient in the shift stays dt/dlambda there
    moved = times[:n] + (noise.t_of_lambda(lam[:n] + shifts) - noise.t_of_lambda(lam[:n]))
    return moved.clamp(noise.t_min, noise.T)


def _step_code(k: int, schedule: Schedule, ctx: PlanContext, ratios: torch.Tensor,
               called_at: torch.Tensor) -> list[Instruction]:
    """Step k: its model call, the pending corrector, compensation, then the solver's move to tau_{k+1}."""
    step = schedule.steps[k]
    solver = implementation(step.solver)
    first_call = getattr(solver, "first_call", None)
    # the state and the conversions stay at tau_k; only the network's time input carries the shift
    code: list[Instruction] = (list(first_call(k, step, ctx)) if first_call is not None
                               else [replace(ctx.call(k, skip=frozenset(step.skip)), time=called_at[k])])
    prev = schedule.steps[k - 1] if k > 0 else None
    if prev is not None and prev.corrector != "none":
        corr = unic_update(k - 1, prev.corrector_order, prev.prediction, prev.corrector, ctx)
        code += [corr.to("x", state_register(k - 1)), Mark(k, end_of_step=False)]
    # the override tensor decides (not the schedule's own ratio): a fitted ratio passed as a plain tensor
    # must apply; a tensor that requires grad always gets the compensation so its gradient exists
    if k >= schedule.dc_order and (ratios.requires_grad or float(ratios[k]) != 1.0):
        code.append(compensation(k, ratios[k], schedule.dc_order, ctx.times))
    code.append(Copy(state_register(k), "x"))
    code += solver.advance(k, step, ctx)
    code.append(Mark(k + 1, end_of_step=True))
    return code


def _step_of(slot: Any, n: int) -> int | None:
    """The step whose call fills ``slot`` (k or (k, i)); None for the final denoise's call (slot n)."""
    k = slot[0] if isinstance(slot, tuple) else slot
    return k if isinstance(k, int) and k < n else None


def with_data_scales(code: list[Instruction], scales: torch.Tensor) -> list[Instruction]:
    """Each call of step k scales its data prediction by ``scales[k]``: where the value is not 1, or always when the
    tensor requires grad (so its gradient exists); other calls keep ``scale`` None and run as before."""
    n = scales.shape[0]
    out = []
    for ins in code:
        k = _step_of(ins.slot, n) if isinstance(ins, Call) else None
        if k is not None and (scales.requires_grad or float(scales[k]) != 1.0):
            ins = replace(ins, scale=scales[k])
        out.append(ins)
    return out


def with_reuse(code: list[Instruction], schedule: Schedule) -> list[Instruction]:
    """Each call of step k (slot k or (k, i)) reuses step k's units; each call records the reused units it does not
    skip or reuse itself, when a later call reuses them (recording costs no compute: the cache keeps a reference)."""
    n = len(schedule.steps)
    calls = [i for i, ins in enumerate(code) if isinstance(ins, Call)]
    # slot n: the final denoise, a full call
    reuse = {i: frozenset(schedule.steps[k].reuse) if (k := _step_of(code[i].slot, n)) is not None else frozenset()
             for i in calls}
    later: frozenset[str] = frozenset()
    code = list(code)
    for i in reversed(calls):
        ins = code[i]
        code[i] = replace(ins, reuse=reuse[i], record=later - reuse[i] - ins.skip,
                          forecast=schedule.reuse_order if reuse[i] else 0)
        later = later | reuse[i]
    return code


# NODES_APART: a multistep update divides by the log-SNR gaps between the times it reads, so times a few ulps apart (a
# hand-written file; a decoded grid before encoding.py kept its gaps TIME_NUDGE apart) leave its system singular up
# to rounding. LAPACK sees that only sometimes: tests/test_encoding.py's schedule raised LinAlgError in UniP-3's solve
# on one CPU and, on another (2026-12-06), solved to weights of ~1e15 and sampled garbage; an order-2 step has no
# solve to fail at all. So a gap below this share of |lambda| (at least 1) is refused before any coefficient is
# computed.
NODES_APART = 1e-12


def _check_nodes_apart(schedule: Schedule, lam: torch.Tensor) -> None:
    """Raise ScheduleError at the first step whose multistep update (its predictor of order >= 2, or its corrector
    of order >= 2, applied after the next call) reads two times that coincide in log-SNR (NODES_APART)."""
    from autotune.space.solvers import solver_info

    values = lam.detach().double().tolist()
    for k, step in enumerate(schedule.steps):
        first = k
        if step.order >= 2 and not solver_info(step.solver).self_starting:
            first = k - (step.order - 1)
        if step.corrector != "none" and step.corrector_order >= 2:
            first = min(first, k - (step.corrector_order - 1))
        if first == k:
            continue  # a one-step update: it reads no earlier time
        for i in range(max(first, 0), k + 1):
            gap = abs(values[i + 1] - values[i])
            if gap <= NODES_APART * max(1.0, abs(values[i])):
                raise ScheduleError(f"steps[{k}].t", f"this step's multistep update reads times {i} and {i + 1} of "
                                    "the grid (time 0: t_start), equal in log-SNR up to rounding: its system is "
                                    "singular; move them apart or lower the order")


def make_plan(
    schedule: Schedule,
    noise: NoiseSchedule,
    times: torch.Tensor | None = None,
    ratios: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    shifts: torch.Tensor | None = None,
    data_scales: torch.Tensor | None = None,
) -> Plan:
    """Precompute every instruction of ``schedule`` on ``noise``.

    ``times`` (tau_0..tau_N), ``ratios``, ``shifts`` and ``data_scales`` (one per step) override the schedule's
    values with tensors, typically ones that require grad: the plan is then differentiable in them.
    """
    if times is None:
        times = torch.tensor(schedule.times, dtype=dtype)
    if ratios is None:
        ratios = torch.tensor([s.ratio for s in schedule.steps], dtype=dtype)
    log_alpha = noise.log_alpha(times)
    alpha = torch.exp(log_alpha)
    sigma = noise.sigma(times)
    if shifts is None:
        shifts = torch.tensor([s.shift for s in schedule.steps], dtype=times.dtype)
    ctx = PlanContext(schedule, times, alpha, sigma, log_alpha - torch.log(sigma))
    called_at = model_times(noise, times, ctx.lam, shifts)
    _check_nodes_apart(schedule, ctx.lam)
    code: list[Instruction] = []
    for k in range(len(schedule.steps)):
        try:
            code += _step_code(k, schedule, ctx, ratios, called_at)
        except torch.linalg.LinAlgError:  # a multistep update's nodes coincide in log-SNR (times an ulp apart)
            raise ScheduleError(f"steps[{k}].t", "a multistep update here (this step's, or the corrector of the "
                                "step before) is singular: two of the times it uses are equal in log-SNR; move them "
                                "apart or lower the order") from None
    if schedule.final_denoise:  # DPM-Solver's denoise_to_zero: the data prediction at the last time is the sample
        n = len(schedule.steps)
        code += [ctx.call(n), Combine("x", "x", None, ((n, torch.ones((), dtype=times.dtype)),), "data"),
                 Mark(n, end_of_step=False)]
    if data_scales is None:
        data_scales = torch.tensor([s.data_scale for s in schedule.steps], dtype=times.dtype)
    code = with_data_scales(code, data_scales)
    if schedule.units_reused:
        code = with_reuse(code, schedule)
    spaces = sorted({ins.prediction for ins in code if isinstance(ins, Combine)})
    return Plan(with_frees(code), times, alpha, sigma, tuple(spaces), noise.init_scale())
