"""The executor: the one loop that runs any schedule on any denoiser.

Every per-step decision is a Python constant taken from the schedule's precomputed plan, and no branch
looks at a tensor's value inside the loop, so the same loop traces and exports (issue 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from autotune.errors import SamplingError
from autotune.sampling.coefficients import Plan, Update, make_plan
from autotune.sampling.denoiser import Denoiser, to_data_and_noise
from autotune.space.schedule import Schedule


@dataclass
class SampleResult:
    """Final samples, the model calls actually made, and (on request) the state at every visited time."""

    sample: torch.Tensor
    nfe: int
    states: list[torch.Tensor] = field(default_factory=list)
    diverged_at: int | None = None  # first step whose new state had a NaN or inf (check_finite=True)


def _apply(update: Update, x: torch.Tensor, hist: dict[str, dict[int, torch.Tensor]], dtype: torch.dtype):
    out = update.state.to(dtype) * x
    outputs = hist[update.prediction]
    for j, w in update.outputs:
        out = out + w.to(dtype) * outputs[j]
    return out


def check_inputs(model: Denoiser, schedule: Schedule, noise: torch.Tensor) -> None:
    """Refuse what would otherwise come out as NaN or garbage samples without an error: noise that is not
    a finite floating-point batch, a schedule starting beyond the model's noise schedule.

    Raises:
        SamplingError: naming what is wrong.
    """
    if not noise.is_floating_point():
        raise SamplingError(f"noise: expected a floating-point tensor, got {noise.dtype}")
    if noise.ndim < 1 or noise.shape[0] == 0:
        raise SamplingError(f"noise: expected a batch of at least one sample, got shape {tuple(noise.shape)}")
    t_max = float(model.noise.T)
    if schedule.t_start > t_max * (1 + 1e-9):
        raise SamplingError(f"schedule: t_start {schedule.t_start:g} is beyond the model's noise schedule "
                            f"(t in [0, {t_max:g}])")
    if not torch.jit.is_tracing() and not bool(torch.isfinite(noise.detach()).all()):
        raise SamplingError("noise: holds NaN or infinite values")


def sample(
    model: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    cond: Any = None,
    *,
    dtype: torch.dtype | None = None,
    differentiable: bool = False,
    times: torch.Tensor | None = None,
    ratios: torch.Tensor | None = None,
    keep_states: bool = False,
    check_finite: bool = False,
    plan: Plan | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    start: torch.Tensor | None = None,
) -> SampleResult:
    """Run ``schedule`` on ``model`` from the initial noise (a standard normal draw), or from ``start``.

    Args:
        model: any Denoiser.
        schedule: the schedule; its guidance scale is handed to the model.
        noise: standard normal noise, shape (batch, ...); it is scaled by the noise schedule's prior std.
        cond: conditioning for the model (class labels, prompt embeddings), or None.
        dtype: float32 or float64 for the state (default: the noise's dtype).
        differentiable: run with autograd on (for fitting ratios or times by gradient); default no_grad.
        times, ratios: tensors overriding the schedule's times (tau_0..tau_N) and ratios, e.g. ones that
            require grad.
        keep_states: also return the state at every visited time (after correction).
        check_finite: record the first step whose state is not finite (costs one sync per step).
        callback: ``callback(k, x)`` after each step, outside any traced region.
        start: the state at the schedule's ``t_start`` instead of ``noise`` x the prior std: for image-to-image,
            an image noised to t_start (``sampling.noise.noised``); ``noise`` then only gives the batch checks.

    Returns:
        SampleResult with ``nfe`` counted from the model calls actually made.

    Example:
        >>> from autotune.sampling.noise import VPLinear
        >>> from autotune.sampling.denoiser import TorchDenoiser
        >>> from autotune.sampling.named import build
        >>> ns = VPLinear()
        >>> model = TorchDenoiser(lambda x, t: 0.0 * x, ns, "epsilon")
        >>> sample(model, build("dpmsolver++2m", ns, 5), torch.randn(4, 2)).nfe
        5
    """
    check_inputs(model, schedule, noise)
    dtype = dtype or noise.dtype
    if plan is None:
        plan = make_plan(schedule, model.noise, times=times, ratios=ratios)
    spaces = sorted({sp.predictor.prediction for sp in plan.steps})
    last_use = plan.last_uses()
    alphas = plan.alphas.to(dtype)
    sigmas = plan.sigmas.to(dtype)
    grad_ctx = torch.enable_grad() if differentiable else torch.no_grad()
    nfe = 0
    diverged_at = None
    with grad_ctx:
        x = noise.to(dtype) * model.noise.init_scale() if start is None else start.to(dtype)
        states = [x] if keep_states else []
        hist: dict[str, dict[int, torch.Tensor]] = {p: {} for p in spaces}
        x_prev = x
        for k, (step, sp) in enumerate(zip(schedule.steps, plan.steps)):
            out = model(x, plan.times[k], cond, skip=frozenset(step.skip), guidance=schedule.guidance).to(dtype)
            nfe += 1
            x0, eps = to_data_and_noise(out, x, alphas[k], sigmas[k], model.parameterization)
            for p in spaces:
                hist[p][k] = x0 if p == "data" else eps
            if k > 0 and plan.steps[k - 1].corrector is not None:
                x = _apply(plan.steps[k - 1].corrector, x_prev, hist, dtype)
                if keep_states:
                    states[-1] = x
            if sp.compensation is not None:
                for p in spaces:
                    comp = torch.zeros_like(hist[p][k])
                    for j, w in sp.compensation.outputs:
                        comp = comp + w.to(dtype) * hist[p][j]
                    hist[p][k] = comp
            for j in [j for j in hist[spaces[0]] if last_use.get(j, -1) < k]:
                for p in spaces:
                    del hist[p][j]
            x_prev = x
            x = _apply(sp.predictor, x, hist, dtype)
            if keep_states:
                states.append(x)
            if check_finite and diverged_at is None and not bool(torch.isfinite(x).all()):
                diverged_at = k
            if callback is not None:
                callback(k, x)
        if plan.final_denoise:
            n = len(schedule.steps)
            out = model(x, plan.times[n], cond, guidance=schedule.guidance).to(dtype)
            nfe += 1
            x, _ = to_data_and_noise(out, x, alphas[n], sigmas[n], model.parameterization)
            if keep_states:
                states[-1] = x
    return SampleResult(x, nfe, states, diverged_at)
