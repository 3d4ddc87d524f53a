"""Flow-matching pipeline directories: read as flow models, and the flow named schedules equal diffusers.

The directory is the simplest flow layout: a DDPMPipeline whose UNet2DModel predicts the velocity and whose
scheduler is FlowMatchEulerDiscreteScheduler (diffusers samples it as a flow model: timesteps are sigma x 1000).
Random weights, as diffusers' own tests use; the peers run diffusers' schedulers the way its pipelines do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from autotune.errors import ModelError, ScheduleError  # noqa: E402
from autotune.models.diffusers_dir import read_scheduler_config  # noqa: E402
from autotune.models.registry import load_model  # noqa: E402
from autotune.sampling.executor import sample  # noqa: E402
from autotune.sampling.named import FLOW_NAMED, NAMED, build, names_for  # noqa: E402
from autotune.sampling.noise import FlowMatching, VPDiscrete  # noqa: E402
from peers import tiny_unet  # noqa: E402

TOL = 1e-4
SHIFT = 3.0


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

    path = tmp_path_factory.mktemp("flow") / "pipe"
    DDPMPipeline(unet=tiny_unet(seed=3), scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT)).save_pretrained(
        str(path))
    return path


@pytest.fixture(scope="module")
def model(flow_dir):
    return load_model(str(flow_dir))


def _noise(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def _euler_pipeline_loop(flow_dir, noise: torch.Tensor, nfe: int) -> torch.Tensor:
    """What DDPMPipeline does with this directory's own scheduler (without its [0, 1] map)."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(flow_dir))
    sched = pipe.scheduler
    sched.set_timesteps(nfe)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(pipe.unet(x, t).sample, t, x).prev_sample
    return x


def _multistep_loop(cls_name: str, unet, noise: torch.Tensor, nfe: int, mu=None, **config) -> torch.Tensor:
    """diffusers' multistep scheduler with use_flow_sigmas, the network fed sigma x 1000.

    Those schedulers cast their flow timesteps to int64 (0.93 x 1000 -> 929 after float rounding), so the network
    sees a sigma up to 1e-3 off the one the solver steps from, while FlowMatchEuler feeds the exact float; our
    schedules evaluate the network at the solver's sigma. The solver is what is compared here, so the loop feeds
    sigma x 1000; ``test_multistep_timestep_truncation_is_the_only_difference`` measures the rest.
    """
    import diffusers

    sched = getattr(diffusers, cls_name)(use_flow_sigmas=True, prediction_type="flow_prediction", **config)
    sched.set_timesteps(nfe, **({"mu": mu} if mu is not None else {}))
    x = noise.clone()
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            x = sched.step(unet(x, sched.sigmas[k] * 1000).sample, t, x).prev_sample
    return x


def test_directory_is_read_as_a_flow_model(model):
    assert model.parameterization == "flow"
    assert isinstance(model.noise, FlowMatching) and model.noise.shift == SHIFT
    assert not model.round_time  # sigma x 1000 is fed as a float, as FlowMatchEuler's timesteps are
    assert "flow-euler" in names_for(model.noise) and "flow-euler" not in names_for(VPDiscrete.from_betas(
        np.linspace(1e-4, 0.02, 1000)))


@pytest.mark.parametrize("nfe", [4, 8])
def test_flow_euler_equals_the_pipelines_own_scheduler(flow_dir, model, nfe):
    noise = _noise()
    ours = sample(model, build("flow-euler", model.noise, nfe), noise).sample
    ref = _euler_pipeline_loop(flow_dir, noise, nfe)
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("shift", [1.0, 6.0])
def test_flow_euler_fixed_shifts_equal_flow_match_euler(model, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    noise, nfe = _noise(), 6
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(nfe)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model.unet(x, t).sample, t, x).prev_sample
    ours = sample(model, build(f"flow-euler-shift{shift:g}", model.noise, nfe), noise).sample
    assert (ours - x).abs().max().item() <= TOL


@pytest.mark.parametrize("name,cls_name,extra", [
    ("unipc-flow", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2}),
    ("dpmsolver++2m-flow", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
])
@pytest.mark.parametrize("nfe", [5, 8])
def test_multistep_flow_schedules_equal_diffusers(model, name, cls_name, extra, nfe):
    noise = _noise()
    ours = sample(model, build(name, model.noise, nfe), noise).sample
    ref = _multistep_loop(cls_name, model.unet, noise, nfe, flow_shift=SHIFT, **extra)
    assert (ours - ref).abs().max().item() <= TOL


def test_unipc_flow_with_dynamic_shift_equals_diffusers(model):
    """mu (resolution-dependent shifting) moves the UniPC-flow sigmas exactly as UniPC's own time_shift does."""
    import dataclasses

    noise, nfe, mu = _noise(), 6, 0.9
    x = _multistep_loop("UniPCMultistepScheduler", model.unet, noise, nfe, mu=mu, use_dynamic_shifting=True)
    ours = sample(model, build("unipc-flow", dataclasses.replace(model.noise, mu=mu), nfe), noise).sample
    assert (ours - x).abs().max().item() <= TOL


def test_multistep_timestep_truncation_is_the_only_difference(model):
    """Unpatched, diffusers' UniPC-flow loop differs from ours, and from itself fed float timesteps, by the same
    amount: the network input's truncation to integers, not the solver."""
    import diffusers

    noise, nfe = _noise(), 5
    sched = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT)
    sched.set_timesteps(nfe)
    assert sched.timesteps.dtype == torch.int64
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model.unet(x, t).sample, t, x).prev_sample
    ours = sample(model, build("unipc-flow", model.noise, nfe), noise).sample
    patched = _multistep_loop("UniPCMultistepScheduler", model.unet, noise, nfe, flow_shift=SHIFT)
    assert (ours - patched).abs().max().item() <= TOL
    assert (x - ours).abs().max().item() == pytest.approx((x - patched).abs().max().item(), abs=TOL)


def test_cli_baseline_and_sample_reproduce_the_pipeline(flow_dir, tmp_path):
    """The issue's case: `baseline` + `sample` on a flow directory used to differ from diffusers by 152."""
    from typer.testing import CliRunner

    from autotune.cli import app

    noise = _noise(2)
    np.save(tmp_path / "noise.npy", noise.numpy())
    runner = CliRunner()
    for args in (["baseline", "flow-euler", "--model", flow_dir, "--nfe", 8, "--out", tmp_path / "s.json"],
                 ["sample", "--model", flow_dir, "--schedule", tmp_path / "s.json", "--noise", tmp_path / "noise.npy",
                  "--out", tmp_path / "out.npy"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    ours = torch.from_numpy(np.load(tmp_path / "out.npy"))
    assert (ours - _euler_pipeline_loop(flow_dir, noise, 8)).abs().max().item() <= TOL


def test_flow_names_refused_on_a_vp_model():
    vp = VPDiscrete.from_betas(np.linspace(1e-4, 0.02, 1000))
    for name in FLOW_NAMED:
        with pytest.raises(ScheduleError, match="flow-matching schedule"):
            build(name, vp, 5)
    assert set(NAMED) <= set(names_for(vp))


@pytest.mark.parametrize("config,match", [
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": -1.0}, "shift"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": "big"}, "shift"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "image sequence length"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "time_shift_type": "cubic"}, "time_shift_type"),
    ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "epsilon"},
     "flow_prediction"),
])
def test_bad_flow_configs_are_one_line(config, match):
    with pytest.raises(ModelError, match=match) as info:
        read_scheduler_config(config)
    assert "\n" not in str(info.value)


def test_dynamic_shift_mu_is_the_pipelines(model):
    """mu from the image token count, as the SD3 / Flux pipelines compute it (calculate_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.5,
              "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    noise, kind, keys = read_scheduler_config(config, image_seq_len=1024)
    assert kind == "flow" and noise.mu == pytest.approx(calculate_shift(1024, 256, 4096, 0.5, 1.15), abs=1e-12)
    assert json.loads(json.dumps(keys)) == keys


def test_unsupported_family_is_one_line(tmp_path):
    path = tmp_path / "pixart"
    (path / "transformer").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline",
                                                       "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    (path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(ModelError) as info:
        load_model(str(path))
    msg = str(info.value)
    assert "PixArtAlphaPipeline" in msg and "PixArtTransformer2DModel" in msg and "SDXL" in msg and "\n" not in msg


def _searched_like(noise: FlowMatching):
    """A schedule no diffusers scheduler makes: UniPC-flow times moved, orders and correctors mixed."""
    import dataclasses

    base = build("unipc-flow", noise, 6)
    times = [0.9, 0.7, 0.45, 0.25, 0.08, 0.0]
    steps = tuple(dataclasses.replace(s, t=t) for s, t in zip(base.steps, times))
    return dataclasses.replace(base, steps=steps, name="searched-like")


@pytest.mark.parametrize("which", ["flow-euler", "unipc-flow", "searched"])
def test_autotune_scheduler_in_the_flow_pipeline_equals_sample(flow_dir, model, which):
    """DDPMPipeline over the flow directory with AutotuneScheduler swapped in ends where our executor ends."""
    from diffusers import DDPMPipeline

    from autotune.diffusers_scheduler import AutotuneScheduler
    from peers import record_prev_samples

    schedule = _searched_like(model.noise) if which == "searched" else build(which, model.noise, 5)
    pipe = DDPMPipeline.from_pretrained(str(flow_dir))
    pipe.scheduler = AutotuneScheduler.from_schedule(schedule, pipe.scheduler.config)
    finals = record_prev_samples(pipe.scheduler)
    with torch.no_grad():
        pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=schedule.nfe,
             output_type="np")
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(4))
    ours = sample(model, schedule, noise).sample
    assert len(finals) == schedule.nfe and (finals[-1] - ours).abs().max().item() <= TOL


def test_autotune_scheduler_sigmas_and_mu(model):
    """Flux passes sigmas=linspace(1, 1/n, n) and mu: accepted; the schedule's own sigmas: accepted; a
    conflicting list: one line."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from autotune.diffusers_scheduler import AutotuneScheduler
    from autotune.errors import SamplingError

    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    schedule = build("unipc-flow", model.noise, 5)
    sched = AutotuneScheduler.from_schedule(schedule, config)
    assert sched.config.use_dynamic_shifting and sched.config.base_image_seq_len == 256  # pipelines read these
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=0.8)
    own = [schedule.t_start] + [s.t for s in schedule.steps[:-1]]
    sched.set_timesteps(5, sigmas=own)
    np.testing.assert_allclose(sched.timesteps.numpy(), np.array(own) * 1000, rtol=1e-6)
    with pytest.raises(SamplingError, match="sigmas") as info:
        sched.set_timesteps(sigmas=[1.0, 0.8, 0.5, 0.3, 0.1])
    assert "\n" not in str(info.value)
    with pytest.raises(SamplingError, match="num_inference_steps=4"):
        sched.set_timesteps(sigmas=[1.0, 0.8, 0.5, 0.3])


def test_search_and_compile_on_a_flow_directory(flow_dir, tmp_path):
    """The default machinery on a flow directory: a search writes a schedule (flow named ones among its
    peers), and the ONNX engine of it equals the executor (the CLI's own parity line)."""
    import re

    from typer.testing import CliRunner

    from autotune.cli import app

    runner, out = CliRunner(), tmp_path / "s.json"
    result = runner.invoke(app, [str(a) for a in [
        "search", "--model", flow_dir, "--nfe", 4, "--method", "random", "--budget", 8, "--workers", 0, "--refine", 2,
        "--set-size", 16, "--validate", 0, "--report-size", 16, "--no-cache", "--out", out]])
    assert result.exit_code == 0, result.output
    # the flow peers are offered to the search (the closing table keeps the 3 best named on the search set)
    from autotune.models.registry import load_model
    from autotune.sampling.named import names_for

    assert {"flow-euler", "unipc-flow", "dpmsolver++2m-flow"} <= set(names_for(load_model(str(flow_dir)).noise))
    assert re.search(r"vs \S+", result.output)
    result = runner.invoke(app, [str(a) for a in ["compile", "--model", flow_dir, "--schedule", out, "--out",
                                                  tmp_path / "engine"]])
    assert result.exit_code == 0, result.output
    engine = float(re.search(r"engine ([0-9.e+-]+) \(max abs\)", result.output).group(1))
    assert engine <= 1e-3


def test_search_on_a_vp_directory(pipeline_dirs, tmp_path):
    """The same search on a DDPM (VP, epsilon) directory: flow named schedules are not offered there."""
    from typer.testing import CliRunner

    from autotune.cli import app

    out = tmp_path / "s.json"
    result = CliRunner().invoke(app, [str(a) for a in [
        "search", "--model", pipeline_dirs["epsilon"], "--nfe", 4, "--refine", 2, "--method", "random", "--budget", 8,
        "--workers", 0, "--set-size", 16, "--validate", 0, "--report-size", 16, "--no-cache", "--out", out]])
    assert result.exit_code == 0, result.output
    assert "dpmsolver++2m" in result.output and "flow-euler" not in result.output
    assert json.loads(out.read_text())["nfe"] == 4
