"""bench/rgb32.py: the photo-patch pixel model's pipeline directory loads in autotune with the shape and the
parameterisation it was trained in, and `ensure_rgb32` builds only what is missing. Trained for a few tiny
steps here; the real builds are the bench's job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from autotune.models.registry import load_model  # noqa: E402
from autotune.sampling.denoiser import to_data_and_noise  # noqa: E402
from bench_scripts import load_bench  # noqa: E402
TINY = {"batch_size": 4, "probe_size": 4}  # a build of seconds: the test checks the directory, not the model


rgb32 = load_bench("rgb32")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb32")
    for param in ("eps", "v"):
        rgb32.build(root / f"rgb32-{param}", param, steps=3, **TINY)
    return root


def test_directory_and_training_record(work):
    assert sorted(p.name for p in work.iterdir()) == ["rgb32-eps", "rgb32-v"]  # no partial folder left behind
    record = json.loads((work / "rgb32-v" / "training.json").read_text())
    assert (record["param"], record["steps"], record["seed"]) == ("v", 3, 0)
    assert [w["end_step"] for w in record["windows"]] == [1, 2, 3]
    assert record["train_loss_last_change"] is not None and record["parameters"] > 0
    config = json.loads((work / "rgb32-v" / "scheduler" / "scheduler_config.json").read_text())
    assert (config["timestep_spacing"], config["clip_sample"], config["beta_schedule"]) == ("leading", True, "linear")


@pytest.mark.parametrize("param, prediction_type", [("eps", "epsilon"), ("v", "v_prediction")])
def test_loads_in_its_parameterisation(work, param, prediction_type):
    """The Denoiser calls the saved UNet at the step its time maps to, and turns the output into x0 as the
    scheduler config's prediction type says (checked against diffusers' own alphas_cumprod)."""
    from diffusers import DDPMScheduler, UNet2DModel

    path = work / f"rgb32-{param}"
    model = load_model(str(path))
    assert model.sample_shape == (3, 32, 32)
    assert model.parameterization == prediction_type
    assert sum(p.numel() for p in model.module.parameters()) == json.loads(
        (path / "training.json").read_text())["parameters"]

    unet = UNet2DModel.from_pretrained(str(path / "unet")).eval()
    alphas_cumprod = DDPMScheduler.from_pretrained(str(path / "scheduler")).alphas_cumprod.double()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.6, dtype=torch.float64)
    step = int(model.noise.model_time(t))
    alpha, sigma = alphas_cumprod[step].sqrt(), (1 - alphas_cumprod[step]).sqrt()
    with torch.no_grad():
        output = model(x, t)
        saved = unet(x, step).sample
    assert (output - saved).abs().max().item() <= 1e-6

    x0, _ = to_data_and_noise(output.double(), x.double(), alpha, sigma, model.parameterization)
    expected = (x - sigma * saved) / alpha if param == "eps" else alpha * x - sigma * saved
    assert (x0 - expected).abs().max().item() <= 1e-5
    other = "v_prediction" if param == "eps" else "epsilon"  # the other reading differs: the check has teeth
    wrong, _ = to_data_and_noise(output.double(), x.double(), alpha, sigma, other)
    assert (wrong - expected).abs().max().item() > 1e-2


def test_ensure_builds_only_what_is_missing(work, tmp_path, monkeypatch):
    weights = work / "rgb32-eps" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    real_build = rgb32.build
    calls = []

    def recording_build(out, param, steps, **kwargs):
        calls.append((Path(out).name, param, steps))
        return real_build(out, param, steps, **{**kwargs, **TINY})

    monkeypatch.setattr(rgb32, "build", recording_build)
    assert rgb32.ensure_rgb32(work, "eps") == work / "rgb32-eps"
    assert calls == [] and weights.stat().st_mtime_ns == before

    fresh = tmp_path / "fresh"
    assert rgb32.ensure_rgb32(fresh, "v", steps=2, log=lambda line: None) == fresh / "rgb32-v"
    assert calls == [("rgb32-v", "v", 2)] and (fresh / "rgb32-v" / "model_index.json").is_file()
    assert rgb32.ensure_rgb32(fresh, "v") == fresh / "rgb32-v" and len(calls) == 1


def test_sd_noise_schedule(tmp_path):
    """`noise="sd"` builds Stable Diffusion 1.x's scheduler config under its own name, and autotune reads that
    noise schedule as diffusers does (terminal alpha 0.068, where the linear betas' is 0.0064)."""
    from diffusers import DDPMScheduler

    path = rgb32.ensure_rgb32(tmp_path, "eps", steps=2, noise="sd", log=lambda line: None)
    assert path == tmp_path / "rgb32-eps-sd"
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert (config["beta_schedule"], config["beta_start"], config["beta_end"], config["steps_offset"],
            config["clip_sample"]) == ("scaled_linear", 0.00085, 0.012, 1, False)
    assert json.loads((path / "training.json").read_text())["noise"] == "sd"
    alphas_cumprod = DDPMScheduler.from_pretrained(str(path / "scheduler")).alphas_cumprod.double()
    noise = load_model(str(path)).noise
    last = torch.tensor(1.0, dtype=torch.float64)
    assert int(noise.model_time(last)) == 999
    assert abs(noise.log_alpha(last).exp().item() - alphas_cumprod[999].sqrt().item()) <= 1e-6
    assert 0.06 < alphas_cumprod[999].sqrt().item() < 0.07
    with pytest.raises(ValueError, match="noise"):
        rgb32.build(tmp_path / "x", "eps", steps=1, noise="cosine")
