"""A diffusers transformer's blocks as units a schedule may skip or reuse (SD3's JointTransformerBlock, Flux's
double- and single-stream blocks).

A block on the residual stream maps ``(hidden_states, encoder_hidden_states)`` to the updated pair, returned as
``(encoder_hidden_states, hidden_states)`` (None in place of the text stream where a block has no text output:
SD3's last block). Copying a block's old *output* would throw away what the blocks before it computed in this
step, so a transformer block caches its *residual* (output minus input) and a reusing call adds it to the
current inputs, as FORA and TeaCache do (``sampling.denoiser.caching``); skipping the block adds nothing. Reusing
every block from the second on is FirstBlockCache's reuse of the stack's residual. The marks are attributes on
the block instances only: weights, state dict and fingerprint are unchanged.
"""

from __future__ import annotations

import inspect

from torch import nn

STACKS = ("transformer_blocks", "single_transformer_blocks")  # SD3 has the first, Flux both
RESIDUAL_STREAM = ("encoder_hidden_states", "hidden_states")  # the outputs' order, named by the inputs they update

__all__ = ["mark_transformer_blocks"]


def mark_transformer_blocks(transformer: nn.Module) -> tuple[str, ...]:
    """Flag each block of ``transformer``'s stacks as a prunable residual unit; returns their names."""
    names = []
    for stack in STACKS:
        for i, block in enumerate(getattr(transformer, stack, None) or ()):
            params = inspect.signature(type(block).forward).parameters
            # older diffusers' Flux single-stream block takes and returns the joined stream only
            block.autotune_residual = RESIDUAL_STREAM if "encoder_hidden_states" in params else "hidden_states"
            block.autotune_prunable = True
            names.append(f"{stack}.{i}")
    return tuple(names)
