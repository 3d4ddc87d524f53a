"""iPNDM (Zhang & Chen 2023): a fixed Adams-Bashforth combination of the last outputs, moved by one DDIM step."""

from __future__ import annotations

from autotune.sampling.solvers.base import PlanContext, Update, first_order
from autotune.space.schedule import Step

IPNDM_WEIGHTS = {
    1: (1.0,),
    2: (1.5, -0.5),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def advance(k: int, step: Step, ctx: PlanContext) -> list:
    a, w0, _ = first_order(k, k + 1, step.prediction, ctx)
    weights = tuple((k - i, w0 * c) for i, c in enumerate(IPNDM_WEIGHTS[step.order]))
    return [Update(a, weights, step.prediction).to()]
