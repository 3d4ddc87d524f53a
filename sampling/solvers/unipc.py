"""UniPC (Zhao et al. 2023): the predictor UniP-p with B(h) = h (bh1) or e^h - 1 (bh2), and the corrector UniC-p
that reuses the next step's model output (no extra call). The corrector is a per-step choice of the schedule
(``Step.corrector``) on top of any predictor; ``coefficients.make_plan`` applies it."""

from __future__ import annotations

from typing import Sequence

import torch

from autotune.sampling.solvers.base import PlanContext, Update, combine, diff, first_order
from autotune.space.schedule import Step


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


def unip_update(k: int, order: int, prediction: str, variant: str, ctx: PlanContext) -> Update:
    """UniP-p from tau_k to tau_{k+1}."""
    a, w0, _ = first_order(k, k + 1, prediction, ctx)
    weights = {k: w0}
    if order == 1:
        return Update(a, tuple(weights.items()), prediction)
    nodes = [k - i for i in range(1, order)]
    rks, b_h, rows, rhs = _unipc_system(k, nodes, k + 1, prediction, variant, ctx.lam)
    if order == 2:
        rhos = [torch.full((), 0.5, dtype=b_h.dtype)]
    else:
        rhos = list(torch.linalg.solve(rows[:-1, :-1], rhs[:-1]))
    scale = ctx.alpha[k + 1] if prediction == "data" else ctx.sigma[k + 1]
    terms = [(1.0, weights)]
    for rho, j, rk in zip(rhos, nodes, rks):
        terms.append((-scale * b_h * rho, diff(j, k, 1.0 / rk)))  # D1 = (m_j - m_k) / r_k
    return Update(a, tuple(combine(*terms).items()), prediction)


def unic_update(k: int, order: int, prediction: str, variant: str, ctx: PlanContext) -> Update:
    """UniC-p of the step from tau_k to tau_{k+1}, using the new output m_{k+1}."""
    a, w0, _ = first_order(k, k + 1, prediction, ctx)
    nodes = [k - i for i in range(1, order)]
    rks, b_h, rows, rhs = _unipc_system(k, nodes, k + 1, prediction, variant, ctx.lam)
    if order == 1:
        rhos = [torch.full((), 0.5, dtype=b_h.dtype)]
    else:
        rhos = list(torch.linalg.solve(rows, rhs))
    scale = ctx.alpha[k + 1] if prediction == "data" else ctx.sigma[k + 1]
    terms = [(1.0, {k: w0})]
    for rho, j, rk in zip(rhos[:-1], nodes, rks):
        terms.append((-scale * b_h * rho, diff(j, k, 1.0 / rk)))
    terms.append((-scale * b_h * rhos[-1], diff(k + 1, k, torch.ones((), dtype=b_h.dtype))))
    return Update(a, tuple(combine(*terms).items()), prediction)


def advance(k: int, step: Step, ctx: PlanContext) -> list:
    return [unip_update(k, step.order, step.prediction, step.solver[-3:], ctx).to()]
