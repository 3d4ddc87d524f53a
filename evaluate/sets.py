"""Evaluation sets: named, seeded initial noises (and class labels), in three disjoint kinds.

The *search* set is what searches may see; the *validation* set is held out from the search and used only
to choose among its finalists (e.g. whether a refined grid generalises); the *report* set is only for final
reports, so a searched schedule is never graded on the noise it was tuned or chosen on. The kinds draw from
different generator streams of the same base seed, and the set id names kind, seed, size and shape.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from autotune.errors import AutotuneError
from autotune.evaluate.ids import DEFAULT_SIZE, eval_set_id
from autotune.sampling.capabilities import capabilities_of

KINDS = ("search", "report", "validation")  # the index is part of the generator seed: append only


@dataclass(frozen=True)
class EvalSet:
    """The noise (and labels) a schedule is scored on.

    Example:
        >>> s = EvalSet("report", (1, 16, 16), size=4, num_classes=10)
        >>> s.noise().shape, s.labels().tolist() == s.labels().tolist()
        (torch.Size([4, 1, 16, 16]), True)
    """

    kind: str
    sample_shape: tuple[int, ...]
    size: int = 0
    seed: int = 0
    num_classes: int | None = None
    prompts: tuple[str, ...] = ()  # text-to-image: sample i gets prompts[i % len(prompts)]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AutotuneError(f"--set: must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.size == 0:
            object.__setattr__(self, "size", DEFAULT_SIZE[self.kind])
        if self.size < 1:
            raise AutotuneError(f"evaluation set size must be >= 1, got {self.size}")
        object.__setattr__(self, "sample_shape", tuple(int(d) for d in self.sample_shape))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.prompts and self.num_classes:
            raise AutotuneError("an evaluation set has class labels or prompts, not both")

    @property
    def id(self) -> str:
        base = eval_set_id(self.kind, self.seed, self.size, self.sample_shape, self.num_classes)
        if not self.prompts:
            return base
        digest = hashlib.sha256("\n".join(self.prompts).encode("utf-8")).hexdigest()[:12]
        return f"{base}-p{len(self.prompts)}.{digest}"

    def _generator(self, stream: int) -> torch.Generator:
        # distinct streams per kind and per purpose: search and report noises never coincide
        return torch.Generator().manual_seed(1_000_003 * self.seed + 97 * KINDS.index(self.kind) + stream)

    def noise(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Standard normal initial noise, shape (size, *sample_shape)."""
        x = torch.randn((self.size, *self.sample_shape), generator=self._generator(0), dtype=torch.float64)
        return x.to(dtype)

    def image_noise(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A second standard normal draw, for image-to-image: the noise an image is noised with to t_start
        (independent of ``noise``, from which the images themselves come)."""
        x = torch.randn((self.size, *self.sample_shape), generator=self._generator(2), dtype=torch.float64)
        return x.to(dtype)

    def labels(self) -> torch.Tensor | None:
        """Balanced class labels (0, 1, ..., k-1, 0, ...) shuffled by the set's seed, or None."""
        if not self.num_classes:
            return None
        labels = torch.arange(self.size) % self.num_classes
        return labels[torch.randperm(self.size, generator=self._generator(1))]


    def conditions(self) -> torch.Tensor | list[str] | None:
        """What each sample is conditioned on: its class label, its prompt (cycled over the set), or None."""
        if self.prompts:
            return [self.prompts[i % len(self.prompts)] for i in range(self.size)]
        return self.labels()


def eval_set_for(model, kind: str, size: int = 0, seed: int = 0, prompts: tuple[str, ...] = ()) -> EvalSet:
    """The evaluation set of a model (its sample shape and classes, or the prompts given) of the given kind."""
    has = capabilities_of(model)
    if not has.sample_shape:
        raise AutotuneError("this model does not declare its sample shape; it cannot be evaluated")
    if prompts and not has.prompts:
        raise AutotuneError("--prompts: this model is not a text-to-image model (it takes no prompts)")
    return EvalSet(kind, has.sample_shape, size=size, seed=seed, num_classes=has.num_classes, prompts=tuple(prompts))
