"""Bake a schedule and a model into one module whose forward runs the whole sampling loop.

The loop is unrolled in Python: every per-step decision (the network's time, the skip mask, every
predictor / corrector / compensation weight, alpha and sigma of the conversions, the guidance scale)
is a Python constant taken from ``sampling.coefficients.make_plan`` at bake time, so a trace of
``forward`` (ONNX export, ``torch.export``) records one flat graph and nothing can drift from
``sampling.executor.sample``: the step below mirrors it line for line, on floats instead of tensors.

A step with a skip mask calls the model with those units bypassed (``sampling.denoiser.skipping``);
traced, that call is the pruned network variant of the step, built from the same parameters (the
exported graph holds each weight once, whatever the number of steps and variants).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autotune.errors import BackendError
from autotune.sampling.coefficients import Update, make_plan
from autotune.sampling.denoiser import Denoiser, to_data_and_noise
from autotune.space.schedule import Schedule


@dataclass(frozen=True)
class LinearUpdate:
    """``x_new = state * x + sum(w * m[j])`` with Python-float weights (a baked ``coefficients.Update``)."""

    state: float
    outputs: tuple[tuple[int, float], ...]
    prediction: str


@dataclass(frozen=True)
class BakedStep:
    """One unrolled step: the model call at ``time`` (with ``skip``), then corrector, compensation, predictor."""

    time: float  # tau_k in the noise schedule's continuous time (float64 value)
    alpha: float
    sigma: float
    skip: frozenset[str]
    predictor: LinearUpdate
    corrector: LinearUpdate | None  # of the previous step, applied once this step's output is known
    compensation: tuple[tuple[int, float], ...] | None
    free: tuple[int, ...]  # model outputs no step from this one on reads (dropped before the predictor)


@dataclass(frozen=True)
class Program:
    """The whole loop as data: what ``BakedSampler.forward`` runs, and what the manifest describes."""

    steps: tuple[BakedStep, ...]
    final: tuple[float, float, float] | None  # (time, alpha, sigma) of the final denoise call
    init_scale: float
    guidance: float | None
    spaces: tuple[str, ...]  # parameterisations the updates use ("data", "noise")

    @property
    def nfe(self) -> int:
        return len(self.steps) + int(self.final is not None)


def _as_float(w: torch.Tensor, dtype: torch.dtype) -> float:
    """A plan weight as the Python float the executor effectively uses (cast to the state dtype first)."""
    return float(w.detach().to(dtype))


def _bake_update(update: Update, dtype: torch.dtype) -> LinearUpdate:
    return LinearUpdate(_as_float(update.state, dtype), tuple((j, _as_float(w, dtype)) for j, w in update.outputs),
                        update.prediction)


def bake_program(schedule: Schedule, model: Denoiser, dtype: torch.dtype = torch.float32) -> Program:
    """Every constant of the loop of ``schedule`` on ``model``, from ``make_plan`` (the one formula place)."""
    schedule.check_units(model.units)
    plan = make_plan(schedule, model.noise)
    last_use = plan.last_uses()
    alphas = plan.alphas.to(dtype)
    sigmas = plan.sigmas.to(dtype)
    steps = []
    freed: set[int] = set()
    for k, (step, sp) in enumerate(zip(schedule.steps, plan.steps)):
        # as the executor: before step k's predictor, drop every output no step from k on reads
        free = tuple(j for j in range(k + 1) if last_use.get(j, -1) < k and j not in freed)
        freed.update(free)
        prev_corr = plan.steps[k - 1].corrector if k > 0 else None
        comp = None
        if sp.compensation is not None:
            comp = tuple((j, _as_float(w, dtype)) for j, w in sp.compensation.outputs)
        steps.append(BakedStep(
            time=float(plan.times[k]),
            alpha=float(alphas[k]),
            sigma=float(sigmas[k]),
            skip=frozenset(step.skip),
            predictor=_bake_update(sp.predictor, dtype),
            corrector=None if prev_corr is None else _bake_update(prev_corr, dtype),
            compensation=comp,
            free=free,
        ))
    final = None
    if plan.final_denoise:
        n = len(schedule.steps)
        final = (float(plan.times[n]), float(alphas[n]), float(sigmas[n]))
    spaces = tuple(sorted({sp.predictor.prediction for sp in plan.steps}))
    return Program(tuple(steps), final, float(model.noise.init_scale()), schedule.guidance, spaces)


def _apply(update: LinearUpdate, x: torch.Tensor, hist: dict[str, dict[int, torch.Tensor]]) -> torch.Tensor:
    out = update.state * x
    outputs = hist[update.prediction]
    for j, w in update.outputs:
        out = out + w * outputs[j]
    return out


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
        # the model time as the executor hands it over: a float64 0-d tensor (folded into a constant when traced)
        self._times = [torch.tensor(s.time, dtype=torch.float64) for s in self.program.steps]
        if self.program.final is not None:
            self._times.append(torch.tensor(self.program.final[0], dtype=torch.float64))

    def _call(self, x: torch.Tensor, k: int, cond: Any, skip: frozenset[str]) -> torch.Tensor:
        t = self._times[k].to(x.device)
        if self.autocast is None:
            out = self.model(x, t, cond, skip=skip, guidance=self.program.guidance)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast):
                out = self.model(x, t, cond, skip=skip, guidance=self.program.guidance)
        return out.to(self.dtype)

    def forward(self, noise: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        """The samples from ``noise`` and the engine's condition inputs after it, in ``engine_io`` order."""
        cond = condition_of_inputs(self.model, conditions)
        prog = self.program
        param = self.model.parameterization
        x = noise.to(self.dtype) * prog.init_scale
        hist: dict[str, dict[int, torch.Tensor]] = {p: {} for p in prog.spaces}
        x_prev = x
        for k, st in enumerate(prog.steps):
            out = self._call(x, k, cond, st.skip)
            x0, eps = to_data_and_noise(out, x, st.alpha, st.sigma, param)
            for p in prog.spaces:
                hist[p][k] = x0 if p == "data" else eps
            if st.corrector is not None:
                x = _apply(st.corrector, x_prev, hist)
            if st.compensation is not None:
                for p in prog.spaces:
                    comp = torch.zeros_like(hist[p][k])
                    for j, w in st.compensation:
                        comp = comp + w * hist[p][j]
                    hist[p][k] = comp
            for j in st.free:
                for p in prog.spaces:
                    hist[p].pop(j, None)
            x_prev = x
            x = _apply(st.predictor, x, hist)
        if prog.final is not None:
            _, a, s = prog.final
            out = self._call(x, len(prog.steps), cond, frozenset())
            x, _ = to_data_and_noise(out, x, a, s, param)
        return x
