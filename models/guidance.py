"""Classifier-free guidance as a reusable wrapper around any conditional network.

``eps = eps_u + g (eps_c - eps_u)``: g = 1 gives the conditional model, g = 0 the unconditional one.
The conditional and unconditional halves run in ONE batched forward (the batch is doubled), so a guided
model call costs one network evaluation of twice the batch, as in diffusers' pipelines.

A condition is a tensor batched along dimension 0, or a structured condition of several batched tensors
(SDXL's prompt embeddings + pooled embeddings + time ids, ``models/sdxl.py: SDXLCondition``) that provides
``expand(batch)`` (one sample's condition for ``batch`` samples) and ``with_null(null)`` (itself followed by
the matching null condition, one batch of twice its size).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from autotune.errors import ModelError

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
        if isinstance(cond, torch.Tensor):
            both = torch.cat([cond, self.null(cond.shape[0], cond).to(cond.dtype)])
        else:  # a structured condition pairs itself with the null one (SDXL keeps its own time ids there)
            both = cond.with_null(self.null_cond)
        out = self.inner(torch.cat([x, x]), torch.cat([tm, tm]), both)
        cond_out, uncond_out = out.chunk(2)
        return uncond_out + float(guidance) * (cond_out - uncond_out)
