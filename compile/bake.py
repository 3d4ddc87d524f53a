"""Bake a schedule and a model into one module whose forward runs the whole sampling loop.

The loop is unrolled in Python: every per-step decision (the network's time, the skip mask, every
predictor / corrector / compensation weight, alpha and sigma of the conversions, the guidance scale)
is a Python constant taken from ``sampling.coefficients.make_plan`` at bake time, so a trace of
``forward`` (ONNX export, ``torch.export``) records one flat graph and nothing can drift from
``sampling.executor.sample``: both drive the same interpreter (``sampling.program.run``) over the same plan,
the executor with tensor weights, the baker with floats.

A step with a skip mask calls the model with those units bypassed (``sampling.denoiser.skipping``);
traced, that call is the pruned network variant of the step, built from the same parameters (the
exported graph holds each weight once, whatever the number of steps and variants). A step that reuses
units takes their outputs from the run's feature cache (``sampling.denoiser.caching``), a dict of tensors
made per forward: traced, the cached features are edges from the call that computed them to the calls that
reuse them, so the unrolled graph carries them between steps with no Python in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autotune.errors import BackendError
from autotune.sampling.coefficients import make_plan
from autotune.sampling.denoiser import Denoiser, FeatureCache, call_model
from autotune.sampling.program import Call, Plan, run
from autotune.space.schedule import Schedule


@dataclass(frozen=True)
class Program:
    """The whole loop as data: the schedule's plan with every weight a Python float (what ``BakedSampler.forward``
    interprets, and what the manifest describes), and the guidance scale handed to every model call."""

    plan: Plan
    guidance: float | None

    @property
    def nfe(self) -> int:
        return len(self.plan.calls)

    @property
    def noise_draws(self) -> int:
        return self.plan.noise_draws


def bake_program(schedule: Schedule, model: Denoiser, dtype: torch.dtype = torch.float32) -> Program:
    """Every constant of the run of ``schedule`` on ``model``, from ``make_plan`` (the one formula place): each
    weight as the Python float the executor effectively uses (cast to the state dtype first), each model time a
    float64 0-d tensor as the executor hands it over (folded into a constant when traced)."""
    schedule.check_units(model.units)
    plan = make_plan(schedule, model.noise).map_weights(
        lambda w: float(w.detach().to(dtype)), lambda t: torch.tensor(float(t), dtype=torch.float64))
    return Program(plan, schedule.guidance)


def condition_of_inputs(model: Denoiser, conditions: tuple[torch.Tensor, ...]) -> Any:
    """The model's ``cond`` from the engine inputs after the noise, in ``engine_io`` order: one tensor (labels,
    prompt embeddings) as it is, several (SDXL) through the model's ``engine_condition``."""
    if hasattr(model, "engine_condition"):
        names = [name for name, _ in model.engine_condition_inputs()]
        return model.engine_condition(dict(zip(names, conditions)))
    return conditions[0] if conditions else None


class BakedSampler(nn.Module):
    """``forward(noise[, *conditions]) -> sample``: the schedule's whole loop on the model, unrolled.

    Args:
        model: a Denoiser whose network is a torch module (``model.module``), e.g. ``digits`` or a
            diffusers pipeline directory.
        schedule: the schedule; its guidance scale is baked in as a constant.
        dtype: the state's dtype (the noise input's dtype); float32 for engines.
        autocast: run the network calls under ``torch.autocast`` in this dtype (float16 / bfloat16),
            keeping the state and the solver arithmetic in ``dtype``; None: the network runs in its own dtype.

    Example:
        >>> from autotune.models.registry import load_model       # doctest: +SKIP
        >>> from autotune.sampling.named import build             # doctest: +SKIP
        >>> m = load_model("digits")                               # doctest: +SKIP
        >>> baked = BakedSampler(m, build("dpmsolver++2m", m.noise, 5))   # doctest: +SKIP
        >>> baked(torch.randn(2, 1, 16, 16), torch.tensor([3, 7])).shape  # doctest: +SKIP
        torch.Size([2, 1, 16, 16])
    """

    def __init__(self, model: Denoiser, schedule: Schedule, dtype: torch.dtype = torch.float32,
                 autocast: torch.dtype | None = None) -> None:
        super().__init__()
        module = getattr(model, "module", None)
        if not isinstance(module, nn.Module):
            raise BackendError(f"bake: the model ({type(model).__name__}) has no torch network to bake "
                               "(only models with a torch module compile)")
        self.network = module  # registered so .to(device) and exports see the (shared) weights once
        self.model = model
        self.schedule = schedule
        self.dtype = dtype
        self.autocast = autocast
        self.program = bake_program(schedule, model, dtype)

    def _call(self, ins: Call, x: torch.Tensor, cond: Any, features: FeatureCache) -> torch.Tensor:
        t = ins.time.to(x.device)
        if self.autocast is None:
            out = call_model(self.model, ins, x, t, cond, self.program.guidance, features)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast):
                out = call_model(self.model, ins, x, t, cond, self.program.guidance, features)
        return out.to(self.dtype)

    def forward(self, noise: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """The samples from ``noise`` and the engine's inputs after it, in ``engine_io`` order: the condition
        inputs, then (stochastic schedules only) ``step_noise``, the fresh draws, shape (batch, draws, ...)."""
        plan = self.program.plan
        draws = None
        if plan.noise_draws:
            *inputs, step_noise = inputs
            draws = iter(step_noise.unbind(1))
        cond = condition_of_inputs(self.model, tuple(inputs))
        x = noise.to(self.dtype) * plan.init_scale
        features = FeatureCache()  # this run's feature cache (units reused by later calls)
        return run(plan, x, self.model.parameterization, lambda ins, state: self._call(ins, state, cond, features),
                   draw=None if draws is None else (lambda like: next(draws).to(self.dtype)))
