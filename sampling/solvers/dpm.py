"""DPM-Solver++ (data prediction) / DPM-Solver (noise prediction), multistep, orders 1-3, in diffusers'
'midpoint' form (Lu et al. 2022)."""

from __future__ import annotations

from autotune.sampling.solvers.base import PlanContext, Update, Weights, combine, diff, first_order
from autotune.space.schedule import Step


def dpm_update(k: int, order: int, prediction: str, ctx: PlanContext) -> Update:
    """The multistep update of ``order`` from tau_k to tau_{k+1}, from the outputs at tau_k, tau_{k-1}, ..."""
    a, w0, phi1 = first_order(k, k + 1, prediction, ctx)
    weights: Weights = {k: w0}
    if order == 1:
        return Update(a, tuple(weights.items()), prediction)
    lam = ctx.lam
    h = lam[k + 1] - lam[k]
    r0 = (lam[k] - lam[k - 1]) / h
    d1_0 = diff(k, k - 1, 1.0 / r0)  # (m0 - m1) / r0
    # the term shared by both parameterisations is coef * m-combination, with scale = alpha_t (data) or sigma_t
    scale = ctx.alpha[k + 1] if prediction == "data" else ctx.sigma[k + 1]
    if order == 2:
        weights = combine((1.0, weights), (-0.5 * scale * phi1, d1_0))
        return Update(a, tuple(weights.items()), prediction)
    r1 = (lam[k - 1] - lam[k - 2]) / h
    d1_1 = diff(k - 1, k - 2, 1.0 / r1)
    d1 = combine((1.0, d1_0), (r0 / (r0 + r1), d1_0), (-r0 / (r0 + r1), d1_1))
    d2 = combine((1.0 / (r0 + r1), d1_0), (-1.0 / (r0 + r1), d1_1))
    if prediction == "data":
        c1 = scale * (phi1 / h + 1.0)
        c2 = -scale * ((phi1 + h) / h**2 - 0.5)
    else:
        c1 = -scale * (phi1 / h - 1.0)
        c2 = -scale * ((phi1 - h) / h**2 - 0.5)
    weights = combine((1.0, weights), (c1, d1), (c2, d2))
    return Update(a, tuple(weights.items()), prediction)


def advance(k: int, step: Step, ctx: PlanContext) -> list:
    return [dpm_update(k, step.order, step.prediction, ctx).to()]
