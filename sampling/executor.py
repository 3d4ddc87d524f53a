"""The executor: runs any schedule on any denoiser, eagerly on tensors.

It builds the schedule's plan (``coefficients.make_plan``) and drives the one interpreter
(``sampling.program.run``) with the model; every per-step decision is a Python constant of the plan and no branch
looks at a tensor's value, so the same run traces and exports (the baker drives the same interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from autotune.errors import SamplingError
from autotune.sampling.coefficients import make_plan
from autotune.sampling.denoiser import Denoiser, FeatureCache, call_model
from autotune.sampling.program import Call, Mark, Plan, run
from autotune.space.schedule import Schedule


@dataclass
class SampleResult:
    """Final samples, the model calls actually made, and (on request) the state at every visited time."""

    sample: torch.Tensor
    nfe: int
    states: list[torch.Tensor] = field(default_factory=list)
    diverged_at: int | None = None  # first step whose new state had a NaN or inf (check_finite=True)


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
    shifts: torch.Tensor | None = None,
    data_scales: torch.Tensor | None = None,
    keep_states: bool = False,
    check_finite: bool = False,
    plan: Plan | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    step_noise: torch.Tensor | None = None,
) -> SampleResult:
    """Run ``schedule`` on ``model`` from the initial noise (a standard normal draw), or from ``start``.

    Args:
        model: any Denoiser.
        schedule: the schedule; its guidance scale is handed to the model.
        noise: standard normal noise, shape (batch, ...); it is scaled by the noise schedule's prior std.
        cond: conditioning for the model (class labels, prompt embeddings), or None.
        dtype: float32 or float64 for the state (default: the noise's dtype).
        differentiable: run with autograd on (for fitting ratios or times by gradient); default no_grad.
        times, ratios, shifts, data_scales: tensors overriding the schedule's times (tau_0..tau_N) and its
            per-step ratios, shifts and data scales, e.g. ones that require grad.
        keep_states: also return the state at every visited time (after correction).
        check_finite: record the first step whose state is not finite (costs one sync per step).
        callback: ``callback(k, x)`` after each step, outside any traced region.
        start: the state at the schedule's ``t_start`` instead of ``noise`` x the prior std: for image-to-image,
            an image noised to t_start (``sampling.noise.noised``); ``noise`` then only gives the batch checks.
        generator, step_noise: for a stochastic schedule (an SDE solver), where its fresh noise comes from:
            ``torch.randn`` on ``generator``, or the given draws, shape (batch, draws, *sample shape),
            batch first as an engine's inputs are.

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
        plan = make_plan(schedule, model.noise, times=times, ratios=ratios, shifts=shifts, data_scales=data_scales)
    plan = plan.map_weights(lambda w: w.to(dtype))
    draw = _noise_source(plan, step_noise, generator)
    grad_ctx = torch.enable_grad() if differentiable else torch.no_grad()
    nfe = 0
    states: list[torch.Tensor] = []
    diverged_at = None
    features = FeatureCache()  # the run's feature cache: unit -> its output at the last call that ran it

    def call(ins: Call, x: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return call_model(model, ins, x, ins.time, cond, schedule.guidance, features).to(dtype)

    def mark(ins: Mark, x: torch.Tensor) -> None:
        nonlocal diverged_at
        if keep_states:
            states[ins.index:] = [x]
        if ins.end_of_step:
            if check_finite and diverged_at is None and not bool(torch.isfinite(x).all()):
                diverged_at = ins.index - 1
            if callback is not None:
                callback(ins.index - 1, x)

    with grad_ctx:
        x = noise.to(dtype) * plan.init_scale if start is None else start.to(dtype)
        if keep_states:
            states.append(x)
        x = run(plan, x, model.parameterization, call, mark, draw)
    return SampleResult(x, nfe, states, diverged_at)


# Scoring runs hundreds of samples through small networks, whose per-sample CPU throughput falls at large batches
# (the activations leave the caches): on digits, 1024 noises in slices of 256 ran 1.6x faster than one batch on
# one torch thread and 1.22x on two (bench/ref_chunks.py), so the evaluator samples in slices of this many.
EVAL_CHUNK = 256


def sample_in_chunks(model: Denoiser, schedule: Schedule, noise: torch.Tensor, cond: Any = None, *,
                     chunk: int = EVAL_CHUNK, start: torch.Tensor | None = None,
                     step_noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     **kwargs: Any) -> SampleResult:
    """``sample`` over consecutive slices of at most ``chunk`` samples, joined: the same samples, states and
    divergence record as one call (each sample's trajectory depends on its own noise only).

    A stochastic schedule drawing on ``generator`` runs as one batch: its draws are taken for the whole batch
    step by step (diffusers' order), so slicing would change them. ``callback`` hears every slice's steps."""
    size = noise.shape[0]
    if size <= chunk or (schedule.stochastic and step_noise is None):
        return sample(model, schedule, noise, cond, start=start, step_noise=step_noise, generator=generator,
                      **kwargs)
    if kwargs.get("plan") is None:  # one plan for every slice: its coefficients depend on the schedule only
        kwargs["plan"] = make_plan(schedule, model.noise, times=kwargs.get("times"), ratios=kwargs.get("ratios"),
                                   shifts=kwargs.get("shifts"), data_scales=kwargs.get("data_scales"))
    parts = []
    for lo in range(0, size, chunk):
        part = slice(lo, lo + chunk)
        parts.append(sample(model, schedule, noise[part], None if cond is None else cond[part],
                            start=None if start is None else start[part],
                            step_noise=None if step_noise is None else step_noise[part], **kwargs))
    return join_results(parts)


def join_results(parts: list[SampleResult]) -> SampleResult:
    """Results of one schedule on consecutive slices of a batch, as one result (samples and states joined in
    order, the earliest divergence)."""
    diverged = [p.diverged_at for p in parts if p.diverged_at is not None]
    states = [torch.cat(s) for s in zip(*(p.states for p in parts))]
    return SampleResult(torch.cat([p.sample for p in parts]), parts[0].nfe, states,
                        min(diverged) if diverged else None)


def _noise_source(plan: Plan, step_noise: torch.Tensor | None, generator: torch.Generator | None):
    """Where a stochastic plan's fresh draws come from: ``step_noise[:, i]`` for the i-th draw when given (as an
    engine takes them), else ``torch.randn`` on ``generator`` (the order diffusers' SDE schedulers draw in)."""
    if plan.noise_draws == 0:
        return None
    if step_noise is not None:
        if step_noise.ndim < 2 or step_noise.shape[1] != plan.noise_draws:
            raise SamplingError(f"step_noise: the schedule draws noise {plan.noise_draws} times; expected shape "
                                f"(batch, {plan.noise_draws}, ...), got {tuple(step_noise.shape)}")
        draws = iter(step_noise.unbind(1))
        return lambda like: next(draws).to(like.dtype)
    return lambda like: torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
