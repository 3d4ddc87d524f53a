"""Built-in model ``digits-flow``: the ``digits`` UNet trained as a rectified flow, with CFG.

x_t = (1 - t) x0 + t eps on t in [0, 1] (``FlowMatching`` with its defaults: the network is fed t * 1000,
continuous), the network predicts the velocity u = eps - x0 (parameterisation ``flow``). Same data,
architecture (``digits.build_unet``), labels (0..9, null class 10 for classifier-free guidance) and data
metrics (Frechet distance and class accuracy by the shipped digits classifier) as ``digits``, so the two
models differ only in the objective and the solvers see a flow-matching ODE on the same task. Weights are
made by ``python -m autotune.models.digits_train --model digits-flow``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from autotune.models.digits import (
    UNET_ARCH, WEIGHTS_DIR, DigitsDenoiser, build_unet, load_weights_into,
)
from autotune.models.registry import BuiltinModel, register
from autotune.sampling.noise import FlowMatching

UNET_FILE = "digits_flow.safetensors"
TRAIN_RECORD = "digits_flow_train.json"
TIME_SCALE = 1000.0  # FlowMatching's default: the network sees t * 1000, like a DDPM step index
NOISE_CONFIG = {"kind": "flow", "t_min": 1e-3, "time_scale": TIME_SCALE}


def flow_noise() -> FlowMatching:
    """The model's noise schedule: ``FlowMatching()`` with its defaults (alpha = 1 - t, sigma = t)."""
    return FlowMatching()


class DigitsFlowDenoiser(DigitsDenoiser):
    """The Denoiser of ``digits-flow`` (or of another network on the same flow, ``name`` and ``arch`` saying which:
    ``digits-dit``): velocity output, class labels as ``cond``, CFG by ``guidance``."""

    def __init__(self, unet: torch.nn.Module, name: str = "digits-flow", arch: dict | None = None) -> None:
        config = {"name": name, "noise": NOISE_CONFIG, "parameterization": "flow", "arch": arch or UNET_ARCH}
        # t * 1000 is a continuous input here: rounding it to whole numbers (DDPM step indices) would be wrong
        super().__init__(unet, flow_noise(), parameterization="flow", config=config, round_time=False)


def load_digits_flow(dtype: torch.dtype = torch.float32, weights_dir: str | Path | None = None) -> DigitsFlowDenoiser:
    """The shipped ``digits-flow`` Denoiser (EMA weights, read with safetensors), in ``dtype``."""
    path = Path(weights_dir or WEIGHTS_DIR) / UNET_FILE
    return DigitsFlowDenoiser(load_weights_into(build_unet(), path, dtype))


register(BuiltinModel("digits-flow", load_digits_flow,
                      "the digits UNet as a rectified flow (velocity, t * 1000), class-conditional (CFG)"))
