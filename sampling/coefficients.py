"""Solver coefficients: every update of the unified space is ``x_new = a * x + sum_j w_j * m_j``.

Multistep exponential integrators (DPM-Solver / DPM-Solver++, UniPC's UniP and UniC, iPNDM) and
DC-Solver's compensation are all linear in the state and the stored model outputs, with weights that
depend only on the noise schedule at the schedule's times. This module computes those weights once per
schedule, as pure functions of tensors (so they are differentiable in the times and the ratios); the
executor and the compiler both consume the resulting :class:`Plan`, so they cannot drift apart.

Indices ``j`` are absolute: ``m_j`` is the model output (in the step's parameterisation) of the call
made at time ``tau_j``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from autotune.sampling.noise import NoiseSchedule
from autotune.space.schedule import Schedule

Weights = dict[int, torch.Tensor]

IPNDM_WEIGHTS = {
    1: (1.0,),
    2: (1.5, -0.5),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@dataclass(frozen=True)
class Update:
    """``x_new = state * x + sum(w * m[j] for j, w in outputs)`` with m in the ``prediction`` space."""

    state: torch.Tensor
    outputs: tuple[tuple[int, torch.Tensor], ...]
    prediction: str


@dataclass(frozen=True)
class Compensation:
    """DC-Solver: replace m[target] by ``sum(w * m[j])`` (Lagrange interpolation at a shifted time)."""

    target: int
    outputs: tuple[tuple[int, torch.Tensor], ...]


@dataclass(frozen=True)
class StepPlan:
    predictor: Update
    corrector: Update | None  # applied once the output at the step's end time is known
    compensation: Compensation | None  # applied to the newest output before the predictor


@dataclass(frozen=True)
class Plan:
    """Everything the executor needs, precomputed from a schedule and a noise schedule."""

    times: torch.Tensor  # tau_0 .. tau_N
    alphas: torch.Tensor
    sigmas: torch.Tensor
    steps: tuple[StepPlan, ...]
    final_denoise: bool

    def last_uses(self) -> dict[int, int]:
        """For each model output index, the last step that reads it (so older outputs can be freed); a
        corrector of step k runs at the start of step k + 1, once step k + 1's output is known."""
        last: dict[int, int] = {}
        for k, sp in enumerate(self.steps):
            refs = [j for j, _ in sp.predictor.outputs]
            if sp.corrector is not None:
                refs += [j for j, _ in sp.corrector.outputs]
            if sp.compensation is not None:
                refs += [j for j, _ in sp.compensation.outputs]
            for j in refs:
                last[j] = max(last.get(j, -1), k + 1)
        return last


def _combine(*terms: tuple[torch.Tensor | float, Weights]) -> Weights:
    """Linear combination of weight dicts: sum of coef * weights."""
    out: Weights = {}
    for coef, weights in terms:
        for j, w in weights.items():
            out[j] = out[j] + coef * w if j in out else coef * w
    return out


def _unit(j: int, like: torch.Tensor) -> Weights:
    return {j: torch.ones((), dtype=like.dtype)}


def _diff(a: int, b: int, scale: torch.Tensor) -> Weights:
    """(m_a - m_b) * scale."""
    return {a: scale, b: -scale}


def _first_order(k: int, t_next: int, prediction: str, lam, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(state coefficient, m_k coefficient, the exponential-integrator factor) of DDIM from tau_k to tau_next."""
    h = lam[t_next] - lam[k]
    if prediction == "data":
        phi1 = torch.expm1(-h)  # e^{-h} - 1
        return sigma[t_next] / sigma[k], -alpha[t_next] * phi1, phi1
    phi1 = torch.expm1(h)  # e^{h} - 1
    if float(sigma[t_next]) == 0.0:
        # onto the data: sigma_t (e^h - 1) -> alpha_t sigma_s / alpha_s (the limit, not 0 * inf)
        w = -(alpha[t_next] * sigma[k] / alpha[k] - sigma[t_next])
    else:
        w = -sigma[t_next] * phi1
    return alpha[t_next] / alpha[k], w, phi1


def dpm_update(k: int, order: int, prediction: str, lam, alpha, sigma) -> Update:
    """DPM-Solver++ (data) / DPM-Solver (noise) multistep update of the given order, diffusers' 'midpoint' form."""
    a, w0, phi1 = _first_order(k, k + 1, prediction, lam, alpha, sigma)
    weights: Weights = {k: w0}
    if order == 1:
        return Update(a, tuple(weights.items()), prediction)
    h = lam[k + 1] - lam[k]
    r0 = (lam[k] - lam[k - 1]) / h
    d1_0 = _diff(k, k - 1, 1.0 / r0)  # (m0 - m1) / r0
    # the term shared by both parameterisations is coef * m-combination, with scale = alpha_t (data) or sigma_t
    scale = alpha[k + 1] if prediction == "data" else sigma[k + 1]
    if order == 2:
        weights = _combine((1.0, weights), (-0.5 * scale * phi1, d1_0))
        return Update(a, tuple(weights.items()), prediction)
    r1 = (lam[k - 1] - lam[k - 2]) / h
    d1_1 = _diff(k - 1, k - 2, 1.0 / r1)
    d1 = _combine((1.0, d1_0), (r0 / (r0 + r1), d1_0), (-r0 / (r0 + r1), d1_1))
    d2 = _combine((1.0 / (r0 + r1), d1_0), (-1.0 / (r0 + r1), d1_1))
    if prediction == "data":
        c1 = scale * (phi1 / h + 1.0)
        c2 = -scale * ((phi1 + h) / h**2 - 0.5)
    else:
        c1 = -scale * (phi1 / h - 1.0)
        c2 = -scale * ((phi1 - h) / h**2 - 0.5)
    weights = _combine((1.0, weights), (c1, d1), (c2, d2))
    return Update(a, tuple(weights.items()), prediction)


def _unipc_system(k: int, nodes: Sequence[int], t_next: int, prediction: str, variant: str, lam):
    """UniPC's shared quantities: rks (relative node positions), the B(h) factor and the phi right-hand side."""
    h = lam[t_next] - lam[k]
    hh = -h if prediction == "data" else h
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rks = [(lam[j] - lam[k]) / h for j in nodes] + [torch.ones((), dtype=h.dtype)]
    rks_t = torch.stack(rks)
    n = len(rks)
    h_phi_k = torch.expm1(hh) / hh - 1.0
    factorial = 1
    rows, rhs = [], []
    for i in range(1, n + 1):
        rows.append(rks_t ** (i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return rks, b_h, torch.stack(rows), torch.stack(rhs)


def unip_update(k: int, order: int, prediction: str, variant: str, lam, alpha, sigma) -> Update:
    """UniPC's predictor UniP-p with B(h) = h (bh1) or e^h - 1 (bh2)."""
    a, w0, _ = _first_order(k, k + 1, prediction, lam, alpha, sigma)
    weights: Weights = {k: w0}
    if order == 1:
        return Update(a, tuple(weights.items()), prediction)
    nodes = [k - i for i in range(1, order)]
    rks, b_h, rows, rhs = _unipc_system(k, nodes, k + 1, prediction, variant, lam)
    if order == 2:
        rhos = [torch.full((), 0.5, dtype=b_h.dtype)]
    else:
        rhos = list(torch.linalg.solve(rows[:-1, :-1], rhs[:-1]))
    scale = alpha[k + 1] if prediction == "data" else sigma[k + 1]
    terms = [(1.0, weights)]
    for rho, j, rk in zip(rhos, nodes, rks):
        terms.append((-scale * b_h * rho, _diff(j, k, 1.0 / rk)))  # D1 = (m_j - m_k) / r_k
    return Update(a, tuple(_combine(*terms).items()), prediction)


def unic_update(k: int, order: int, prediction: str, variant: str, lam, alpha, sigma) -> Update:
    """UniPC's corrector UniC-p from tau_k to tau_{k+1}, using the new output m_{k+1} (no extra NFE)."""
    a, w0, _ = _first_order(k, k + 1, prediction, lam, alpha, sigma)
    nodes = [k - i for i in range(1, order)]
    rks, b_h, rows, rhs = _unipc_system(k, nodes, k + 1, prediction, variant, lam)
    if order == 1:
        rhos = [torch.full((), 0.5, dtype=b_h.dtype)]
    else:
        rhos = list(torch.linalg.solve(rows, rhs))
    scale = alpha[k + 1] if prediction == "data" else sigma[k + 1]
    terms = [(1.0, {k: w0})]
    for rho, j, rk in zip(rhos[:-1], nodes, rks):
        terms.append((-scale * b_h * rho, _diff(j, k, 1.0 / rk)))
    terms.append((-scale * b_h * rhos[-1], _diff(k + 1, k, torch.ones((), dtype=b_h.dtype))))
    return Update(a, tuple(_combine(*terms).items()), prediction)


def ipndm_update(k: int, order: int, prediction: str, lam, alpha, sigma) -> Update:
    """iPNDM: a fixed Adams-Bashforth combination of the last outputs, moved by one DDIM step."""
    a, w0, _ = _first_order(k, k + 1, prediction, lam, alpha, sigma)
    weights = {k - i: w0 * c for i, c in enumerate(IPNDM_WEIGHTS[order])}
    return Update(a, tuple(weights.items()), prediction)


def compensation(k: int, ratio: torch.Tensor, dc_order: int, times: torch.Tensor) -> Compensation:
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
    return Compensation(k, tuple(weights))


def make_plan(
    schedule: Schedule,
    noise: NoiseSchedule,
    times: torch.Tensor | None = None,
    ratios: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Plan:
    """Precompute every coefficient of ``schedule`` on ``noise``.

    ``times`` (tau_0..tau_N) and ``ratios`` (one per step) override the schedule's values with tensors,
    typically ones that require grad: the plan is then differentiable in them.
    """
    if times is None:
        times = torch.tensor(schedule.times, dtype=dtype)
    if ratios is None:
        ratios = torch.tensor([s.ratio for s in schedule.steps], dtype=dtype)
    log_alpha = noise.log_alpha(times)
    alpha = torch.exp(log_alpha)
    sigma = noise.sigma(times)
    lam = log_alpha - torch.log(sigma)  # +inf where sigma = 0 (t = 0)
    steps = []
    for k, step in enumerate(schedule.steps):
        if step.solver == "dpm":
            pred = dpm_update(k, step.order, step.prediction, lam, alpha, sigma)
        elif step.solver == "ipndm":
            pred = ipndm_update(k, step.order, step.prediction, lam, alpha, sigma)
        else:
            pred = unip_update(k, step.order, step.prediction, step.solver[-3:], lam, alpha, sigma)
        corr = None
        if step.corrector != "none":
            corr = unic_update(k, step.corrector_order, step.prediction, step.corrector, lam, alpha, sigma)
        comp = None
        # the override tensor decides (not the schedule's own ratio): a fitted ratio passed as a plain tensor
        # must apply; a tensor that requires grad always gets the compensation so its gradient exists
        if k >= schedule.dc_order and (ratios.requires_grad or float(ratios[k]) != 1.0):
            comp = compensation(k, ratios[k], schedule.dc_order, times)
        steps.append(StepPlan(pred, corr, comp))
    return Plan(times, alpha, sigma, tuple(steps), schedule.final_denoise)
