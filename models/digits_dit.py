"""Built-in model ``digits-dit``: a small diffusion transformer (DiT) on ``digits``, trained as a rectified flow
with CFG: the transformer counterpart of ``digits-flow`` for what transformers change (block reuse).

Same task, objective, time input (t * 1000), labels (0..9, null class 10) and data metrics as ``digits-flow``;
the network is a DiT (Peebles & Xie, 2023) instead of a UNet: the 16x16 image in 2x2 patches (64 tokens of width
96, learned positions), 8 blocks of self-attention and an MLP on the residual stream, each modulated by the time +
class embedding through adaLN-Zero, with PixArt-alpha's adaLN-single (one shared projection of the embedding plus
a learned per-block offset keeps the weights under 4 MB). Pre-norm blocks without a skip path are what SD3's and
Flux's transformers are made of, so block reuse is measured here as it would be there.

Units: each block ``blocks.K`` is a residual unit (``autotune_residual``: skipping it adds nothing, reusing it adds
the residual it added at the last call that computed it), and ``rest1`` .. ``rest7``, the blocks from K on as one
parameter-free unit (reusing ``rest1`` is FirstBlockCache's reuse of the whole stack after the first block).
Weights are made by ``python -m autotune.models.digits_train --model digits-dit``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autotune.models.digits import NUM_CLASSES, WEIGHTS_DIR, load_weights_into, timestep_embedding
from autotune.models.digits_flow import DigitsFlowDenoiser
from autotune.models.registry import BuiltinModel, register

DIT_FILE = "digits_dit.safetensors"
TRAIN_RECORD = "digits_dit_train.json"
DIT_ARCH = {"width": 96, "depth": 8, "heads": 4, "patch": 2, "mlp_ratio": 4}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm attention and MLP, each gated (adaLN-Zero); ``forward(x, mod)`` with ``mod`` (B, 6, width): shift,
    scale and gate of the attention, then of the MLP. A residual unit: its output is ``x`` plus what it adds."""

    autotune_prunable = True
    autotune_residual = "x"

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        self.offset = nn.Parameter(torch.zeros(6, width))  # adaLN-single: this block's offset to the shared one

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod + self.offset).unbind(1)
        b, n, c = x.shape
        d = c // self.heads
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).reshape(b, n, 3, self.heads, d).permute(
            2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # plain matmuls: ONNX friendly
        h = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + gate1[:, None] * self.proj(h)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class BlockSpan(nn.Module):
    """Blocks ``first`` .. last of a DiT as one residual unit; owns no parameters (the blocks stay registered on
    the DiT under their own names: state dict, weights files and fingerprint are unchanged)."""

    autotune_prunable = True
    autotune_residual = "x"

    def __init__(self, dit: "DigitsDiT", first: int) -> None:
        super().__init__()
        self._dit = (dit,)  # a tuple, not a submodule: the blocks are registered once, on the DiT
        self.first = first

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        return self._dit[0].run_blocks(self.first, x, mod)


class DigitsDiT(nn.Module):
    """``forward(x, model_time, labels) -> velocity`` for (B, 1, 16, 16) images."""

    def __init__(self, width: int = 96, depth: int = 8, heads: int = 4, patch: int = 2, mlp_ratio: int = 4,
                 num_classes: int = NUM_CLASSES, size: int = 16) -> None:
        super().__init__()
        self.width, self.patch, self.size = width, patch, size
        tokens = (size // patch) ** 2
        self.patch_in = nn.Linear(patch * patch, width)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.class_emb = nn.Embedding(num_classes + 1, width)  # the last row is the null class
        self.adaln = nn.Linear(width, 6 * width)  # adaLN-single: shared by every block
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_mod = nn.Linear(width, 2 * width)
        self.patch_out = nn.Linear(width, patch * patch)
        for k in range(1, depth):
            setattr(self, f"rest{k}", BlockSpan(self, k))
        self._zero_init()

    def _zero_init(self) -> None:
        """adaLN-Zero: every block starts as the identity and the output at zero."""
        for m in (self.adaln, self.out_mod, self.patch_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def run_blocks(self, first: int, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """Blocks ``first`` .. last on the tokens ``x`` (block ``first`` + 1 on is the span ``rest<first + 1>``)."""
        if first + 1 < len(self.blocks):
            return getattr(self, f"rest{first + 1}")(self.blocks[first](x, mod), mod)
        return self.blocks[first](x, mod)

    def forward(self, x: torch.Tensor, tm: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, p, s = x.shape[0], self.patch, self.size
        tokens = x.reshape(b, s // p, p, s // p, p).permute(0, 1, 3, 2, 4).reshape(b, (s // p) ** 2, p * p)
        emb = self.time_mlp(timestep_embedding(tm.to(x.dtype), self.width)) + self.class_emb(labels)
        mod = self.adaln(F.silu(emb)).reshape(b, 6, self.width)
        h = self.run_blocks(0, self.patch_in(tokens) + self.pos, mod)
        shift, scale = self.out_mod(F.silu(emb)).chunk(2, dim=1)
        out = self.patch_out(modulate(self.norm_out(h), shift, scale))
        return out.reshape(b, s // p, s // p, p, p).permute(0, 1, 3, 2, 4).reshape(b, 1, s, s)


def build_dit(arch: dict[str, Any] | None = None) -> DigitsDiT:
    """A freshly initialised DigitsDiT with the shipped architecture (or ``arch``)."""
    a = dict(DIT_ARCH, **(arch or {}))
    return DigitsDiT(a["width"], a["depth"], a["heads"], a["patch"], a["mlp_ratio"])


def load_digits_dit(dtype: torch.dtype = torch.float32, weights_dir: str | Path | None = None) -> DigitsFlowDenoiser:
    """The shipped ``digits-dit`` Denoiser (EMA weights, read with safetensors), in ``dtype``: the flow Denoiser of
    ``digits-flow`` around the DiT."""
    path = Path(weights_dir or WEIGHTS_DIR) / DIT_FILE
    return DigitsFlowDenoiser(load_weights_into(build_dit(), path, dtype), "digits-dit", DIT_ARCH)


register(BuiltinModel("digits-dit", load_digits_dit,
                      "a small DiT on digits as a rectified flow (velocity, t * 1000), class-conditional (CFG)"))
