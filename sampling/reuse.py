"""Named reuse policies (DeepCache's uniform interval, a FirstBlockCache-style threshold rule) as peers of a
searched reuse pattern.

A reuse decision is data of the schedule (``Step.reuse``): a unit named there is not computed in that step's model
call(s); its output is the one it produced at the last call that ran it (``sampling.denoiser.caching``). So a
*static* policy is a schedule transform: :func:`deepcache` returns the schedule with DeepCache's pattern, which the
executor, the baker and an engine run alike.

:class:`ThresholdReuse` is not a schedule: it decides at run time from tensor values (how much the first block's
output moved since the last full call), which no static schedule, baked graph or engine can hold. It is an
executor-side policy: a Denoiser wrapper that the executor runs as any model (``sample(ThresholdReuse(m, ...),
schedule, ...)``); it exists as a peer for benchmarks (``bench/reuse.py``), not as something that compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from autotune.errors import SamplingError
from autotune.sampling.denoiser import Denoiser, fingerprint_module, unit_masks, unit_residual, with_residual
from autotune.space.schedule import Schedule

__all__ = ["ThresholdReuse", "deepcache", "without_masks", "without_reuse"]


def deepcache(schedule: Schedule, interval: int, unit: str = "deep0") -> Schedule:
    """DeepCache's uniform policy (Ma et al., 2024): a full model call at steps 0, N, 2N, ...; every other step
    reuses ``unit`` (the deep branch of the skip connection: for ``digits``, ``deep0`` is its shallowest
    branch, DeepCache's default) cached at the last full step. The schedule's own reuse masks are replaced."""
    if not isinstance(interval, int) or interval < 1:
        raise SamplingError(f"deepcache: the interval must be an integer >= 1, got {interval!r}")
    steps = [dataclasses.replace(st, reuse=() if k % interval == 0 else (unit,)) for k, st in enumerate(schedule.steps)]
    name = f"{schedule.name}+deepcache{interval}" if schedule.name else f"deepcache{interval}"
    return dataclasses.replace(schedule, steps=tuple(steps), name=name)


def without_masks(schedule: Schedule) -> Schedule:
    """The schedule with every skip and reuse mask cleared (the unpruned network, same steps)."""
    return dataclasses.replace(schedule, steps=tuple(dataclasses.replace(st, skip=(), reuse=())
                                                     for st in schedule.steps))


def without_reuse(schedule: Schedule) -> Schedule:
    """The schedule with every reuse mask cleared (every unit computed at every call)."""
    return dataclasses.replace(schedule, steps=tuple(dataclasses.replace(st, reuse=()) for st in schedule.steps))


class ThresholdReuse:
    """FirstBlockCache-style rule as an executor-side Denoiser wrapper (decides from tensor values: not bakeable).

    Every call computes the first block ``first`` (for ``digits``: ``down0``, the block at full resolution that
    feeds the deep branch; for a diffusers UNet2DModel: ``down_blocks.0``, whose output's first element is
    watched). Its output is compared with the one recorded at the last *full* call: when the relative
    change ``mean|h - h_full| / mean|h_full|`` is below ``threshold``, the call reuses ``rest`` (the cached output of
    the remaining deep branch, ``deep0``; for a residual unit such as ``digits-dit``'s ``rest1``, the residual it
    added, on the current input, as FirstBlockCache does) and computes only what follows it; otherwise the call is
    full and both references are refreshed. The decision is one per call for the whole batch (CFG's doubled batch
    included), as diffusers' FirstBlockCache decides per forward.

    A run starts with a full call: the wrapper resets its state when the time does not decrease (a new run starts
    at the largest time). ``calls`` and ``reused`` count the calls and the reusing ones since construction.
    """

    def __init__(self, model: Denoiser, threshold: float, first: str = "down0", rest: str = "deep0") -> None:
        module = getattr(model, "module", None)
        names = dict(module.named_modules()) if module is not None else {}
        for unit in (first, rest):
            if unit not in names:
                raise SamplingError(f"threshold reuse: the model has no unit {unit!r}")
        self.model = model
        self.threshold = float(threshold)
        self.first, self.rest = first, rest
        self.noise = model.noise
        self.parameterization = model.parameterization
        self.units = model.units
        self.module = module
        self.calls = self.reused = 0
        self._last_t: float | None = None
        self._features: dict[str, Any] = {}
        self._ref: torch.Tensor | None = None

    def _watch(self, h: torch.Tensor) -> None:
        """Called with the first block's output: decides whether ``rest`` is reused in this call."""
        reuse = False
        if self._ref is not None and self.rest in self._features and self._ref.shape == h.shape:
            change = float((h - self._ref).abs().mean() / self._ref.abs().mean().clamp_min(1e-12))
            reuse = change < self.threshold
        if not reuse:
            self._ref = h.detach()
        self._decision = reuse

    def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None, **_: Any):
        tf = float(t)
        if self._last_t is None or tf >= self._last_t:
            self._features, self._ref = {}, None
        self._last_t = tf
        subs = dict(self.module.named_modules())
        first, rest = subs[self.first], subs[self.rest]
        wrapper = self

        def first_forward(*args: Any, **kwargs: Any) -> Any:
            out = type(first).forward(first, *args, **kwargs)
            wrapper._watch(out[0] if isinstance(out, tuple) else out)  # a diffusers down block: (h, skip features)
            return out

        residual = getattr(rest, "autotune_residual", None) is not None  # cache what it adds (a transformer span)

        def rest_forward(*args: Any, **kwargs: Any) -> Any:
            if wrapper._decision:
                cached = wrapper._features[wrapper.rest]
                return with_residual(rest, cached, args, kwargs) if residual else cached
            out = type(rest).forward(rest, *args, **kwargs)
            wrapper._features[wrapper.rest] = unit_residual(rest, wrapper.rest, out, args, kwargs) if residual else out
            return out

        self._decision = False
        first.forward, rest.forward = first_forward, rest_forward
        try:
            with unit_masks(self.module, skip, (), (), None):
                out = self.model(x, t, cond, guidance=guidance)
        finally:
            del first.forward, rest.forward
        self.calls += 1
        self.reused += int(self._decision)
        return out

    def fingerprint(self) -> str:
        return fingerprint_module(None, {"model": self.model.fingerprint(), "threshold-reuse": self.threshold,
                                         "first": self.first, "rest": self.rest})
