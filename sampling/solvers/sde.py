"""DPM-Solver++ 2M SDE (Lu et al. 2022, the SDE variant of DPM-Solver++ that diffusers runs as
``algorithm_type="sde-dpmsolver++"``): the data-prediction multistep update of the reverse SDE, whose exact
linear part keeps e^{-h} of the state's noise and adds fresh noise sigma_t sqrt(1 - e^{-2h}) z. Order 1 is the
SDE's DDIM (eta = 1); order 2 adds the midpoint D1 term. Data prediction only: the noise form of the SDE solver is
a different method.
"""

from __future__ import annotations

import torch

from autotune.sampling.program import Instruction
from autotune.sampling.solvers.base import PlanContext, Update
from autotune.space.schedule import Step


def sde_update(k: int, order: int, ctx: PlanContext) -> Update:
    lam, alpha, sigma = ctx.lam, ctx.alpha, ctx.sigma
    h = lam[k + 1] - lam[k]
    decay = torch.exp(-h)  # 0 onto the data (h = inf)
    spread = -torch.expm1(-2.0 * h)  # 1 - e^{-2h}
    state = sigma[k + 1] / sigma[k] * decay
    w0 = alpha[k + 1] * spread
    noise = sigma[k + 1] * torch.sqrt(spread)
    if order == 1:
        return Update(state, ((k, w0),), "data", noise)
    r0 = (lam[k] - lam[k - 1]) / h
    d1 = 0.5 * alpha[k + 1] * spread / r0  # 0.5 alpha_t (1 - e^{-2h}) D1, D1 = (m_k - m_{k-1}) / r0
    return Update(state, ((k, w0 + d1), (k - 1, -d1)), "data", noise)


def advance(k: int, step: Step, ctx: PlanContext) -> list[Instruction]:
    return [sde_update(k, step.order, ctx).to()]
