"""Image-to-image: a schedule may start below T; named schedules cut at a strength equal diffusers' img2img
pipelines, and AutotuneScheduler runs a partial schedule inside them (add_noise / scale_noise, set_begin_index,
the timestep slicing by strength), equal to our executor started from the same noised image."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autotune.errors import SamplingError, ScheduleError  # noqa: E402
from autotune.models.latent import load_latent_pipeline_dir  # noqa: E402
from autotune.sampling.executor import sample  # noqa: E402
from autotune.sampling.named import build, for_strength  # noqa: E402
from autotune.sampling.noise import noised  # noqa: E402
from peers import PEERS  # noqa: E402
from tiny_sd import PROMPTS, load_sd_pipeline  # noqa: E402

TOL = 1e-4
STEPS, STRENGTH, GUIDANCE = 10, 0.6, 5.0


@pytest.fixture(scope="module")
def sd_dir(tiny_sd_dir):
    return tiny_sd_dir


@pytest.fixture(scope="module")
def model(sd_dir):
    return load_latent_pipeline_dir(sd_dir)


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # [0, 1], as users pass tensors


def _img2img(sd_dir, scheduler):
    """StableDiffusionImg2ImgPipeline over the tiny directory; records what its scheduler's add_noise saw."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**load_sd_pipeline(sd_dir, scheduler=scheduler).components)
    seen: dict[str, torch.Tensor] = {}
    add_noise = pipe.scheduler.add_noise

    def recording(original, noise, timesteps):
        out = add_noise(original, noise, timesteps)
        seen.update(x0=original.clone(), noise=noise.clone(), start=out.clone())
        return out

    pipe.scheduler.add_noise = recording
    return pipe, seen


def _run(pipe, steps=STEPS, strength=STRENGTH):
    with torch.no_grad():
        return pipe(prompt=list(PROMPTS[:2]), image=_images(), strength=strength, num_inference_steps=steps,
                    guidance_scale=GUIDANCE, output_type="latent", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++2m", "unipc-bh2-o2"])
def test_named_schedule_cut_at_a_strength_equals_the_img2img_pipeline(sd_dir, model, name):
    import diffusers

    cls_name, kwargs = PEERS[name]
    pipe, seen = _img2img(sd_dir, getattr(diffusers, cls_name).from_config(model.scheduler_config, **kwargs))
    ref = _run(pipe)
    part = for_strength(dataclasses.replace(build(name, model.noise, STEPS), guidance=GUIDANCE), STRENGTH)
    assert part.nfe == int(STEPS * STRENGTH) and part.t_start < model.noise.T
    start = noised(model.noise, seen["x0"], seen["noise"], part.t_start)
    assert (start - seen["start"]).abs().max().item() <= TOL
    ours = sample(model, part, seen["noise"], list(PROMPTS[:2]), start=start).sample
    assert (ours - ref).abs().max().item() <= TOL
    # not vacuous: the whole schedule from pure noise lands elsewhere
    whole = sample(model, dataclasses.replace(build(name, model.noise, STEPS), guidance=GUIDANCE), seen["noise"],
                   list(PROMPTS[:2])).sample
    assert (whole - ref).abs().max().item() > 100 * TOL


def _searched_partial(model):
    """A partial schedule no diffusers scheduler makes: moved times, mixed orders, correctors."""
    part = for_strength(dataclasses.replace(build("unipc-bh2-o2", model.noise, STEPS), guidance=GUIDANCE), STRENGTH)
    times = [t * 0.97 if 0 < t < part.t_start else t for t in (s.t for s in part.steps)]
    return dataclasses.replace(part, steps=tuple(dataclasses.replace(s, t=t) for s, t in zip(part.steps, times)),
                               name="searched-img2img")


def test_autotune_scheduler_runs_a_partial_schedule_in_the_img2img_pipeline(sd_dir, model):
    from autotune.diffusers_scheduler import AutotuneScheduler

    schedule = _searched_partial(model)
    pipe, seen = _img2img(sd_dir, AutotuneScheduler.from_schedule(schedule, model.scheduler_config))
    ref = _run(pipe)
    expected_start = noised(model.noise, seen["x0"], seen["noise"], schedule.t_start)
    assert (seen["start"] - expected_start).abs().max().item() <= TOL
    ours = sample(model, schedule, seen["noise"], list(PROMPTS[:2]), start=seen["start"]).sample
    assert (ours - ref).abs().max().item() <= TOL


def test_a_strength_that_does_not_fit_is_one_line(sd_dir, model):
    from autotune.diffusers_scheduler import AutotuneScheduler

    schedule = _searched_partial(model)  # 6 steps
    pipe, _ = _img2img(sd_dir, AutotuneScheduler.from_schedule(schedule, model.scheduler_config))
    with pytest.raises(SamplingError, match="exactly 6 steps") as info:
        _run(pipe, steps=10, strength=0.8)
    assert "\n" not in str(info.value)
    full = AutotuneScheduler.from_schedule(build("ddim", model.noise, 6), model.scheduler_config)
    pipe, _ = _img2img(sd_dir, full)
    with pytest.raises(SamplingError, match="strength 1"):
        _run(pipe, steps=6, strength=0.5)


def test_flow_image_to_image_equals_flow_match_euler(tmp_path):
    """Flow img2img as SD3's pipeline does it: scale_noise to the first kept sigma, then the kept steps."""
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

    from autotune.diffusers_scheduler import AutotuneScheduler
    from autotune.models.registry import load_model
    from peers import tiny_unet

    DDPMPipeline(unet=tiny_unet(seed=3), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)).save_pretrained(
        str(tmp_path / "flow"))
    flow = load_model(str(tmp_path / "flow"))
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.randn(2, 3, 8, 8, generator=g)

    def img2img(scheduler):
        scheduler.set_timesteps(STEPS)
        begin = STEPS - int(STEPS * STRENGTH)
        timesteps = scheduler.timesteps[begin:]
        scheduler.set_begin_index(begin)
        x = scheduler.scale_noise(x0, timesteps[:1], noise)
        with torch.no_grad():
            for t in timesteps:
                x = scheduler.step(flow.unet(x, t).sample, t, x).prev_sample
        return x

    ref = img2img(FlowMatchEulerDiscreteScheduler(shift=3.0))
    part = for_strength(build("flow-euler", flow.noise, STEPS), STRENGTH)
    ours = sample(flow, part, noise, start=noised(flow.noise, x0, noise, part.t_start)).sample
    assert (ours - ref).abs().max().item() <= TOL
    replayed = img2img(AutotuneScheduler.from_schedule(part, FlowMatchEulerDiscreteScheduler(shift=3.0).config))
    assert (replayed - ours).abs().max().item() <= TOL


def test_for_strength_refuses_what_keeps_nothing(model):
    full = build("ddim", model.noise, 4)
    for bad in (0.0, 1.5, 0.1):
        with pytest.raises(ScheduleError, match="strength"):
            for_strength(full, bad)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from tiny_sd3 import make_tiny_sd3_dir

    return make_tiny_sd3_dir(tmp_path_factory.mktemp("img2img-sd3") / "tiny-sd3")


def _sd3_img2img(sd3_dir, scheduler=None):
    """StableDiffusion3Img2ImgPipeline over the tiny SD3 directory; records what scale_noise saw."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from tiny_sd3 import load_sd3_pipeline

    pipe = StableDiffusion3Img2ImgPipeline(**load_sd3_pipeline(sd3_dir, scheduler=scheduler).components)
    pipe.set_progress_bar_config(disable=True)
    seen: dict[str, torch.Tensor] = {}
    scale_noise = pipe.scheduler.scale_noise

    def recording(sample, timestep, noise=None):
        out = scale_noise(sample, timestep, noise)
        seen.update(x0=sample.clone(), noise=noise.clone(), start=out.clone())
        return out

    pipe.scheduler.scale_noise = recording
    return pipe, seen


def _run_sd3(pipe, strength):
    with torch.no_grad():
        return pipe(prompt=list(PROMPTS[:2]), image=_images(), strength=strength, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_sd3_img2img_equals_the_cut_flow_euler_and_runs_a_partial_schedule(sd3_dir):
    """StableDiffusion3Img2ImgPipeline: the named flow-euler cut at the strength, and AutotuneScheduler with a
    partial schedule, each equal to our executor from the same noised latents. (SD3's img2img keeps
    N - int(N - N s) steps, N s rounded up where SD 1.x rounds down: 0.55 with N = 10 keeps 6 steps, cut by
    ``for_strength(..., flow=True)``.)"""
    from autotune.diffusers_scheduler import AutotuneScheduler
    from autotune.models.registry import load_model

    model, strength = load_model(str(sd3_dir)), 0.55
    pipe, seen = _sd3_img2img(sd3_dir)
    ref = _run_sd3(pipe, strength)
    part = for_strength(dataclasses.replace(build("flow-euler", model.noise, STEPS), guidance=GUIDANCE), strength,
                        flow=True)
    assert part.nfe == 6  # the flow pipelines' rule (SD 1.x's would keep 5)
    start = noised(model.noise, seen["x0"], seen["noise"], part.t_start)
    assert (start - seen["start"]).abs().max().item() <= TOL
    ours = sample(model, part, seen["noise"], list(PROMPTS[:2]), start=start).sample
    assert (ours - ref).abs().max().item() <= TOL

    moved = dataclasses.replace(part, steps=tuple(dataclasses.replace(s, t=s.t * 0.95) for s in part.steps))
    pipe, seen = _sd3_img2img(sd3_dir, AutotuneScheduler.from_schedule(moved, load_model(str(sd3_dir)).scheduler_config))
    ref = _run_sd3(pipe, strength)
    assert (seen["start"] - noised(model.noise, seen["x0"], seen["noise"], moved.t_start)).abs().max().item() <= TOL
    ours = sample(model, moved, seen["noise"], list(PROMPTS[:2]), start=seen["start"]).sample
    assert (ours - ref).abs().max().item() <= TOL


def test_sdxl_img2img_runs_a_partial_schedule(tmp_path_factory):
    """StableDiffusionXLImg2ImgPipeline (base layout, no aesthetic score) with AutotuneScheduler replaying a
    partial schedule equals our executor from the latents its add_noise made."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from tiny_sdxl import load_sdxl_pipeline, make_tiny_sdxl_dir

    from autotune.diffusers_scheduler import AutotuneScheduler
    from autotune.models.registry import load_model

    path = make_tiny_sdxl_dir(tmp_path_factory.mktemp("img2img-sdxl") / "tiny-sdxl")
    model = load_model(str(path))
    schedule = _searched_partial(model)
    base = load_sdxl_pipeline(path, scheduler=AutotuneScheduler.from_schedule(schedule, model.scheduler_config))
    pipe = StableDiffusionXLImg2ImgPipeline(**base.components, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    seen: dict[str, torch.Tensor] = {}
    add_noise = pipe.scheduler.add_noise

    def recording(original, noise, timesteps):
        out = add_noise(original, noise, timesteps)
        seen.update(noise=noise.clone(), start=out.clone())
        return out

    pipe.scheduler.add_noise = recording
    with torch.no_grad():
        ref = pipe(prompt=list(PROMPTS[:2]), image=_images(), strength=STRENGTH, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    ours = sample(model, schedule, seen["noise"], list(PROMPTS[:2]), start=seen["start"]).sample
    assert (ours - ref).abs().max().item() <= TOL


def test_flux_img2img_runs_a_partial_schedule(tmp_path_factory):
    """FluxImg2ImgPipeline passes sigmas=linspace(1, 1/N, N) and mu for the whole run, then slices by strength:
    AutotuneScheduler accepts that default, replays the partial schedule, and equals our executor."""
    from diffusers import FluxImg2ImgPipeline
    from tiny_flux import make_tiny_flux_dir

    from autotune.diffusers_scheduler import AutotuneScheduler
    from autotune.models.flux import pack_latents, unpack_latents
    from autotune.models.registry import load_model

    path = make_tiny_flux_dir(tmp_path_factory.mktemp("img2img-flux") / "tiny-flux")
    model, strength = load_model(str(path)), 0.5
    part = for_strength(dataclasses.replace(build("flow-euler", model.noise, STEPS), guidance=3.5), strength)
    moved = dataclasses.replace(part, steps=tuple(dataclasses.replace(s, t=s.t * 0.95) for s in part.steps))
    pipe = FluxImg2ImgPipeline.from_pretrained(str(path))
    pipe.scheduler = AutotuneScheduler.from_schedule(moved, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seen: dict[str, torch.Tensor] = {}
    scale_noise = pipe.scheduler.scale_noise

    def recording(sample, timestep, noise=None):
        out = scale_noise(sample, timestep, noise)
        seen.update(noise=noise.clone(), start=out.clone())
        return out

    pipe.scheduler.scale_noise = recording
    h, w = model.sample_shape[1:]
    size = h * pipe.vae_scale_factor
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = pipe(prompt=list(PROMPTS[:2]), image=images, strength=strength, num_inference_steps=STEPS,
                   guidance_scale=3.5, height=size, width=size, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    ref = unpack_latents(ref, h, w)
    ours = sample(model, moved, seen["noise"], list(PROMPTS[:2]), start=seen["start"]).sample
    assert ours.shape == ref.shape and (ours - ref).abs().max().item() <= TOL
    assert pack_latents(ours).shape[1] == (h // 2) * (w // 2)
