"""The built-in ``digits`` network as a diffusers model, and its export as a DDPMPipeline directory.

``DigitsUNet2DModel`` wraps the same :class:`~autotune.models.digits.DigitsUNet` (same weights, same
arithmetic) behind the call UNet2DModel users know, ``unet(sample, timestep, class_labels).sample``;
without ``class_labels`` it runs the null class, i.e. the unconditional model that DDPMPipeline samples.

diffusers records a component defined outside its own libraries under its full module path
(``["autotune.models.digits_diffusers", "DigitsUNet2DModel"]`` in ``model_index.json``) and, from 0.42 on,
resolves that name only from ``sys.modules``: import this module before ``DDPMPipeline.from_pretrained``.
``DigitsDDPMPipeline.from_pretrained`` loads the same directory without diffusers' warnings (that the unet
is not a UNet2DModel, and that `accelerate` is missing).

    >>> from autotune.models.digits_diffusers import DigitsDDPMPipeline  # doctest: +SKIP
    >>> pipe = DigitsDDPMPipeline.from_pretrained("digits-pipe")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from autotune.errors import ModelError

try:
    from diffusers import DDPMPipeline, DDPMScheduler, SchedulerMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin  # diffusers finds the load method through this name
    from diffusers.models.unets.unet_2d import UNet2DOutput
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ModelError("the digits diffusers model needs diffusers: pip install 'autotune-diffusion[diffusers]'") from e

from autotune.models.digits import (
    NOISE_CONFIG, NULL_CLASS, SAMPLE_SHAPE, UNET_ARCH, DigitsUNet, check_labels, load_digits,
)

PARAMETERIZATION = "epsilon"  # what the digits network predicts (DigitsDenoiser says the same)


class DigitsUNet2DModel(ModelMixin, ConfigMixin):
    """The ``digits`` UNet with UNet2DModel's interface: ``forward(sample, timestep, class_labels=None)``.

    Args:
        sample_size: image side in pixels (read by DDPMPipeline; the network runs on any multiple of 4).
        in_channels, out_channels: 1 (grey digits); read by DDPMPipeline.
        channels, emb_dim, heads, groups: the DigitsUNet architecture (``autotune.models.digits.UNET_ARCH``).

    Raises:
        ModelError: a channel count other than 1.

    Example:
        >>> unet = DigitsUNet2DModel.from_digits_weights()
        >>> unet(torch.zeros(2, 1, 16, 16), 999).sample.shape
        torch.Size([2, 1, 16, 16])
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = SAMPLE_SHAPE[1],
        in_channels: int = SAMPLE_SHAPE[0],
        out_channels: int = SAMPLE_SHAPE[0],
        channels: Sequence[int] = tuple(UNET_ARCH["channels"]),
        emb_dim: int = UNET_ARCH["emb_dim"],
        heads: int = UNET_ARCH["heads"],
        groups: int = UNET_ARCH["groups"],
    ) -> None:
        super().__init__()
        if in_channels != SAMPLE_SHAPE[0] or out_channels != SAMPLE_SHAPE[0]:
            raise ModelError(f"DigitsUNet2DModel: in_channels and out_channels must be {SAMPLE_SHAPE[0]}, "
                             f"got {in_channels} and {out_channels}")
        self.net = DigitsUNet(tuple(channels), emb_dim, heads, groups).to(memory_format=torch.channels_last)

    # channels-last, as the built-in model loads (models/digits.py, load_weights_into: why): the same layout computes
    # the same outputs to the bit. load_state_dict copies into the layout; diffusers' loading replaces the tensors.
    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "DigitsUNet2DModel":
        model = super().from_pretrained(*args, **kwargs)
        model.net.to(memory_format=torch.channels_last)
        return model

    @classmethod
    def from_digits_weights(cls, weights_dir: str | Path | None = None) -> "DigitsUNet2DModel":
        """The model holding the shipped ``digits`` weights (or those in ``weights_dir``), in eval mode."""
        model = cls()
        model.net.load_state_dict(load_digits(torch.float32, weights_dir).module.state_dict())
        return model.eval()

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | int | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """eps for the batch at the training step ``timestep`` (a number, or one per sample); class labels
        0..9, or None for the null class (the unconditional model)."""
        batch = sample.shape[0]
        tm = torch.as_tensor(timestep, device=sample.device)
        tm = tm.expand(batch) if tm.dim() == 0 else tm
        if class_labels is None:
            labels = torch.full((batch,), NULL_CLASS, dtype=torch.long, device=sample.device)
        else:
            labels = check_labels(class_labels, batch).to(sample.device)
        eps = self.net(sample, tm, labels)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)


class DigitsDDPMPipeline(DDPMPipeline):
    """DDPMPipeline holding the digits unet: loads an exported directory (`autotune zoo export digits`).

    The same pipeline as DDPMPipeline; only loading differs. diffusers checks each component against the
    pipeline's annotations, and DDPMPipeline's say UNet2DModel; this one names DigitsUNet2DModel. The whole
    network is 4 MB, so it is loaded in full (``low_cpu_mem_usage=False``) rather than through `accelerate`.
    """

    def __init__(self, unet: DigitsUNet2DModel, scheduler: SchedulerMixin) -> None:
        super().__init__(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "DigitsDDPMPipeline":
        kwargs.setdefault("low_cpu_mem_usage", False)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def digits_scheduler(**overrides: Any) -> DDPMScheduler:
    """diffusers' DDPMScheduler on the digits noise schedule (linear betas 1e-4..0.02, 1000 steps, epsilon)."""
    return DDPMScheduler(**{**NOISE_CONFIG, "prediction_type": PARAMETERIZATION, **overrides})


def export_diffusers(out: str | Path, weights_dir: str | Path | None = None) -> Path:
    """Write the ``digits`` model as a DDPMPipeline directory (model_index.json, unet/, scheduler/).

    Raises:
        ModelError: ``out`` is an existing file, or the weights are missing.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a directory")
    pipe = DDPMPipeline(unet=DigitsUNet2DModel.from_digits_weights(weights_dir), scheduler=digits_scheduler())
    pipe.save_pretrained(str(out))
    # safetensors writes its files readable by the owner only (0600); weights are no secret: give them the
    # mode every other file of the directory has, the one the umask allows
    for weights in (out / "unet").glob("*.safetensors"):
        os.chmod(weights, 0o666 & ~_umask())
    return out


def _umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
