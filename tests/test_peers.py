"""Exactness against diffusers: `autotune baseline` + `autotune sample` reproduce diffusers' own schedulers."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from autotune.cli import app
from autotune.models.diffusers_dir import load_pipeline_dir
from autotune.sampling.executor import sample
from autotune.sampling.named import build
from peers import PEERS, run_peer

runner = CliRunner()
TOL = 1e-4


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_cli_reproduces_diffusers(pipeline_dirs, tmp_path, prediction, dtype):
    pipe = pipeline_dirs[prediction]
    tdtype = getattr(torch, dtype)
    model = load_pipeline_dir(pipe, dtype=tdtype)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=tdtype)
    np.save(tmp_path / "noise.npy", noise.numpy())
    worst = {}
    for name in PEERS:
        for nfe in (5, 10):
            sched_file = tmp_path / f"{name}-{nfe}.json"  # where the name ends (the bh1 ones: sigma_min)
            _cli("baseline", name, "--model", pipe, "--nfe", nfe, "--out", sched_file)
            out_file = tmp_path / f"{name}-{nfe}.npy"
            _cli("sample", "--model", pipe, "--schedule", sched_file, "--noise", tmp_path / "noise.npy",
                 "--out", out_file, "--dtype", dtype)
            ours = torch.from_numpy(np.load(out_file))
            ref = run_peer(name, model.unet, model.scheduler_config, noise, nfe)
            assert ours.dtype == tdtype and torch.isfinite(ref).all()
            worst[(name, nfe)] = (ours - ref).abs().max().item()
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, f"max abs difference above {TOL}: {bad}"


def test_schedules_start_at_T_despite_ddpm_config(pipeline_dirs):
    """The directory's scheduler config says `leading` + `clip_sample: true`; named schedules ignore both."""
    pipe = pipeline_dirs["epsilon"]
    config = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    assert config["timestep_spacing"] == "leading" and config["clip_sample"] is True
    model = load_pipeline_dir(pipe)
    for name in PEERS:
        s = build(name, model.noise, 5)
        assert s.t_start == 1.0 and model.noise.model_time(torch.tensor(s.t_start)).item() == 999.0


@pytest.mark.parametrize("order", [2, 3])
def test_diffusers_bh1_is_the_named_schedule_ending_at_sigma_min(order):
    """Each named schedule has the diffusers peer its name says: ``unipc-bh1-oK-smin`` is ours to sigma_min
    under its own name (the runs above check it against diffusers), and cannot be built ending anywhere else."""
    from autotune.errors import ScheduleError
    from autotune.sampling.noise import VPLinear

    name = f"unipc-bh1-o{order}"
    theirs = build(f"{name}-smin", VPLinear(), 5)
    ours = build(name, VPLinear(), 5, final="sigma_min")
    assert theirs.steps == ours.steps and theirs.t_start == ours.t_start and theirs.times[-1] == VPLinear().t_min
    assert theirs.name == f"{name}-smin" and theirs.metadata == {"named": theirs.name}
    assert build(f"{name}-smin", VPLinear(), 5, final="sigma_min") == theirs
    assert build(name, VPLinear(), 5).times[-1] == 0.0 and f"{name}-smin" in PEERS and name not in PEERS
    with pytest.raises(ScheduleError, match="ends at sigma_min by its name"):
        build(f"{name}-smin", VPLinear(), 5, final="zero")


def test_unipc_bh1_stays_finite_onto_sigma_zero(pipeline_dirs):
    """diffusers 0.42's UniPC bh1 returns NaN when its last step goes to sigma = 0; ours must not."""
    pipe = pipeline_dirs["epsilon"]
    model = load_pipeline_dir(pipe)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for nfe in (5, 10):
        ours = sample(model, build("unipc-bh1-o2", model.noise, nfe, final="zero"), noise).sample
        assert torch.isfinite(ours).all()
        # and a sensible one: stopping at sigma_min (sigma ~ 0.01) instead changes the sample only slightly
        near = sample(model, build("unipc-bh1-o2", model.noise, nfe, final="sigma_min"), noise).sample
        assert (ours - near).abs().mean() < 0.05 * near.abs().mean()
    peer = run_peer("unipc-bh1-o2-smin", model.unet, model.scheduler_config, noise, 5, final_sigmas_type="zero")
    if torch.isfinite(peer).all():
        pytest.skip("this diffusers version no longer returns NaN for bh1 onto sigma = 0")


def test_nfe_is_counted_from_model_calls(pipeline_dirs):
    model = load_pipeline_dir(pipeline_dirs["epsilon"])
    calls = []
    inner = model.fn
    model.fn = lambda x, t: calls.append(1) or inner(x, t)
    noise = torch.randn(2, 3, 8, 8)
    for name in PEERS:
        calls.clear()
        result = sample(model, build(name, model.noise, 6), noise)
        assert result.nfe == len(calls) == 6
