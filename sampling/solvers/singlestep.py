"""DPM-Solver++ 2S on the grid (Lu et al. 2022, singlestep, as diffusers' DPMSolverSinglestepScheduler runs it):
an order-2 step at k restarts from the state at tau_{k-1} and spans [tau_{k-1}, tau_{k+1}], with the model outputs
at tau_{k-1} and at tau_k, the intermediate point the previous step reached. It reads an older state instead of
older outputs only, which is what makes it singlestep: the step before it only places the intermediate point.
Order 1 is DDIM.
"""

from __future__ import annotations

from autotune.sampling.program import Instruction, state_register
from autotune.sampling.solvers.base import PlanContext, Update, ddim, first_order
from autotune.space.schedule import Step


def singlestep_update(k: int, prediction: str, ctx: PlanContext) -> Update:
    """From x at tau_{k-1} to tau_{k+1}: D0 = m_{k-1}, D1 = (m_k - m_{k-1}) / r0, r0 = h0 / h (diffusers' midpoint
    form of the second-order singlestep update)."""
    lam = ctx.lam
    a, w0, phi1 = first_order(k - 1, k + 1, prediction, ctx)
    h = lam[k + 1] - lam[k - 1]
    r0 = (lam[k] - lam[k - 1]) / h
    scale = ctx.alpha[k + 1] if prediction == "data" else ctx.sigma[k + 1]
    d1 = -0.5 * scale * phi1 / r0  # the D1 term's coefficient, same sign convention as dpm's order 2
    return Update(a, ((k - 1, w0 - d1), (k, d1)), prediction)


def advance(k: int, step: Step, ctx: PlanContext) -> list[Instruction]:
    if step.order == 1:
        return [ddim(k, step.prediction, ctx).to()]
    return [singlestep_update(k, step.prediction, ctx).to("x", state_register(k - 1))]
