"""A searched schedule's per-step unit masks (reuse, its forecast, skips) run inside a diffusers pipeline.

``AutotuneScheduler`` replays a schedule's steps, but a pipeline calls its whole network, so on its own it refuses
a schedule that reuses or skips units. :func:`apply_schedule` adds the network side: it installs the scheduler
(replaying the same steps) and replaces the pipeline UNet's ``forward`` with the branched forward of
``models/unet_branches.py`` (diffusers' own, bit for bit, written as DeepCache's nested branches) run under the
masks of the model call the scheduler expects next: the same plan, feature cache and forecasts as
``autotune sample``, so the pipeline computes what was searched and ends where ``autotune sample`` ends.

    >>> from diffusers import DDPMPipeline                                     # doctest: +SKIP
    >>> pipe = DDPMPipeline.from_pretrained("my-ddpm")                         # doctest: +SKIP
    >>> apply_schedule(pipe, "schedule.json")   # e.g. written by autotune search --reuse   # doctest: +SKIP
    >>> images = pipe(num_inference_steps=pipe.scheduler.num_inference_steps).images        # doctest: +SKIP

Covered: ``UNet2DModel`` pipelines (DDPMPipeline layout) whose layout has deep branches; the latent, SD3 and Flux
networks have no reusable units in autotune yet, and a schedule with masks is refused there in one line.
``remove_schedule`` puts the UNet's own forward back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from autotune.diffusers_scheduler import AutotuneScheduler
from autotune.errors import ModelError, SamplingError
from autotune.models.unet_branches import attach_branches, branched_forward
from autotune.sampling.coefficients import make_plan
from autotune.sampling.denoiser import FeatureCache, Units, cacheable_units, prunable_units, unit_masks, with_features
from autotune.sampling.reuse import without_masks
from autotune.space.fileformat import load
from autotune.space.schedule import Schedule

__all__ = ["apply_schedule", "remove_schedule"]


def apply_schedule(pipe: Any, schedule: Schedule | str | Path) -> AutotuneScheduler:
    """Make ``pipe`` run ``schedule`` (a Schedule or a schedule file) with its unit masks; returns the scheduler it
    installed as ``pipe.scheduler``. A schedule without masks only installs the scheduler.

    Raises:
        ModelError: the pipeline's network is not a UNet2DModel whose layout has deep branches (masks only).
        ScheduleError: a unit the UNet does not have, or an invalid schedule file.
    """
    source = None
    if not isinstance(schedule, Schedule):
        source = str(schedule)
        schedule = load(schedule)
    scheduler = AutotuneScheduler.from_schedule(without_masks(schedule), pipe.scheduler.config)
    masked = schedule.units_used or schedule.units_reused
    unet = getattr(pipe, "unet", None)
    if masked:
        if unet is None or type(unet).__name__ != "UNet2DModel" or not attach_branches(unet):
            kind = type(unet if unet is not None else getattr(pipe, "transformer", pipe)).__name__
            raise ModelError(f"apply_schedule: {source or 'the schedule'} skips or reuses units, which autotune runs "
                             f"in a UNet2DModel pipeline (DDPMPipeline layout) only; this pipeline's network is a "
                             f"{kind}")
        schedule.check_units(Units(prunable_units(unet), cacheable_units(unet)))
    pipe.scheduler = scheduler
    remove_schedule(pipe)  # a schedule applied before: this one replaces it
    if masked:
        calls = make_plan(schedule, scheduler.noise).calls
        unet.forward = _MaskedForward(unet, pipe, scheduler, calls)
    return scheduler


def remove_schedule(pipe: Any) -> None:
    """Put the pipeline UNet's own forward back (the scheduler stays)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None and isinstance(unet.__dict__.get("forward"), _MaskedForward):
        del unet.forward


class _MaskedForward:
    """``UNet2DModel.forward`` for one applied schedule: the masks of the call the scheduler expects next."""

    def __init__(self, unet: Any, pipe: Any, scheduler: AutotuneScheduler, calls: tuple) -> None:
        self.unet, self.pipe, self.scheduler, self.calls = unet, pipe, scheduler, calls
        self.cache = FeatureCache()

    def __call__(self, sample: torch.Tensor, timestep: Any, class_labels: Any = None, return_dict: bool = True):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        if self.pipe.scheduler is not self.scheduler:
            raise SamplingError("apply_schedule: the pipeline's scheduler was replaced since the schedule was applied; "
                                "call apply_schedule again (or remove_schedule for the plain UNet)")
        if class_labels is not None:
            raise SamplingError("apply_schedule: class labels are not supported (this UNet has no class embedding)")
        k = self.scheduler.next_call
        if k >= len(self.calls):
            raise SamplingError(f"apply_schedule: the UNet was called more often than the schedule's "
                                f"{len(self.calls)} model evaluations in one run (call set_timesteps to start again)")
        if k == 0:
            self.cache = FeatureCache()  # a new run
        ins = self.calls[k]
        unet = self.unet

        def run() -> torch.Tensor:
            with unit_masks(unet, ins.skip, ins.reuse, ins.record, self.cache):
                return branched_forward(unet, sample, timestep)

        out = with_features(ins, ins.time, self.cache, run) if (ins.reuse or ins.record) else run()
        return UNet2DOutput(sample=out) if return_dict else (out,)
