"""Built-in model ``digits``: a small class-conditional UNet on scikit-learn digits (1x16x16), with CFG.

Epsilon prediction on a 1000-step linear-beta DDPM schedule (``VPDiscrete``); labels 0..9 plus a null
class 10 used for classifier-free guidance. Plain torch modules only (no diffusers), so the network
exports to ONNX as is. Same-shape residual blocks and the self-attention layers carry
``autotune_prunable = True`` and can be skipped or reused as units (block caching); the deep branches
``deep0`` / ``deep1`` (everything below UNet level 0 / level 1, DeepCache's cached branch) carry
``autotune_cacheable = True`` and can be reused (their output shape differs from their input, or bypassing a
whole branch is not pruning, so they are not skippable). Also holds the small digits classifier whose
penultimate features serve for a Frechet distance. Weights live in ``models/weights/`` and are made by
``autotune.models.digits_train``.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autotune.errors import ModelError
from autotune.models.guidance import ClassifierFreeGuidance, with_guidance_unit
from autotune.models.registry import BuiltinModel, register
from autotune.sampling.denoiser import TorchDenoiser, fingerprint_module
from autotune.sampling.noise import NoiseSchedule, VPDiscrete, betas_for

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # label index of "no class" (classifier-free guidance)
SAMPLE_SHAPE = (1, 16, 16)
NOISE_CONFIG = {"beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
UNET_ARCH = {"channels": [32, 64, 64], "emb_dim": 128, "heads": 4, "groups": 8}
WEIGHTS_DIR = Path(__file__).parent / "weights"
UNET_FILE = "digits.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"


def digits_noise() -> VPDiscrete:
    """The model's noise schedule: diffusers' DDPM default (linear betas 1e-4..0.02, 1000 steps)."""
    c = NOISE_CONFIG
    betas = betas_for(c["beta_schedule"], c["num_train_timesteps"], c["beta_start"], c["beta_end"])
    return VPDiscrete.from_betas(betas)


def timestep_embedding(tm: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (cos, sin) of the model time, shape (batch, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=tm.dtype, device=tm.device) / half)
    args = tm[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the embedding added in between; prunable when cin == cout."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        self.autotune_prunable = cin == cout

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class SelfAttention(nn.Module):
    """Residual multi-head self-attention over the pixels (plain matmuls, ONNX friendly); prunable."""

    def __init__(self, ch: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.autotune_prunable = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, d, hgt * wid).unbind(1)
        attn = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(d), dim=-1)
        out = torch.einsum("bhij,bhdj->bhdi", attn, v).reshape(b, c, hgt, wid)
        return x + self.proj(out)


class DeepBranch(nn.Module):
    """The part of a UNet below one resolution level, as one module (DeepCache's cached branch): ``forward(h, emb)``
    takes the features after that level's down block and returns the features its up block consumes.

    It owns no parameters: it calls its UNet's ``deep_branch(level, h, emb)``, whose blocks stay registered on the
    UNet under their own names, so the state dict keys, the weights files and the fingerprint are unchanged.
    """

    autotune_cacheable = True

    def __init__(self, unet: "DigitsUNet", level: int) -> None:
        super().__init__()
        self._unet = (unet,)  # a tuple, not a submodule: the blocks are registered once, on the UNet
        self.level = level

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self._unet[0].deep_branch(self.level, h, emb)


class DigitsUNet(nn.Module):
    """Three-level UNet (16, 8, 4 px) with attention at 4 px; ``forward(x, model_time, labels) -> eps``.

    ``deep0`` is everything below level 0 (from ``down0``'s output to ``up0``'s input), ``deep1`` everything below
    level 1 (from ``down1``'s output to ``up1``'s input, inside ``deep0``): the units DeepCache reuses.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 64), emb_dim: int = 128, heads: int = 4,
                 groups: int = 8, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # the last row is the null class
        self.conv_in = nn.Conv2d(1, c0, 3, padding=1)
        self.down0 = ResBlock(c0, c0, emb_dim, groups)
        self.pool0 = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.down1 = ResBlock(c0, c1, emb_dim, groups)
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, emb_dim, groups)
        self.down2_attn = SelfAttention(c2, heads, groups)
        self.mid1 = ResBlock(c2, c2, emb_dim, groups)
        self.mid_attn = SelfAttention(c2, heads, groups)
        self.mid2 = ResBlock(c2, c2, emb_dim, groups)
        self.up2 = ResBlock(2 * c2, c2, emb_dim, groups)
        self.up2_attn = SelfAttention(c2, heads, groups)
        self.unpool2 = nn.Conv2d(c2, c2, 3, padding=1)
        self.up1 = ResBlock(c2 + c1, c1, emb_dim, groups)
        self.up1_extra = ResBlock(c1, c1, emb_dim, groups)
        self.unpool1 = nn.Conv2d(c1, c1, 3, padding=1)
        self.up0 = ResBlock(c1 + c0, c0, emb_dim, groups)
        self.up0_extra = ResBlock(c0, c0, emb_dim, groups)
        self.norm_out = nn.GroupNorm(groups, c0)
        self.conv_out = nn.Conv2d(c0, 1, 3, padding=1)
        self.deep0 = DeepBranch(self, 0)
        self.deep1 = DeepBranch(self, 1)

    def embed(self, tm: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Time MLP of the sinusoidal embedding plus the class embedding."""
        return self.time_mlp(timestep_embedding(tm, self.emb_dim)) + self.class_emb(labels)

    def forward(self, x: torch.Tensor, tm: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.embed(tm.to(x.dtype), labels)
        h0 = self.down0(self.conv_in(x), emb)
        h = self.deep0(h0, emb)
        h = self.up0_extra(self.up0(torch.cat([h, h0], 1), emb), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def deep_branch(self, level: int, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The network below ``level`` (0 or 1) on the features ``h`` after that level's down block."""
        if level == 0:
            h1 = self.down1(self.pool0(h), emb)
            h = self.deep1(h1, emb)
            h = self.up1_extra(self.up1(torch.cat([h, h1], 1), emb), emb)
            return self.unpool1(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h2 = self.down2_attn(self.down2(self.pool1(h), emb))
        h = self.mid2(self.mid_attn(self.mid1(h2, emb)), emb)
        h = self.up2_attn(self.up2(torch.cat([h, h2], 1), emb))
        return self.unpool2(F.interpolate(h, scale_factor=2.0, mode="nearest"))


def build_unet(arch: dict[str, Any] | None = None) -> DigitsUNet:
    """A freshly initialised DigitsUNet with the shipped architecture (or ``arch``)."""
    a = dict(UNET_ARCH, **(arch or {}))
    return DigitsUNet(tuple(a["channels"]), a["emb_dim"], a["heads"], a["groups"])


def check_labels(cond: Any, batch: int) -> torch.Tensor:
    """Class labels as a LongTensor of shape (batch,); an int or 0-d tensor is broadcast."""
    labels = torch.as_tensor(cond)
    if labels.dtype not in (torch.int64, torch.int32):
        raise ModelError(f"digits: cond must be integer class labels (0..9), got dtype {labels.dtype}")
    labels = labels.long()
    if labels.dim() == 0:
        labels = labels.expand(batch)
    if labels.shape != (batch,):
        raise ModelError(f"digits: cond must have shape ({batch},), got {tuple(labels.shape)}")
    # a traced or compiled graph cannot branch on values: engines check labels at their input instead
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if not tracing and batch and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
        raise ModelError(f"digits: class labels must be in 0..{NUM_CLASSES - 1}")
    return labels


class DigitsDenoiser(TorchDenoiser):
    """The Denoiser of the ``digits`` model: ``cond`` = class labels (None: unconditional), CFG by ``guidance``.

    ``noise``, ``parameterization``, ``config`` and ``round_time`` default to ``digits`` (DDPM steps, epsilon);
    ``digits-flow`` (models/digits_flow.py) passes its own, so both share the labels, CFG and data metrics.
    """

    def __init__(self, unet: DigitsUNet, noise: NoiseSchedule | None = None, *, parameterization: str = "epsilon",
                 config: dict[str, Any] | None = None, round_time: bool = True) -> None:
        noise = noise or digits_noise()
        config = config or {"name": "digits", "noise": NOISE_CONFIG, "parameterization": "epsilon", "arch": UNET_ARCH}
        super().__init__(unet, noise, parameterization, module=unet, round_time=round_time, config=config)
        self.cfg = ClassifierFreeGuidance(unet, torch.tensor(NULL_CLASS, dtype=torch.long))
        self.units = with_guidance_unit(self.units)  # the guidance direction is a reusable unit
        self.sample_shape = SAMPLE_SHAPE
        self.num_classes = NUM_CLASSES

    def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None, reuse=frozenset(), record=frozenset(),
                 cache=None):
        """eps for the batch at time t; conditional + unconditional in one batched forward when guided (a cached
        unit output then holds the doubled batch, and the calls that reuse it are guided alike)."""
        tm = self.model_time(x, t)
        labels = None if cond is None else check_labels(cond, x.shape[0]).to(x.device)
        return self.cfg.masked(self.module, x, tm, labels, guidance, skip, reuse, record, cache)

    def fingerprint(self) -> str:
        return fingerprint_module(self.module, self.config)

    def data_metrics(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """Frechet distance (``fd``) between the shipped classifier's features of the samples (clamped to
        [-1, 1], as images are) and of all 1797 real digits; ``class_acc``: share classified as asked."""
        whole = np.arange(samples.shape[0])[None]
        return {k: float(v[0]) for k, v in self.data_metric_draws(samples, labels, whole).items()}

    def data_metric_draws(self, samples: torch.Tensor, labels: torch.Tensor | None,
                          indices: np.ndarray) -> dict[str, np.ndarray]:
        """``data_metrics`` of each resample ``samples[row]`` for the rows of ``indices`` (a bootstrap's), the
        classifier run once on all the samples."""
        from autotune.evaluate.distribution import frechet_distance_draws

        clf, real_features = _classifier_and_real_features()
        x = samples.detach().float().clamp(-1.0, 1.0)
        with torch.no_grad():
            features = clf.features(x.to(next(clf.parameters()).dtype))
            f = features.double().numpy()
            out = {"fd": frechet_distance_draws(f, real_features, indices)}
            if labels is not None:
                correct = (clf.head(features).argmax(1) == labels.to(x.device)).double().numpy()
                out["class_acc"] = correct[indices].mean(1)
        return out


@functools.lru_cache(maxsize=1)
def _classifier_and_real_features() -> tuple["DigitsClassifier", Any]:
    """The shipped classifier and its features of the real digits (computed once per process)."""
    from autotune.models.digits_train import digits_data

    clf = load_classifier()
    real, _ = digits_data()
    with torch.no_grad():
        return clf, clf.features(real).double().numpy()


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with a ModelError naming the file when it is missing or bad."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path}: missing (train it with `python -m autotune.models.digits_train`, see its --model)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights_into(module: nn.Module, path: Path, dtype: torch.dtype) -> nn.Module:
    """Load ``path`` strictly into ``module``; returns it in eval mode, cast to ``dtype``, without grads."""
    try:
        module.load_state_dict(_load_state(path))
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not match the architecture ({e})") from None
    # channels-last convolution weights: oneDNN's CPU convolutions run the digits UNet's forward pass in 0.89x the time
    # and forward plus backward in 0.83-0.91x (1 thread, batch 128 / 512, the two layouts interleaved in one process);
    # outputs differ from the contiguous layout's by float rounding (4e-6). No effect on a module without 4-d weights.
    module = module.to(dtype).to(memory_format=torch.channels_last).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_digits(dtype: torch.dtype = torch.float32, weights_dir: str | Path | None = None) -> DigitsDenoiser:
    """The shipped ``digits`` Denoiser (EMA weights), in ``dtype``."""
    path = Path(weights_dir or WEIGHTS_DIR) / UNET_FILE
    return DigitsDenoiser(load_weights_into(build_unet(), path, dtype))


class DigitsClassifier(nn.Module):
    """Small CNN on 1x16x16 digits in [-1, 1]; ``features(x)`` is the 128-d penultimate layer."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 4 * 4, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (batch, 128), for Frechet distances."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class labels (batch,)."""
        with torch.no_grad():
            return self(x.to(next(self.parameters()).dtype)).argmax(1)


def load_classifier(dtype: torch.dtype = torch.float32, weights_dir: str | Path | None = None) -> DigitsClassifier:
    """The shipped digits classifier, in eval mode."""
    path = Path(weights_dir or WEIGHTS_DIR) / CLASSIFIER_FILE
    return load_weights_into(DigitsClassifier(), path, dtype)


def training_record(weights_dir: str | Path | None = None, name: str = "digits_train.json") -> dict[str, Any]:
    """The JSON record written next to the weights by the trainer."""
    path = Path(weights_dir or WEIGHTS_DIR) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: missing") from None


register(BuiltinModel("digits", load_digits, "class-conditional UNet on scikit-learn digits 16x16 (CFG)"))
