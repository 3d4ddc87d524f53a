"""DeepCache's cached branches for a diffusers ``UNet2DModel``: the UNet below each resolution level as one
module, so a schedule can reuse it (``reuse: ["deep0"]``) like the ``digits`` UNet's ``deep0`` / ``deep1``.

DeepCache (Ma, Fang, Wang, CVPR 2024) notices that a UNet's deep features change little between adjacent steps:
a cached step runs only the shallow path (the first down block, the skip connection, the last up block) on the
deep features the last full step computed. ``deep<L>`` is everything below level ``L``: from the output of
``down_blocks[L]`` (after its downsampler) to the input of the up block that mirrors it. Nested: ``deep1`` runs
inside ``deep0``, so reusing ``deep1`` still runs level 1 at every call.

The branches are attached to the UNet as submodules without parameters (the blocks stay registered under their
own names: the state dict, the weights files and the fingerprint are unchanged), and :func:`branched_forward`
is ``UNet2DModel.forward`` with the down/mid/up loop written as those nested branches: the same operations in
the same order, so its output equals diffusers' bit for bit (``tests/test_unet_branches.py``). Only the
layouts that loop covers get branches (:func:`branch_levels` says why not otherwise): standard down/up blocks
(no ``skip_conv`` blocks of the score-SDE variants), a downsampler on every down block but the last, no class
embedding, positional or Fourier time embedding; anything else keeps diffusers' own forward and no deep units.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEEP_PREFIX = "deep"


class UNetDeepBranch(nn.Module):
    """The UNet below ``level``: ``forward(h, emb)`` takes the output of ``down_blocks[level]`` and returns the
    input of the up block that mirrors ``down_blocks[level]``. Owns no parameters (the UNet is held in a tuple)."""

    autotune_cacheable = True

    def __init__(self, unet: nn.Module, level: int) -> None:
        super().__init__()
        self._unet = (unet,)
        self.level = level

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        unet = self._unet[0]
        n = len(unet.down_blocks)
        below = self.level + 1
        inner, res = unet.down_blocks[below](hidden_states=h, temb=emb)
        # the skip connections the mirroring up block reads: the downsampled input, then this level's resnets
        res = (h,) + tuple(res)
        if below < n - 1:  # this block's downsampler output feeds the next branch, which pairs it itself
            res = res[:-1]
            inner = getattr(unet, f"{DEEP_PREFIX}{below}")(inner, emb)
        elif unet.mid_block is not None:
            inner = unet.mid_block(inner, emb)
        return unet.up_blocks[n - 2 - self.level](inner, res, emb)


def branch_levels(unet: nn.Module) -> tuple[int, str]:
    """How many deep branches ``unet`` can have (levels 0 .. n-2 of its n down blocks), or 0 and the reason."""
    if type(unet).__name__ != "UNet2DModel":
        return 0, f"{type(unet).__name__} is not a UNet2DModel"
    config = unet.config
    downs, ups = list(unet.down_blocks), list(unet.up_blocks)
    if len(downs) < 2 or len(ups) != len(downs):
        return 0, "fewer than two resolution levels"
    if getattr(unet, "class_embedding", None) is not None:
        return 0, "a class embedding (conditioning this loader does not pass)"
    if any(hasattr(b, "skip_conv") for b in downs + ups):
        return 0, "skip-sample blocks (score-SDE layout)"
    for i, block in enumerate(downs):
        has_down = getattr(block, "downsamplers", None) is not None
        if has_down != (i < len(downs) - 1):
            return 0, "a down block layout other than one downsampler per level but the last"
    for j, block in enumerate(ups):  # each up block reads its level's resnets plus one more skip connection
        if len(block.resnets) != len(downs[len(downs) - 1 - j].resnets) + 1:
            return 0, "up blocks that do not mirror the down blocks"
    if config.get("time_embedding_type", "positional") not in ("positional", "fourier", "learned"):
        return 0, f"time embedding {config.get('time_embedding_type')!r}"
    return len(downs) - 1, ""


def attach_branches(unet: nn.Module) -> tuple[str, ...]:
    """Attach ``deep0`` .. ``deep<n-2>`` to ``unet`` (idempotent); their names, or () where the layout is not
    covered (the UNet is then left as it was)."""
    levels, _ = branch_levels(unet)
    names = []
    for level in range(levels):
        name = f"{DEEP_PREFIX}{level}"
        if not isinstance(getattr(unet, name, None), UNetDeepBranch):
            unet.add_module(name, UNetDeepBranch(unet, level))
        names.append(name)
    return tuple(names)


def branched_forward(unet: nn.Module, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
    """``UNet2DModel.forward(sample, timestep).sample`` with the levels below 0 run as ``unet.deep0`` (which a
    schedule may reuse). Needs :func:`attach_branches` to have attached the branches."""
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
    elif timesteps.dim() == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    sample = unet.conv_in(sample)
    h, res = unet.down_blocks[0](hidden_states=sample, temb=emb)
    res = (sample,) + tuple(res)[:-1]  # the level's own skip connections; its downsampled output goes deeper
    h = unet.deep0(h, emb)
    out = unet.up_blocks[-1](h, res, emb)
    out = unet.conv_out(unet.conv_act(unet.conv_norm_out(out)))
    if unet.config.time_embedding_type == "fourier":
        out = out / timesteps.reshape((out.shape[0],) + (1,) * (out.dim() - 1))
    return out
