"""AutotuneScheduler: diffusers' own pipelines replay a schedule file and give what `autotune sample` gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("diffusers")

from autotune.cli import app  # noqa: E402
from autotune.diffusers_scheduler import AutotuneScheduler  # noqa: E402
from autotune.errors import SamplingError, ScheduleError  # noqa: E402
from autotune.models.diffusers_dir import read_scheduler_config  # noqa: E402
from autotune.sampling.named import build  # noqa: E402
from autotune.space.fileformat import save  # noqa: E402
from autotune.space.schedule import Schedule, Step  # noqa: E402
from peers import record_prev_samples  # noqa: E402

TOL = 1e-4
BATCH = 4
runner = CliRunner()


def mixed_schedule() -> Schedule:
    """Every kind of per-step decision a pipeline can replay: solvers, orders and both predictions mixed,
    UniC correctors of orders 1-3, DC compensation ratios, model-time shifts, data scales, and a final denoising call
    at t > 0."""
    steps = (
        Step(0.78, order=1, solver="dpm", prediction="data", corrector="bh2", corrector_order=1, shift=-0.2),
        Step(0.55, order=2, solver="unip-bh1", prediction="noise", corrector="bh1", corrector_order=2, shift=0.3),
        Step(0.36, order=3, solver="dpm", prediction="noise", ratio=0.97, data_scale=1.04),
        Step(0.2, order=2, solver="unip-bh2", prediction="data", corrector="bh2", corrector_order=3, ratio=1.03),
        Step(0.09, order=4, solver="ipndm", prediction="noise", data_scale=0.97),
        Step(0.03, order=3, solver="unip-bh2", prediction="data"),
    )
    return Schedule(1.0, steps, final_denoise=True, name="mixed")


def _schedules(noise):
    return [build("ddim", noise, 4), build("dpmsolver++3m", noise, 6), build("unipc-bh2-o3", noise, 5),
            build("ipndm", noise, 5), mixed_schedule(), build("heun", noise, 5),
            build("unipc-bh1-o3-smin", noise, 5)]  # ending at sigma_min, as `autotune search --final sigma_min` can


def _cli_sample(model_dir, schedule_path, noise, tmp_path, *extra) -> torch.Tensor:
    noise_path, out = tmp_path / "noise.npy", tmp_path / "ours.npy"
    np.save(noise_path, noise.numpy())
    result = runner.invoke(app, [str(a) for a in ("sample", "--model", model_dir, "--schedule", schedule_path,
                                                  "--noise", noise_path, "--out", out, *extra)])
    assert result.exit_code == 0, result.output
    return torch.from_numpy(np.load(out))


def _ddpm_pipeline(model_dir, schedule_path):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = AutotuneScheduler.from_schedule(schedule_path, pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_pipeline_equals_autotune_sample(pipeline_dirs, tmp_path, prediction):
    """Same seed: DDPMPipeline with the scheduler swapped ends where `autotune sample` ends, to 1e-4, for named
    schedules and a schedule with correctors, compensation and orders mixed."""
    from diffusers import DDPMScheduler

    model_dir = pipeline_dirs[prediction]
    noise_schedule, _, _ = read_scheduler_config(dict(DDPMScheduler.load_config(str(model_dir / "scheduler"))))
    for i, schedule in enumerate(_schedules(noise_schedule)):
        path = save(schedule, tmp_path / f"{schedule.name}.json")
        pipe = _ddpm_pipeline(model_dir, path)
        finals = record_prev_samples(pipe.scheduler)
        seed = 10 + i
        with torch.no_grad():
            images = pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(seed),
                          num_inference_steps=schedule.nfe, output_type="pt").images
        assert len(finals) == schedule.nfe
        # DDPMPipeline draws its noise with randn_tensor(shape, generator, dtype=unet.dtype): the same draw here
        noise = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        ours = _cli_sample(model_dir, path, noise, tmp_path)
        diff = (finals[-1] - ours).abs().max().item()
        image_diff = (images - (ours / 2 + 0.5).clamp(0, 1)).abs().max().item()
        print(f"{prediction} {schedule.name} NFE {schedule.nfe}: max abs diff {diff:.3g} (|x| max "
              f"{ours.abs().max().item():.3g}), images {image_diff:.3g}")
        assert torch.isfinite(ours).all() and ours.abs().max() > 0.1
        assert diff <= TOL and image_diff <= TOL


def test_mixed_schedule_differs_from_plain_ddim(pipeline_dirs, tmp_path):
    """The equality above is not vacuous: another schedule from the same noise lands elsewhere."""
    model_dir = pipeline_dirs["epsilon"]
    a = save(mixed_schedule(), tmp_path / "a.json")
    b = save(build("ddim", read_scheduler_config({})[0], 7), tmp_path / "b.json")
    outs = []
    for path in (a, b):
        with torch.no_grad():
            outs.append(_ddpm_pipeline(model_dir, path)(batch_size=2, generator=torch.Generator().manual_seed(0),
                                                        num_inference_steps=7, output_type="pt").images)
    assert (outs[0] - outs[1]).abs().max().item() > 1e-3


def test_api_values(pipeline_dirs):
    """The attributes pipelines read: order 1, init_noise_sigma 1, identity scale_model_input, model times."""
    from diffusers import DDPMScheduler

    base = DDPMScheduler.from_pretrained(str(pipeline_dirs["epsilon"] / "scheduler"))
    noise_schedule = read_scheduler_config(dict(base.config))[0]
    s = build("dpmsolver++2m", noise_schedule, 5)
    sched = AutotuneScheduler.from_schedule(s, base.config)
    sched.set_timesteps(5)
    assert sched.order == 1 and sched.init_noise_sigma == 1.0 and sched.num_inference_steps == 5
    import autotune

    assert autotune.AutotuneScheduler is AutotuneScheduler  # the lazy top-level export
    # linspace spacing on 1000 training steps: the integer timesteps diffusers' DPMSolver feeds
    assert sched.timesteps.tolist() == [999.0, 799.0, 599.0, 400.0, 200.0]
    x = torch.randn(2, 3, 8, 8)
    assert sched.scale_model_input(x, sched.timesteps[0]) is x
    mixed = AutotuneScheduler.from_schedule(mixed_schedule(), base.config)
    assert len(mixed.timesteps) == 7 and mixed.timesteps[2].item() == pytest.approx(0.55 * 1000 - 1)
    # step 1 shifts the time its call tells the network by +0.3 log-SNR: the pipeline feeds that time
    told = noise_schedule.t_of_lambda(noise_schedule.lambda_(torch.tensor(0.78, dtype=torch.float64)) + 0.3)
    assert mixed.timesteps[1].item() == pytest.approx(float(told) * 1000 - 1) and told < 0.77
    assert mixed.timesteps[-1].item() == pytest.approx(0.03 * 1000 - 1)  # the final denoising call


def test_errors(pipeline_dirs, tmp_path):
    from diffusers import DDPMScheduler

    config = DDPMScheduler.from_pretrained(str(pipeline_dirs["epsilon"] / "scheduler")).config
    s = mixed_schedule()
    import dataclasses

    skipping = s.with_steps([s.steps[0], dataclasses.replace(s.steps[1], skip=("mid_block",)), *s.steps[2:]])
    path = save(skipping, tmp_path / "skip.json")
    with pytest.raises(ScheduleError, match=r"skip\.json: steps\[1\]\.skip: skip masks cannot be replayed"):
        AutotuneScheduler.from_schedule(path, config)
    sched = AutotuneScheduler.from_schedule(s, config)
    with pytest.raises(SamplingError, match="num_inference_steps=1000: .* exactly 7 model evaluations"):
        sched.set_timesteps(1000)
    with pytest.raises(SamplingError, match="call set_timesteps first"):
        sched.step(torch.zeros(1, 3, 8, 8), sched.timesteps[0], torch.zeros(1, 3, 8, 8))
    sched.set_timesteps(7)
    with pytest.raises(SamplingError, match="is not the schedule's next"):
        sched.step(torch.zeros(1, 3, 8, 8), sched.timesteps[1], torch.zeros(1, 3, 8, 8))
    with pytest.raises(ScheduleError, match="AutotuneScheduler needs one"):
        AutotuneScheduler()


def test_pipeline_save_and_reload(pipeline_dirs, tmp_path):
    """A pipeline saved with the scheduler loads back with it (the config carries the schedule)."""
    from diffusers import DDPMPipeline

    schedule = mixed_schedule()
    pipe = _ddpm_pipeline(pipeline_dirs["v_prediction"], save(schedule, tmp_path / "s.json"))
    pipe.save_pretrained(str(tmp_path / "saved"))
    again = DDPMPipeline.from_pretrained(str(tmp_path / "saved"))
    assert isinstance(again.scheduler, AutotuneScheduler)
    assert again.scheduler.schedule.hash() == schedule.hash()
    assert again.scheduler.parameterization == "v_prediction"
    assert torch.equal(again.scheduler.timesteps, pipe.scheduler.timesteps)


@pytest.fixture(scope="module")
def sd_dir(tiny_sd_dir):
    return tiny_sd_dir


@pytest.mark.parametrize("guidance", [7.5, None])
def test_stable_diffusion_pipeline_equals_autotune_sample(sd_dir, tmp_path, guidance):
    """StableDiffusionPipeline (CFG done by the pipeline) with the scheduler swapped = `autotune sample --prompts`."""
    from tiny_sd import PROMPTS, load_sd_pipeline

    pipe = load_sd_pipeline(sd_dir)
    noise_schedule = read_scheduler_config(dict(pipe.scheduler.config))[0]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS))
    latents = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for schedule in (build("unipc-bh2-o3", noise_schedule, 5), mixed_schedule()):
        path = save(schedule, tmp_path / f"{schedule.name}.json")
        pipe.scheduler = AutotuneScheduler.from_schedule(path, pipe.scheduler.config)
        with torch.no_grad():
            theirs = pipe(prompt=list(PROMPTS), height=32, width=32, num_inference_steps=schedule.nfe,
                          guidance_scale=guidance or 1.0, latents=latents.clone(), output_type="latent").images
        extra = ("--prompts", prompts_file) + (("--guidance", guidance) if guidance is not None else ())
        ours = _cli_sample(sd_dir, path, latents, tmp_path, *extra)
        diff = (theirs - ours).abs().max().item()
        print(f"SD {schedule.name} NFE {schedule.nfe} guidance {guidance}: max abs diff {diff:.3g} "
              f"(|x| max {ours.abs().max().item():.3g})")
        assert torch.isfinite(ours).all() and diff <= TOL
