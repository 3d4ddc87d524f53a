"""What every solver module builds on: the plan context and the linear-update algebra.

An update is ``x_new = a * x + sum_j w_j * m_j (+ c * z)``: exponential integrators (DPM-Solver, UniPC, DEIS,
iPNDM), Heun's method and the SDE solvers are all linear in the states and the stored model outputs, with weights
that depend only on the noise schedule at the schedule's times. Weights are torch tensors, so a plan is
differentiable in the times and ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autotune.sampling.program import Call, Combine, Slot
from autotune.space.schedule import Schedule

Weights = dict[Slot, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """``state * x + sum(w * m[j] for j, w in outputs) + noise * z``, m in the ``prediction`` space."""

    state: torch.Tensor | None
    outputs: tuple[tuple[Slot, torch.Tensor], ...]
    prediction: str
    noise: torch.Tensor | None = None

    def to(self, dst: str = "x", src: str = "x") -> Combine:
        """The instruction writing this update of register ``src`` into ``dst``."""
        return Combine(dst, src, self.state, self.outputs, self.prediction, self.noise)


@dataclass(frozen=True)
class PlanContext:
    """The schedule and its noise schedule at tau_0..tau_N: what a solver's coefficients are functions of."""

    schedule: Schedule
    times: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    lam: torch.Tensor  # log(alpha / sigma); +inf where sigma = 0

    def call(self, k: int, slot: Slot | None = None, at: str = "x", skip: frozenset[str] = frozenset()) -> Call:
        """The model call at tau_k on register ``at`` (slot k unless given)."""
        return Call(k if slot is None else slot, at, self.times[k], self.alpha[k], self.sigma[k], skip)


def combine(*terms: tuple[torch.Tensor | float, Weights]) -> Weights:
    """Linear combination of weight dicts: sum of coef * weights."""
    out: Weights = {}
    for coef, weights in terms:
        for j, w in weights.items():
            out[j] = out[j] + coef * w if j in out else coef * w
    return out


def diff(a: Slot, b: Slot, scale: torch.Tensor | float) -> Weights:
    """(m_a - m_b) * scale."""
    return {a: scale, b: -scale}


def first_order(s: int, t: int, prediction: str, ctx: PlanContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(state coefficient, m_s coefficient, the exponential-integrator factor) of DDIM from tau_s to tau_t."""
    lam, alpha, sigma = ctx.lam, ctx.alpha, ctx.sigma
    h = lam[t] - lam[s]
    if prediction == "data":
        phi1 = torch.expm1(-h)  # e^{-h} - 1
        return sigma[t] / sigma[s], -alpha[t] * phi1, phi1
    phi1 = torch.expm1(h)  # e^{h} - 1
    if float(sigma[t].detach()) == 0.0:
        # onto the data: sigma_t (e^h - 1) -> alpha_t sigma_s / alpha_s (the limit, not 0 * inf)
        w = -(alpha[t] * sigma[s] / alpha[s] - sigma[t])
    else:
        w = -sigma[t] * phi1
    return alpha[t] / alpha[s], w, phi1


def ddim(k: int, prediction: str, ctx: PlanContext) -> Update:
    """The first-order step from tau_k to tau_{k+1} with the output at tau_k."""
    a, w0, _ = first_order(k, k + 1, prediction, ctx)
    return Update(a, ((k, w0),), prediction)
