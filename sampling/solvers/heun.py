"""EDM's Heun step (Karras et al. 2022, Alg. 1 without churn): Euler to tau_{k+1}, a second model call there, then
the trapezoid of the two slopes. It runs in the variance-exploding variable s = sigma / alpha, where the ODE is
dx/ds = eps(x); our state is the VP one, x = alpha x_VE, so every coefficient below carries that scaling. The
same update in either parameterisation: with data prediction the slope is (x_VE - x0) / s, which is eps.
Order 2 makes two calls; order 1 (and any step onto t = 0, where the slope at s = 0 is undefined) is Euler, which
in this variable is DDIM.
"""

from __future__ import annotations

from autotune.sampling.program import Instruction
from autotune.sampling.solvers.base import PlanContext, Update, ddim
from autotune.space.schedule import Step

MIDPOINT = "heun"  # the register holding the Euler prediction the second call evaluates


def heun_update(k: int, prediction: str, ctx: PlanContext) -> Update:
    """The trapezoid step from tau_k to tau_{k+1}, with the outputs at tau_k (slot k) and at the Euler
    prediction (slot (k, 1))."""
    alpha, sigma = ctx.alpha, ctx.sigma
    s, s_next = sigma[k] / alpha[k], sigma[k + 1] / alpha[k + 1]
    ds = s_next - s
    scale = alpha[k + 1]
    if prediction == "noise":  # x_VE' = x_VE + ds / 2 (eps_a + eps_b)
        outputs = ((k, scale * ds / 2), ((k, 1), scale * ds / 2))
        return Update(alpha[k + 1] / alpha[k], outputs, prediction)
    # slopes (x_VE - m_a) / s and (y_VE - m_b) / s' with y_VE the Euler prediction: linear in x_VE, m_a, m_b
    outputs = ((k, scale * ds / 2 * (1.0 / s_next - 2.0 / s)), ((k, 1), -scale * ds / (2 * s_next)))
    return Update(sigma[k + 1] / sigma[k], outputs, prediction)


def advance(k: int, step: Step, ctx: PlanContext) -> list[Instruction]:
    euler = ddim(k, step.prediction, ctx)
    if step.order == 1:
        return [euler.to()]
    return [euler.to(MIDPOINT), ctx.call(k + 1, slot=(k, 1), at=MIDPOINT, skip=frozenset(step.skip)),
            heun_update(k, step.prediction, ctx).to()]
