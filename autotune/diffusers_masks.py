"""A searched schedule's per-step unit masks (reuse, its forecast, skips) run inside a diffusers pipeline.

``AutotuneScheduler`` replays a schedule's steps, but a pipeline calls its whole network, so on its own it refuses
a schedule that reuses or skips units. :func:`apply_schedule` adds the network side: it installs the scheduler
(replaying the same steps) and replaces the pipeline network's ``forward`` (a UNet2DModel's with the branched
forward of ``models/unet_branches.py``: diffusers' own, bit for bit, written as DeepCache's nested branches) run under
the masks of the model call the scheduler expects next: the same plan, feature cache and forecasts as
``autotune sample``, so the pipeline computes what was searched and ends where ``autotune sample`` ends.

    >>> from diffusers import DDPMPipeline                                     # doctest: +SKIP
    >>> pipe = DDPMPipeline.from_pretrained("my-ddpm")                         # doctest: +SKIP
    >>> apply_schedule(pipe, "schedule.json")   # e.g. written by autotune search --reuse   # doctest: +SKIP
    >>> images = pipe(num_inference_steps=pipe.scheduler.num_inference_steps).images        # doctest: +SKIP

Covered: ``UNet2DModel`` pipelines (DDPMPipeline layout) whose layout has deep branches, the latent UNet pipelines
(SD 1.x / 2.x, SDXL: the UNet2DConditionModel's same-shape residual blocks and attentions are its units) and the
transformer pipelines (``StableDiffusion3Pipeline``, ``FluxPipeline``), whose blocks are residual units
(``models/transformer_units.py``): those networks' own forward runs under the masks. A FluxPipeline with true
CFG calls its transformer twice per step (prompt, then negative prompt) where ``autotune sample`` runs one batched
call; each of the two calls keeps its own feature cache, which computes the same. Other networks are refused in
one line. ``remove_schedule`` puts the network's own forward back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autotune.diffusers_scheduler import AutotuneScheduler
from autotune.errors import ModelError, SamplingError
from autotune.models.transformer_units import mark_transformer_blocks
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
        ModelError: the pipeline's network is none of those covered (module docstring), or has no units (masks only).
        ScheduleError: a unit the network does not have, or an invalid schedule file.
    """
    source = None
    if not isinstance(schedule, Schedule):
        source = str(schedule)
        schedule = load(schedule)
    scheduler = AutotuneScheduler.from_schedule(without_masks(schedule), pipe.scheduler.config)
    masked = schedule.units_used or schedule.units_reused
    network = _network(pipe)
    if masked:
        if network is None or not _prepare(network):
            kind = type(network if network is not None else pipe).__name__
            raise ModelError(f"apply_schedule: {source or 'the schedule'} skips or reuses units, which autotune "
                             f"runs in UNet2DModel (DDPMPipeline layout), SD 1.x / SDXL, SD3 and Flux pipelines; this "
                             f"pipeline's network is a {kind}")
        schedule.check_units(Units(prunable_units(network), cacheable_units(network)))
    pipe.scheduler = scheduler
    remove_schedule(pipe)  # a schedule applied before: this one replaces it
    if masked:
        calls = make_plan(schedule, scheduler.noise).calls
        network.forward = _MaskedForward(network, pipe, scheduler, calls)
    return scheduler


def remove_schedule(pipe: Any) -> None:
    """Put the pipeline network's forward back as it was before :func:`apply_schedule` (the scheduler stays)."""
    network = _network(pipe)
    masked = network.__dict__.get("forward") if network is not None else None
    if isinstance(masked, _MaskedForward):
        if masked.previous is None:
            del network.forward
        else:  # a wrapper someone installed before us (accelerate's offload hook sets one): theirs again
            network.forward = masked.previous


def _network(pipe: Any) -> Any:
    """The pipeline's denoising network: its ``unet`` or ``transformer``."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else getattr(pipe, "transformer", None)


def _prepare(network: Any) -> bool:
    """Give ``network`` the units autotune names (a UNet2DModel's deep branches, a transformer's blocks; a
    UNet2DConditionModel's residual blocks and attentions need nothing); False when it is not a network whose masked
    forward autotune runs."""
    kind = type(network).__name__
    if kind == "UNet2DModel":
        return bool(attach_branches(network))
    if kind in OWN_FORWARD:
        mark_transformer_blocks(network)  # a UNet2DConditionModel has no block stacks: its units are its own
        return bool(prunable_units(network))
    return False


# networks whose own forward runs under the masks (a UNet2DModel runs the branched forward of its deep branches)
OWN_FORWARD = ("SD3Transformer2DModel", "FluxTransformer2DModel", "UNet2DConditionModel")


class _MaskedForward:
    """The network's forward for one applied schedule: the masks of the call the scheduler expects next.

    A UNet2DModel runs its branched forward (its deep branches are units); a transformer its own forward (its blocks
    are). Calls at the same step after the first (FluxPipeline's true-CFG negative prompt) are further branches of
    the batch: each branch has its own feature cache, as the halves of ``autotune sample``'s one batched call do."""

    def __init__(self, network: Any, pipe: Any, scheduler: AutotuneScheduler, calls: tuple) -> None:
        self.network, self.pipe, self.scheduler, self.calls = network, pipe, scheduler, calls
        # a forward already set on the instance (accelerate's offload hook): a network that runs its own forward
        # calls it under the masks; a UNet2DModel runs the branched forward, which does not call it
        self.previous = network.__dict__.get("forward")
        self.unet = type(network).__name__ == "UNet2DModel"
        self.caches: list[FeatureCache] = []  # one per branch of the batch
        self.run: Any = None  # the scheduler's run state the caches belong to
        self.last_call, self.branch = -1, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipe.scheduler is not self.scheduler:
            raise SamplingError("apply_schedule: the pipeline's scheduler was replaced since the schedule was applied; "
                                "call apply_schedule again (or remove_schedule for the plain network)")
        k = self.scheduler.next_call
        if k >= len(self.calls):
            raise SamplingError(f"apply_schedule: the network was called more often than the schedule's "
                                f"{len(self.calls)} model evaluations in one run (call set_timesteps to start again)")
        if self.scheduler._state is not self.run:  # set_timesteps started a new run
            self.run, self.caches, self.last_call = self.scheduler._state, [], -1
        self.branch = self.branch + 1 if k == self.last_call else 0
        self.last_call = k
        while len(self.caches) <= self.branch:
            self.caches.append(FeatureCache())
        cache, ins, network = self.caches[self.branch], self.calls[k], self.network

        def run() -> Any:
            with unit_masks(network, ins.skip, ins.reuse, ins.record, cache):
                return self._forward(*args, **kwargs)

        return with_features(ins, ins.time, cache, run) if (ins.reuse or ins.record) else run()

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.unet:
            if self.previous is not None:
                return self.previous(*args, **kwargs)
            return type(self.network).forward(self.network, *args, **kwargs)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return_dict = kwargs.pop("return_dict", True)
        params = dict(zip(("sample", "timestep", "class_labels"), args), **kwargs)
        if params.get("class_labels") is not None:
            raise SamplingError("apply_schedule: class labels are not supported (this UNet has no class embedding)")
        out = branched_forward(self.network, params["sample"], params["timestep"])
        return UNet2DOutput(sample=out) if return_dict else (out,)
