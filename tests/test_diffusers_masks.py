"""apply_schedule: a DDPMPipeline runs a schedule's reuse (copied or forecast) and skip masks and ends where the
executor ends on the same noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from autotune.diffusers_masks import apply_schedule, remove_schedule  # noqa: E402
from autotune.errors import ModelError, SamplingError, ScheduleError  # noqa: E402
from autotune.models.diffusers_dir import load_pipeline_dir  # noqa: E402
from autotune.sampling.executor import sample  # noqa: E402
from autotune.sampling.named import build  # noqa: E402
from autotune.sampling.reuse import deepcache  # noqa: E402
from autotune.space.fileformat import save  # noqa: E402
from peers import record_prev_samples  # noqa: E402

BATCH = 3


def _pipe(model_dir):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, schedule, seed):
    finals = record_prev_samples(pipe.scheduler)
    with torch.no_grad():
        pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(seed), num_inference_steps=schedule.nfe,
             output_type="pt")
    assert len(finals) == schedule.nfe
    return finals[-1]


def test_pipeline_runs_reuse_and_forecast_as_the_executor(pipeline_dirs, tmp_path):
    model_dir = pipeline_dirs["epsilon"]
    model = load_pipeline_dir(model_dir)
    base = build("unipc-bh2-o2", model.noise, 6)
    copy = deepcache(base, 2)
    fc = dataclasses.replace(deepcache(base, 3), reuse_order=1)
    pipe = _pipe(model_dir)
    outs = {}
    for name, schedule in (("base", base), ("copy", copy), ("forecast", fc)):
        path = save(schedule, tmp_path / f"{name}.json")
        scheduler = apply_schedule(pipe, path)
        assert pipe.scheduler is scheduler
        got = _run(pipe, schedule, seed=3)
        # DDPMPipeline draws its noise with randn_tensor(shape, generator): the same draw here
        noise = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ours = sample(model, schedule, noise).sample
        diff = float((got - ours).abs().max())
        print(f"{name}: pipeline vs executor max abs {diff:.2e}")
        assert diff <= 1e-4
        outs[name] = got
    # the masks really ran: reuse changes the result, and the forecast differs from the copy
    assert float((outs["copy"] - outs["base"]).abs().max()) > 1e-4
    assert float((outs["forecast"] - outs["base"]).abs().max()) > 1e-4
    remove_schedule(pipe)
    assert "forward" not in pipe.unet.__dict__


def test_a_second_run_starts_a_fresh_cache_and_a_replaced_scheduler_is_refused(pipeline_dirs):
    model_dir = pipeline_dirs["epsilon"]
    model = load_pipeline_dir(model_dir)
    schedule = dataclasses.replace(deepcache(build("dpmsolver++2m", model.noise, 5), 2), reuse_order=1)
    pipe = _pipe(model_dir)
    apply_schedule(pipe, schedule)
    first, again = _run(pipe, schedule, seed=1), _run(pipe, schedule, seed=1)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    from diffusers import DDPMScheduler

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(SamplingError, match="scheduler was replaced"):
        pipe(batch_size=1, num_inference_steps=5, output_type="pt")


def test_masks_on_an_unknown_unit_or_network_are_refused_in_one_line(pipeline_dirs):
    model_dir = pipeline_dirs["epsilon"]
    model = load_pipeline_dir(model_dir)
    bad = deepcache(build("dpmsolver++2m", model.noise, 5), 2, unit="deep7")
    with pytest.raises(ScheduleError, match="unknown unit 'deep7'"):
        apply_schedule(_pipe(model_dir), bad)

    class Transformer:
        pass

    class NotAUNetPipeline:
        transformer = Transformer()
        scheduler = _pipe(model_dir).scheduler

    with pytest.raises(ModelError, match="UNet2DModel .*, SD3 and Flux pipelines; this pipeline.s network is a "
                                         "Transformer"):
        apply_schedule(NotAUNetPipeline(), deepcache(build("dpmsolver++2m", model.noise, 5), 2))


def test_a_diffusers_without_hook_registry_is_refused_with_the_pipeline_unchanged(pipeline_dirs, monkeypatch):
    import sys

    model_dir = pipeline_dirs["epsilon"]
    model = load_pipeline_dir(model_dir)
    pipe = _pipe(model_dir)
    before = pipe.scheduler
    monkeypatch.setitem(sys.modules, "diffusers.hooks", None)  # what importing it does on diffusers < 0.33
    with pytest.raises(ModelError, match=r"needs diffusers >= 0\.33 \(its HookRegistry\)") as e:
        apply_schedule(pipe, deepcache(build("dpmsolver++2m", model.noise, 5), 2))
    assert "\n" not in str(e.value)
    assert pipe.scheduler is before and "forward" not in pipe.unet.__dict__
