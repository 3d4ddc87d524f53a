"""Sample grids as PNG files (for looking at samples; never part of a metric)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from autotune.errors import AutotuneError


def to_grid(samples: torch.Tensor, columns: int | None = None, pad: int = 1) -> torch.Tensor:
    """(B, C, H, W) samples in [-1, 1] -> one (H', W', C) uint8 image, row-major."""
    if samples.dim() != 4 or samples.shape[1] not in (1, 3):
        raise AutotuneError(f"--png: samples of shape {tuple(samples.shape)} are not 1- or 3-channel images")
    b, c, h, w = samples.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    grid = torch.zeros(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    imgs = ((samples.float().clamp(-1, 1) + 1) * 127.5).round()
    for i in range(b):
        r, col = divmod(i, columns)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = imgs[i]
    return grid.permute(1, 2, 0).to(torch.uint8)


def save_grid(samples: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 4) -> Path:
    """Write a PNG grid of the samples, each pixel enlarged ``scale`` times."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with diffusers and matplotlib
        raise AutotuneError("--png needs Pillow: pip install pillow") from None
    grid = to_grid(samples, columns).numpy()
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
