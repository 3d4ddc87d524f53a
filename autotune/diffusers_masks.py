"""A searched schedule's per-step unit masks (reuse, its forecast, skips) run inside a diffusers pipeline.

``AutotuneScheduler`` replays a schedule's steps, but a pipeline calls its whole network, so on its own it refuses
a schedule that reuses or skips units. :func:`apply_schedule` adds the network side: it installs the scheduler
(replaying the same steps) and registers one hook (``HOOK``) in the network's diffusers ``HookRegistry``, the
mechanism of diffusers' own cache, offloading and layer-skip hooks, whose forward is the network's run under the
masks of the model call the scheduler expects next (a UNet2DModel's with the branched forward of
``models/unet_branches.py``: diffusers' own, bit for bit, written as DeepCache's nested branches): the same plan,
feature cache and forecasts as ``autotune sample``, so the pipeline computes what was searched and ends where
``autotune sample`` ends. Hooks and forward wrappers set before (accelerate's offload hook) run inside it, under
the masks; a UNet2DModel's branched forward does not call them.

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
one line. ``remove_schedule`` takes the hook off (other hooks stay). diffusers' own cache hooks are not used for
the masks: they take one rule for every step, where a searched schedule changes its masks call by call.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch

from autotune.diffusers_scheduler import AutotuneScheduler
from autotune.errors import ModelError, SamplingError
from autotune.models.transformer_units import mark_transformer_blocks
from autotune.models.unet_branches import attach_branches, branched_forward
from autotune.sampling.coefficients import make_plan
from autotune.models.guidance import with_guidance_unit
from autotune.sampling.denoiser import (FeatureCache, Units, cacheable_units, map_features, prunable_units, unit_masks,
                                        with_features)
from autotune.sampling.reuse import without_masks
from autotune.space.fileformat import load
from autotune.space.schedule import GUIDANCE_UNIT, Schedule

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
        units = Units(prunable_units(network), cacheable_units(network))
        # the guidance direction: the pipelines with classifier-free guidance (a UNet2DModel pipeline has none)
        schedule.check_units(with_guidance_unit(units) if type(network).__name__ in OWN_FORWARD else units)
        registry = _registry(network)  # refused before anything changes on a diffusers without one
    pipe.scheduler = scheduler
    remove_schedule(pipe)  # a schedule applied before: this one replaces it
    if masked:
        calls = make_plan(schedule, scheduler.noise).calls
        registry.register_hook(_schedule_hook()(network, pipe, scheduler, calls), HOOK)
    return scheduler


def remove_schedule(pipe: Any) -> None:
    """Take the schedule's hook off the pipeline network (the scheduler stays); the network's forward is then the
    chain of the hooks it had before (diffusers' or accelerate's), or its own."""
    network = _network(pipe)
    registry = getattr(network, "_diffusers_hook", None) if network is not None else None
    hook = registry.get_hook(HOOK) if registry is not None else None
    if hook is not None:
        registry.remove_hook(HOOK, recurse=False)
        if not hook.instance_forward and not registry.hooks:
            # the registry put the class's bound forward on the instance: nothing was there before us
            network.__dict__.pop("forward", None)


_NO_NEGATIVE = ("apply_schedule: the schedule reuses the guidance direction, but the pipeline does not call its "
                "transformer once for the prompt and once for a negative prompt per step (true_cfg_scale > 1)")
HOOK = "autotune_schedule"  # the name of apply_schedule's hook in the network's diffusers HookRegistry


def _registry(network: Any) -> Any:
    """The network's diffusers HookRegistry (created when it has none): the masks run as one hook in it, so they
    compose with diffusers' own hooks (offloading, layerwise casting) and with a forward wrapper set before."""
    try:
        from diffusers.hooks import HookRegistry
    except ImportError as e:
        raise ModelError(f"apply_schedule: running unit masks in a pipeline needs diffusers >= 0.33 (its "
                         f"HookRegistry); this one has none ({e})") from None
    return HookRegistry.check_if_exists_or_initialize(network)


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


@functools.lru_cache(maxsize=None)
def _schedule_hook() -> type:
    """The hook class (diffusers is imported only when a schedule with masks is applied)."""
    from diffusers.hooks import ModelHook

    class ScheduleHook(ModelHook):
        """The network's forward for one applied schedule: the masks of the call the scheduler expects next.

        A UNet2DModel runs its branched forward (its deep branches are units; it does not call the forward below
        it in the chain); a transformer or UNet2DConditionModel the forward below it (its own, or the hooks and
        wrappers set before) under the masks. Calls at the same step after the first (FluxPipeline's true-CFG
        negative prompt) are further branches of the batch: each branch has its own feature cache, as the halves of
        ``autotune sample``'s one batched call do."""

        def __init__(self, network: Any, pipe: Any, scheduler: AutotuneScheduler, calls: tuple) -> None:
            super().__init__()
            self.pipe, self.scheduler, self.calls = pipe, scheduler, calls
            # a forward set on the instance before (a wrapper, or diffusers' hook chain): remove_schedule keeps it
            self.instance_forward = "forward" in network.__dict__
            self.unet = type(network).__name__ == "UNet2DModel"
            self.caches: list[FeatureCache] = []  # one per branch of the batch
            self.run: Any = None  # the scheduler's run state the caches belong to
            self.last_call, self.branch = -1, 0
            self.separate_cfg = type(network).__name__ == "FluxTransformer2DModel"  # true CFG: two calls per step
            self.positive: Any = None  # the prompt's output of this step (FluxPipeline's true CFG)

        def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            if self.pipe.scheduler is not self.scheduler:
                raise SamplingError("apply_schedule: the pipeline's scheduler was replaced since the schedule was "
                                    "applied; call apply_schedule again (or remove_schedule for the plain network)")
            k = self.scheduler.next_call
            if k >= len(self.calls):
                raise SamplingError(f"apply_schedule: the network was called more often than the schedule's "
                                    f"{len(self.calls)} model evaluations in one run (call set_timesteps to start "
                                    f"again)")
            if self.scheduler._state is not self.run:  # set_timesteps started a new run
                self.run, self.caches, self.last_call, self.positive = self.scheduler._state, [], -1, None
            self.branch = self.branch + 1 if k == self.last_call else 0
            self.last_call = k
            while len(self.caches) <= self.branch:
                self.caches.append(FeatureCache())
            cache, ins = self.caches[self.branch], self.calls[k]
            if GUIDANCE_UNIT in ins.reuse | ins.record:
                return self._guidance_call(module, ins, cache, args, kwargs)

            def run() -> Any:
                with unit_masks(module, ins.skip, ins.reuse, ins.record, cache):
                    return self._forward(module, *args, **kwargs)

            return with_features(ins, ins.time, cache, run) if (ins.reuse or ins.record) else run()

        def _guidance_call(self, module: Any, ins: Any, cache: FeatureCache, args: tuple, kwargs: dict) -> Any:
            """A call that reuses or records the guidance direction (``GUIDANCE_UNIT``, models/guidance.py), as the
            executor's: a reusing step computes the prompt's output alone and gives the pipeline, as the negative
            prompt's, that output less the cached direction (its guidance ``neg + g (pos - neg)`` is then
            ``pos + (g - 1) direction``); a recording step computes both and caches ``pos - neg``. The other units
            of a reusing step read the prompt's half of their cached outputs and record nothing."""
            others = dataclasses.replace(ins, reuse=ins.reuse - {GUIDANCE_UNIT}, record=frozenset()
                                         if GUIDANCE_UNIT in ins.reuse else ins.record - {GUIDANCE_UNIT})
            if self.separate_cfg:  # FluxPipeline's true CFG: the prompt's call, then the negative prompt's
                if self.branch == 0:
                    if self.positive is not None:
                        raise SamplingError(_NO_NEGATIVE)
                    out = self._masked(module, others, cache, args, kwargs)
                    self.positive = _sample_of(out)
                    return out
                if self.branch != 1 or self.positive is None:
                    raise SamplingError(_NO_NEGATIVE)
                positive, self.positive = self.positive, None
                if GUIDANCE_UNIT in ins.reuse:
                    direction = dataclasses.replace(ins, reuse=frozenset({GUIDANCE_UNIT}), record=frozenset())
                    return with_features(direction, ins.time, cache,
                                         lambda: _with_sample(kwargs, positive - cache[GUIDANCE_UNIT]))

                def record_direction() -> Any:
                    out = self._masked_run(module, others, cache, args, kwargs)
                    cache[GUIDANCE_UNIT] = positive - _sample_of(out)
                    return out

                return with_features(ins, ins.time, cache, record_direction)
            if not getattr(self.pipe, "do_classifier_free_guidance", False):
                raise SamplingError("apply_schedule: the schedule reuses the guidance direction, but the pipeline "
                                    "runs without classifier-free guidance (guidance_scale > 1)")
            if GUIDANCE_UNIT in ins.reuse:
                def reuse_direction() -> Any:
                    batch = _input_of(args, kwargs).shape[0]  # diffusers' CFG batch: negative prompt first
                    half = {u: map_features(lambda f: f[batch // 2:], cache[u]) for u in others.reuse if u in cache}
                    with unit_masks(module, others.skip, others.reuse, (), half):
                        out = self._forward(module, *_second_half(args, batch), **_second_half(kwargs, batch))
                    positive = _sample_of(out)
                    return _replace_sample(out, torch.cat([positive - cache[GUIDANCE_UNIT], positive]))

                return with_features(ins, ins.time, cache, reuse_direction)

            def record_direction() -> Any:
                out = self._masked_run(module, others, cache, args, kwargs)
                negative, positive = _sample_of(out).chunk(2)
                cache[GUIDANCE_UNIT] = positive - negative
                return out

            return with_features(ins, ins.time, cache, record_direction)

        def _masked_run(self, module: Any, ins: Any, cache: FeatureCache, args: tuple, kwargs: dict) -> Any:
            with unit_masks(module, ins.skip, ins.reuse, ins.record, cache):
                return self._forward(module, *args, **kwargs)

        def _masked(self, module: Any, ins: Any, cache: FeatureCache, args: tuple, kwargs: dict) -> Any:
            run = functools.partial(self._masked_run, module, ins, cache, args, kwargs)
            return with_features(ins, ins.time, cache, run) if (ins.reuse or ins.record) else run()

        def _forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.unet:
                return self.fn_ref.original_forward(*args, **kwargs)
            from diffusers.models.unets.unet_2d import UNet2DOutput

            return_dict = kwargs.pop("return_dict", True)
            params = dict(zip(("sample", "timestep", "class_labels"), args), **kwargs)
            if params.get("class_labels") is not None:
                raise SamplingError("apply_schedule: class labels are not supported (this UNet has no class "
                                    "embedding)")
            out = branched_forward(module, params["sample"], params["timestep"])
            return UNet2DOutput(sample=out) if return_dict else (out,)

    return ScheduleHook


def _sample_of(out: Any) -> torch.Tensor:
    """The batched tensor of a network's output: itself, a tuple's first element or ``.sample``."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, tuple) else out.sample


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The batched input of a network call: its first positional argument, or ``sample`` / ``hidden_states``."""
    if args:
        return args[0]
    return kwargs["sample"] if "sample" in kwargs else kwargs["hidden_states"]


def _replace_sample(out: Any, sample: torch.Tensor) -> Any:
    """``out`` with its batched tensor replaced (a tensor, a tuple's first element, or an output's ``sample``)."""
    if isinstance(out, torch.Tensor):
        return sample
    if isinstance(out, tuple):
        return (sample,) + tuple(out[1:])
    return dataclasses.replace(out, sample=sample)


def _with_sample(kwargs: dict, sample: torch.Tensor) -> Any:
    """What the network returns for an output tensor ``sample``, in the form the call asked for (``return_dict``)."""
    if kwargs.get("return_dict", True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
    return (sample,)


def _second_half(value: Any, batch: int) -> Any:
    """The prompt's half of a CFG call's inputs: every tensor batched along dimension 0 (``batch`` rows), in tuples,
    lists and dicts (``added_cond_kwargs``), sliced to its second half; everything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value[batch // 2:] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _second_half(v, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_second_half(v, batch) for v in value)
    return value
