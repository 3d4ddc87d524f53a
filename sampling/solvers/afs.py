"""USF's analytic first step (AFS): at t = T the state is almost pure noise, so the first model call is replaced
by its analytic estimate: x0 = the data's mean (the step's ``data_mean``, per channel; USF takes 0, which is the
mean of centred data) and eps = (x - alpha_T x0) / sigma_T, and the step is DDIM with it. It saves one model call;
later multistep steps use it as the output at tau_0."""

from __future__ import annotations

from autotune.sampling.program import Analytic, Instruction
from autotune.sampling.solvers.base import PlanContext, ddim
from autotune.space.schedule import Step


def first_call(k: int, step: Step, ctx: PlanContext) -> list[Instruction]:
    return [Analytic(k, "x", ctx.alpha[k], ctx.sigma[k], step.data_mean)]


def advance(k: int, step: Step, ctx: PlanContext) -> list[Instruction]:
    return [ddim(k, step.prediction, ctx).to()]
