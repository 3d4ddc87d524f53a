"""`autotune zoo export digits --format diffusers`: a DDPMPipeline directory that runs a schedule file as
`autotune sample --model digits` runs it, with the same network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("diffusers")

from autotune.cli import app  # noqa: E402
from autotune.diffusers_scheduler import AutotuneScheduler  # noqa: E402
from autotune.errors import ModelError  # noqa: E402
from autotune.models.digits import NOISE_CONFIG, NULL_CLASS, load_digits  # noqa: E402
from autotune.models.digits_diffusers import DigitsUNet2DModel  # noqa: E402
from autotune.sampling.named import build  # noqa: E402
from autotune.space.fileformat import save  # noqa: E402
from autotune.space.schedule import Schedule, Step  # noqa: E402
from peers import record_prev_samples  # noqa: E402

TOL = 1e-4
BATCH = 3
runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "digits-pipe"
    result = runner.invoke(app, ["zoo", "export", "digits", "--format", "diffusers", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def builtin():
    return load_digits(torch.float32)


def test_directory_layout(exported):
    """What DDPMPipeline needs: the unet under its full module path, a DDPMScheduler with the digits betas."""
    import json

    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["autotune.models.digits_diffusers", "DigitsUNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    unet_config = json.loads((exported / "unet" / "config.json").read_text())
    assert (unet_config["sample_size"], unet_config["in_channels"]) == (16, 1)
    assert (exported / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    sched = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert {k: sched[k] for k in NOISE_CONFIG} == NOISE_CONFIG and sched["prediction_type"] == "epsilon"


def test_forward_equals_builtin(exported, builtin):
    """The exported network computes what the built-in one computes: same weights, same outputs, with labels
    and with None = the null class; labels matter (the comparison is not vacuous)."""
    unet = DigitsUNet2DModel.from_pretrained(str(exported / "unet")).eval()
    theirs, ours = unet.net.state_dict(), builtin.module.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=g)
    tm = torch.tensor([999.0, 500.0, 123.0, 3.0])
    labels = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        conditional = unet(x, tm, class_labels=labels).sample
        assert (conditional - builtin.module(x, tm, labels)).abs().max().item() <= 1e-6
        unconditional = unet(x, tm).sample
        assert (unconditional - builtin.module(x, tm, torch.full((4,), NULL_CLASS))).abs().max().item() <= 1e-6
        # the Denoiser path (model time from continuous t) = the diffusers call at the training step it feeds
        t = torch.tensor(0.6, dtype=torch.float64)
        step = float(builtin.noise.model_time(t))
        assert (unet(x, step).sample - builtin(x, t)).abs().max().item() <= 1e-6
    assert (conditional - unconditional).abs().max().item() > 1e-2


def test_save_pretrained_round_trip(tmp_path):
    model = DigitsUNet2DModel.from_digits_weights()
    model.save_pretrained(str(tmp_path / "unet"))
    again = DigitsUNet2DModel.from_pretrained(str(tmp_path / "unet"))
    def public(config):  # JSON turns the channels tuple into a list; private keys say where it was loaded from
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert public(again.config) == public(model.config)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    fresh = DigitsUNet2DModel()  # random initialisation: differs, so the equality above checks the weights
    assert not torch.equal(fresh.net.conv_out.weight, model.net.conv_out.weight)


def _schedules(noise):
    mixed = Schedule(1.0, (
        Step(0.7, order=1, solver="dpm", prediction="data", corrector="bh2", corrector_order=1),
        Step(0.4, order=2, solver="unip-bh2", prediction="noise"),
        Step(0.15, order=3, solver="dpm", prediction="data", corrector="bh1", corrector_order=2, ratio=0.98),
        Step(0.04, order=2, solver="ipndm", prediction="noise"),
    ), final_denoise=True, name="mixed")
    return [build("dpmsolver++2m", noise, 5), mixed]


def test_ddpm_pipeline_equals_autotune_sample(exported, builtin, tmp_path):
    """DDPMPipeline.from_pretrained(exported) with the schedule's AutotuneScheduler ends where
    `autotune sample --model digits` (no class labels: unconditional) ends from the same noise, to 1e-4."""
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(exported))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.unet, DigitsUNet2DModel)
    finals_by_schedule = []
    for i, schedule in enumerate(_schedules(builtin.noise)):
        path = save(schedule, tmp_path / f"{schedule.name}.json")
        pipe.scheduler = AutotuneScheduler.from_schedule(path, pipe.scheduler.config)
        finals = record_prev_samples(pipe.scheduler)
        seed = 20 + i
        with torch.no_grad():
            images = pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(seed),
                          num_inference_steps=schedule.nfe, output_type="np").images
        assert len(finals) == schedule.nfe
        # DDPMPipeline draws randn_tensor((B, 1, 16, 16), generator, dtype=unet.dtype): the same draw here
        noise = torch.randn((BATCH, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
        noise_path, out = tmp_path / "noise.npy", tmp_path / "ours.npy"
        np.save(noise_path, noise.numpy())
        result = runner.invoke(app, ["sample", "--model", "digits", "--schedule", str(path), "--noise",
                                     str(noise_path), "--out", str(out)])
        assert result.exit_code == 0, result.output
        ours = torch.from_numpy(np.load(out))
        diff = (finals[-1] - ours).abs().max().item()
        image_diff = np.abs(images - (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max()
        print(f"digits {schedule.name} NFE {schedule.nfe}: max abs diff {diff:.3g} "
              f"(|x| max {ours.abs().max().item():.3g}), images {image_diff:.3g}")
        assert torch.isfinite(ours).all() and ours.abs().max() > 0.1
        assert diff <= TOL and image_diff <= TOL
        finals_by_schedule.append(finals[-1])
    # not vacuous: the two schedules from different noise land on different samples
    assert (finals_by_schedule[0] - finals_by_schedule[1]).abs().max().item() > 1e-2


README_SNIPPET = """
import torch
from autotune.models.digits_diffusers import DigitsDDPMPipeline
from autotune import AutotuneScheduler
from autotune.images import save_grid

pipe = DigitsDDPMPipeline.from_pretrained("digits-pipe")
pipe.scheduler = AutotuneScheduler.from_schedule("s.json", pipe.scheduler.config)
images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0),
              num_inference_steps=pipe.scheduler.num_inference_steps, output_type="pt").images
save_grid(images * 2 - 1, "digits.png")  # pipeline images are in [0, 1], grids take [-1, 1]
"""


def test_readme_snippet_in_a_fresh_interpreter(exported, tmp_path):
    """The README's lines run as they stand in a new process: one module import is all diffusers needs."""
    os.symlink(exported, tmp_path / "digits-pipe")
    result = runner.invoke(app, ["baseline", "unipc-bh2-o3", "--model", "digits", "--nfe", "5",
                                 "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    code = "import torch\ntorch.set_num_threads(1)\n" + textwrap.dedent(README_SNIPPET)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from PIL import Image

    with Image.open(tmp_path / "digits.png") as img:
        assert img.size == (4 * (4 * 17 + 1), 4 * (4 * 17 + 1))  # 4x4 grid of 16 px with 1 px pads, scale 4
        assert len(set(img.getdata())) > 2  # not a blank image


def test_errors(tmp_path):
    with pytest.raises(ModelError, match="in_channels and out_channels must be 1"):
        DigitsUNet2DModel(in_channels=3)
    with pytest.raises(ModelError, match="class labels must be in 0..9"):
        DigitsUNet2DModel()(torch.zeros(1, 1, 16, 16), 10, class_labels=torch.tensor([NULL_CLASS]))
    (tmp_path / "file").write_text("")
    for args, message in (
        (["gmm2d", "--out", str(tmp_path / "x")], "unknown model 'gmm2d'"),
        (["digits", "--format", "onnx", "--out", str(tmp_path / "x")], "--format 'onnx' is not supported"),
        (["digits", "--out", str(tmp_path / "file")], "is a file; give a folder"),
    ):
        result = runner.invoke(app, ["zoo", "export", *args])
        assert result.exit_code == 2 and message in result.output, result.output
