"""Structured conditions: what a text-to-image pipeline hands its network besides the state and the timestep,
as one value that slices, expands and concatenates along the batch like a tensor.

Code that handles a batch of conditions (evaluation chunks ``cond[:n]``, one prompt broadcast to every sample,
the doubled batch of classifier-free guidance in ``models/guidance.py``) works on these unchanged. A family
with another set of tensors subclasses :class:`BatchedCondition`, naming each field's dimensions in ``DIMS``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import torch

from autotune.errors import ModelError


@dataclass(frozen=True)
class BatchedCondition:
    """Tensors batched along dimension 0, all with the same batch size (``DIMS``: field -> dimensions)."""

    DIMS: ClassVar[dict[str, int]] = {}

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key, dims in self.DIMS.items():
            value = getattr(self, key)
            if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or value.dim() != dims:
                what = (f"a {value.dim()}-d {value.dtype} tensor" if isinstance(value, torch.Tensor)
                        else type(value).__name__)
                raise ModelError(f"{name}.{key}: expected a {dims}-d floating-point tensor, got {what}")
        sizes = {key: getattr(self, key).shape[0] for key in self.DIMS}
        first = next(iter(sizes.values()), None)
        # compared, not put in a set: under an ONNX trace the sizes are traced values, distinct as set members
        if any(size != first for size in sizes.values()):
            raise ModelError(f"{name}: the batch sizes differ ({', '.join(f'{k} {v}' for k, v in sizes.items())})")

    @property
    def batch(self) -> Any:
        # the size as the tensor reports it (not a Python int): a traced export keeps its batch dynamic
        return getattr(self, fields(self)[0].name).shape[0]

    def __len__(self) -> int:
        return int(self.batch)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def __getitem__(self, index: Any) -> Any:
        """Rows of the batch: a slice, an index list or tensor, or an int (kept as a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda t: t[index])

    def expand(self, batch: int) -> Any:
        """This condition for ``batch`` samples: one condition is broadcast (a view), ``batch`` are kept."""
        size = self.batch
        if size == batch:
            return self
        if size != 1:
            raise ModelError(f"{int(size)} prompt conditions for a batch of {batch} samples (give one per sample, "
                             "or one for all)")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Every tensor moved or cast as ``Tensor.to(*args, **kwargs)``."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def cat(self, other: Any) -> Any:
        """This batch followed by ``other``'s."""
        return type(self)(**{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name).to(getattr(self, f.name))])
                             for f in fields(self)})

    def with_null(self, null: Any) -> Any:
        """This batch followed by the null condition for each sample, for one guided forward."""
        first = getattr(self, fields(self)[0].name)
        return self.cat(null.expand(self.batch).to(first.device))


@dataclass(frozen=True)
class PooledTextCondition(BatchedCondition):
    """Per-token prompt embeddings and one pooled embedding per sample (SD3, Flux).

    Attributes:
        prompt_embeds: ``(B, L, D)``, the transformer's ``encoder_hidden_states``.
        pooled_embeds: ``(B, P)``, its ``pooled_projections``.

    Example:
        >>> c = PooledTextCondition(torch.zeros(1, 4, 8), torch.zeros(1, 3))
        >>> len(c.expand(5)), c.expand(5)[1:3].prompt_embeds.shape
        (5, torch.Size([2, 4, 8]))
    """

    DIMS: ClassVar[dict[str, int]] = {"prompt_embeds": 3, "pooled_embeds": 2}
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor


class PooledTextEngineInputs:
    """What `autotune compile` needs of a model conditioned on a :class:`PooledTextCondition` (SD3, Flux): its
    condition as two float32 engine inputs, named as the pipelines' ``__call__`` arguments. The model has a
    ``null_condition`` (the empty prompt's encoding), which fixes the shapes and feeds example inputs."""

    null_condition: PooledTextCondition

    def engine_condition_inputs(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        null = self.null_condition
        return (("prompt_embeds", tuple(int(d) for d in null.prompt_embeds.shape[1:])),
                ("pooled_prompt_embeds", tuple(int(d) for d in null.pooled_embeds.shape[1:])))

    def engine_condition(self, inputs: dict[str, torch.Tensor]) -> PooledTextCondition:
        """The condition of an engine input dict (traceable: no value is read)."""
        return PooledTextCondition(inputs["prompt_embeds"], inputs["pooled_prompt_embeds"])

    def engine_null_inputs(self, batch: int) -> dict[str, torch.Tensor]:
        null = self.null_condition.expand(batch).to(torch.float32)
        return {"prompt_embeds": null.prompt_embeds.contiguous(), "pooled_prompt_embeds": null.pooled_embeds.contiguous()}
