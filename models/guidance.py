"""Classifier-free guidance as a reusable wrapper around any conditional network.

``eps = eps_u + g (eps_c - eps_u)``: g = 1 gives the conditional model, g = 0 the unconditional one.
The conditional and unconditional halves run in ONE batched forward (the batch is doubled), so a guided
model call costs one network evaluation of twice the batch, as in diffusers' pipelines.

A condition is a tensor batched along dimension 0, or a structured condition of several batched tensors
(SDXL's prompt embeddings + pooled embeddings + time ids, ``models/sdxl.py: SDXLCondition``) that provides
``expand(batch)`` (one sample's condition for ``batch`` samples) and ``with_null(null)`` (itself followed by
the matching null condition, one batch of twice its size).

Guidance reuse (``GUIDANCE_UNIT``, a reuse-only unit of every guided model): a call that records it keeps the
guidance direction ``eps_c - eps_u`` in the run's feature cache; a call that reuses it runs the conditional half
only (one forward of the plain batch) and returns ``eps_c + (g - 1) * cached direction``, which is the guided
output whenever the direction has not changed since. The unconditional branch is where CFG spends half of each
call, and the direction varies slowly between adjacent steps (FasterCache, Lv et al. 2024, reuses it with a
frequency-domain correction; this is its plain form, copied or, with ``Schedule.reuse_order`` 1, extrapolated
in time as any cached unit is).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from autotune.errors import ModelError, SamplingError
from autotune.sampling.denoiser import FeatureCache, Units, map_features, unit_masks
from autotune.space.schedule import GUIDANCE_UNIT

CondFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class ClassifierFreeGuidance:
    """Wraps ``inner(x, model_time, cond)`` with classifier-free guidance.

    Args:
        inner: the conditional network; ``model_time`` is already expanded to the batch.
        null_cond: the "no conditioning" value for ONE sample, e.g. ``torch.tensor(10)`` (a null class
            label) or a ``(1, L, D)`` empty-prompt embedding; it is expanded along the batch dimension.

    Example:
        >>> cfg = ClassifierFreeGuidance(lambda x, t, c: x * c[:, None], torch.tensor(0.0))
        >>> cfg(torch.ones(2, 3), torch.zeros(2), torch.tensor([1.0, 2.0]), 3.0)[:, 0]
        tensor([3., 6.])
    """

    def __init__(self, inner: CondFn, null_cond: torch.Tensor) -> None:
        structured = hasattr(null_cond, "expand") and hasattr(null_cond, "with_null")
        if not isinstance(null_cond, torch.Tensor) and not structured:
            raise ModelError(f"null_cond: must be a tensor or a structured condition, got {type(null_cond).__name__}")
        self.inner = inner
        self.null_cond = null_cond

    def null(self, batch: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """The null conditioning expanded to ``batch`` samples (on ``like``'s device)."""
        null = self.null_cond if like is None else self.null_cond.to(like.device)
        if not isinstance(null, torch.Tensor):
            return null.expand(batch)
        if null.dim() == 0:
            return null.expand(batch)
        return null.expand(batch, *null.shape[1:])

    def __call__(
        self, x: torch.Tensor, tm: torch.Tensor, cond: Any = None, guidance: float | None = None
    ) -> torch.Tensor:
        """Unconditional when ``cond`` is None, conditional when ``guidance`` is None, else guided."""
        if cond is None:
            return self.inner(x, tm, self.null(x.shape[0], x))
        if guidance is None:
            return self.inner(x, tm, cond)
        cond_out, uncond_out = self.halves(x, tm, cond)
        return uncond_out + float(guidance) * (cond_out - uncond_out)

    def halves(self, x: torch.Tensor, tm: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional and the unconditional output, from ONE batched forward (condition first)."""
        if isinstance(cond, torch.Tensor):
            both = torch.cat([cond, self.null(cond.shape[0], cond).to(cond.dtype)])
        else:  # a structured condition pairs itself with the null one (SDXL keeps its own time ids there)
            both = cond.with_null(self.null_cond)
        out = self.inner(torch.cat([x, x]), torch.cat([tm, tm]), both)
        cond_out, uncond_out = out.chunk(2)
        return cond_out, uncond_out

    def masked(self, module: torch.nn.Module | None, x: torch.Tensor, tm: torch.Tensor, cond: Any,
               guidance: float | None, skip=frozenset(), reuse=frozenset(), record=frozenset(),
               cache: FeatureCache | None = None) -> torch.Tensor:
        """The call of a step with its unit masks (``sampling.denoiser.unit_masks`` on ``module``), where
        ``GUIDANCE_UNIT`` in ``reuse`` / ``record`` reuses / records the guidance direction (module docstring).

        A guidance-reusing call runs the conditional half alone: the other units it reuses read the conditional
        half of their cached outputs (cached by a guided call: condition first), and it records nothing, since
        its features hold half the batch (a later reuse reads the last full call's). Raises SamplingError when
        the call is not guided (no ``guidance`` or no condition) or nothing is cached yet."""
        reuse, record = frozenset(reuse), frozenset(record)
        if GUIDANCE_UNIT not in reuse | record:
            with unit_masks(module, skip, reuse, record, cache):
                return self(x, tm, cond, guidance)
        if guidance is None or cond is None:
            raise SamplingError(f"reuse: unit {GUIDANCE_UNIT!r} (the guidance direction) needs a guided call: a "
                                f"schedule with guidance and a condition")
        if cache is None:
            raise SamplingError("reuse: a call that reuses or records unit outputs needs the run's feature cache")
        if GUIDANCE_UNIT in reuse:
            if GUIDANCE_UNIT not in cache:
                raise SamplingError(f"reuse: unit {GUIDANCE_UNIT!r} has no cached output (no earlier call of this run "
                                    f"was guided in full)")
            others = reuse - {GUIDANCE_UNIT}
            batch = x.shape[0]
            half = {u: map_features(lambda f: f[:batch], cache[u]) for u in others if u in cache}
            with unit_masks(module, skip, others, (), half):
                cond_out = self.inner(x, tm, cond)
            return cond_out + (float(guidance) - 1.0) * cache[GUIDANCE_UNIT]
        with unit_masks(module, skip, reuse, record - {GUIDANCE_UNIT}, cache):
            cond_out, uncond_out = self.halves(x, tm, cond)
        direction = cond_out - uncond_out
        cache[GUIDANCE_UNIT] = direction
        return uncond_out + float(guidance) * direction


def with_guidance_unit(units: Units) -> Units:
    """``units`` plus ``GUIDANCE_UNIT`` among the reusable ones: what a model with classifier-free guidance declares
    (a schedule may reuse it only when guided; ``space.schedule.reusable_for`` drops it for an unguided one)."""
    return Units(units, tuple(u for u in units.reusable if u not in units) + (GUIDANCE_UNIT,))

