"""What a model has beyond the Denoiser protocol, in one typed value.

The evaluator, the compiler, the CLI and the reports ask the same questions of a model: its sample shape, whether
it is class- or text-conditioned (so guidance applies), whether its samples are latents to decode, whether the
network takes the guidance scale as an input (Flux dev), whether it has its own data metrics, which of its units can
be skipped. A model answers them all at once by a ``capabilities`` attribute holding a :class:`Capabilities`;
:func:`capabilities_of` is the one place that reads the optional members of models that do not declare one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autotune.errors import InputError


@dataclass(frozen=True)
class Capabilities:
    """The optional features of a model.

    Args:
        sample_shape: one sample's shape (channels, height, width), or None when the model does not say.
        num_classes: class-conditional models: the number of labels.
        prompts: text-conditioned (``encode_prompts``): evaluation sets carry prompts.
        decodes: samples are latents that ``decode`` turns into images (outside the sampling loop).
        guidance_input: the network takes the guidance scale as an input (distilled guidance, Flux dev).
        engine_conditions: an engine takes several named condition inputs (``engine_condition_inputs``).
        data_metrics: the model scores sample sets itself (``data_metrics``: e.g. Frechet distance, accuracy).
        data_metric_draws: it also scores bootstrap resamples of a set (``data_metric_draws``: paired intervals).
        units: the units a schedule's skip (and reuse) masks may name, as the model lists them.
    """

    sample_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    prompts: bool = False
    decodes: bool = False
    guidance_input: bool = False
    engine_conditions: bool = False
    data_metrics: bool = False
    data_metric_draws: bool = False
    units: tuple[str, ...] = ()

    @property
    def guided(self) -> bool:
        """Classifier-free guidance applies: there is a condition to guide by."""
        return bool(self.num_classes) or self.prompts

    @property
    def images(self) -> bool:
        """Samples can be shown as images: decoded latents, or 1- or 3-channel pixel samples."""
        shape = self.sample_shape or ()
        return self.decodes or (len(shape) == 3 and shape[0] in (1, 3))


def capabilities_of(model: Any) -> Capabilities:
    """The model's declared capabilities, or those read from its optional members (the one place that does)."""
    declared = getattr(model, "capabilities", None)
    if isinstance(declared, Capabilities):
        return declared
    shape = getattr(model, "sample_shape", None)
    return Capabilities(
        sample_shape=tuple(int(d) for d in shape) if shape else None,
        num_classes=getattr(model, "num_classes", None) or None,
        prompts=callable(getattr(model, "encode_prompts", None)),
        decodes=callable(getattr(model, "decode", None)),
        guidance_input=bool(getattr(model, "guidance_embeds", False)),
        engine_conditions=callable(getattr(model, "engine_condition_inputs", None)),
        data_metrics=callable(getattr(model, "data_metrics", None)),
        data_metric_draws=callable(getattr(model, "data_metric_draws", None)),
        units=getattr(model, "units", None) or (),  # as the model has them (digits' Units also lists reusable ones)
    )


def check_guidance_applies(model: Any, guidance: float | None, name: str) -> None:
    """Refuse a guidance scale for a model without a condition to guide by (it would be ignored silently)."""
    if guidance is not None and not capabilities_of(model).guided:
        raise InputError(f"guidance {guidance:g}: {name} is unconditional, so classifier-free guidance does not "
                         "apply (drop --guidance, or use a schedule without guidance)")
