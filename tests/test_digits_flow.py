"""The built-in `digits-flow` model: weights, the flow parameterisation, CFG, sample quality, the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from autotune.cli import app
from autotune.models.digits import NUM_CLASSES, WEIGHTS_DIR, load_classifier, load_digits
from autotune.models.digits_flow import TRAIN_RECORD, UNET_FILE, DigitsFlowDenoiser, load_digits_flow
from autotune.models.digits_train import digits_data
from autotune.models.registry import BUILTIN, load_model
from autotune.sampling.denoiser import Denoiser, to_data_and_noise
from autotune.sampling.executor import sample
from autotune.sampling.named import build
from autotune.space.fileformat import load

# Measured on the shipped weights: guided (g = 3) samples are classified as asked 200 times out of 200 by
# DDIM (= Euler on the flow) at NFE 100 and by dpmsolver++2m at NFE 10 and 50, as for `digits`; the 20
# samples of the Euler-40 solve below: all 20. Chance is 0.1; 0.9 leaves room for a torch build's rounding
# flipping an ambiguous sample or two, not for a model that has stopped drawing the asked digit.
REF_ACC_MIN = 0.9


@pytest.fixture(scope="module")
def model() -> DigitsFlowDenoiser:
    return load_digits_flow(torch.float32)


@pytest.fixture(scope="module")
def model64() -> DigitsFlowDenoiser:
    return load_digits_flow(torch.float64)


def _batch(dtype=torch.float64, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 16, 16, generator=g).to(dtype), torch.arange(b) % NUM_CLASSES


def test_weights_load_and_attributes(model):
    assert (WEIGHTS_DIR / UNET_FILE).stat().st_size < 5e6
    record = json.loads((WEIGHTS_DIR / TRAIN_RECORD).read_text())
    assert record["model"] == "digits-flow" and record["parameterization"] == "flow"
    assert "--model digits-flow" in record["command"] and "--threads 1" in record["command"]
    assert isinstance(model, Denoiser)
    assert model.sample_shape == (1, 16, 16) and model.num_classes == 10
    assert model.parameterization == "flow" and model.noise.kind == "flow"
    assert model.noise.time_scale == 1000.0 and not model.round_time
    assert BUILTIN["digits-flow"].factory is load_digits_flow
    assert load_model("digits-flow").fingerprint() == model.fingerprint() != load_digits().fingerprint()
    # the same architecture as digits, so the same prunable units
    assert model.units == load_digits().units


def test_network_sees_t_times_1000(model):
    seen = []
    hook = model.module.register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    try:
        x, labels = _batch(torch.float32, b=2)
        model(x, torch.tensor(0.2345, dtype=torch.float64), labels)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0], torch.full((2,), 234.5), atol=1e-3, rtol=0)  # continuous, not rounded


def test_output_shapes(model):
    x, labels = _batch(torch.float32)
    t = torch.tensor(0.5)
    for cond, g in ((None, None), (labels, None), (labels, 3.0), (None, 3.0), (3, 2.0)):
        out = model(x, t, cond, guidance=g)
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def _real(per_class: int = 2):
    """``per_class`` real digits of each class and their labels."""
    x, y = digits_data()
    idx = torch.cat([(y == c).nonzero().flatten()[:per_class] for c in range(NUM_CLASSES)])
    return x[idx].double(), y[idx]


@pytest.mark.parametrize("t", [0.05, 0.3])
def test_velocity_parameterisation_recovers_data(model64, t):
    """On exact data points noised to x_t = (1 - t) x0 + t eps, the output read as the velocity eps - x0
    gives back x0 much better than x_t itself does, and points the way eps - x0 does."""
    x0, labels = _real()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tt = torch.tensor(t, dtype=torch.float64)
    xt = (1 - tt) * x0 + tt * eps
    u = model64(xt, tt, labels)
    x0_hat, eps_hat = to_data_and_noise(u, xt, 1 - tt, tt, "flow")
    err, base = float(((x0_hat - x0) ** 2).mean()), float(((xt - x0) ** 2).mean())
    assert err < 0.25 * base, (err, base)  # measured 0.09 (t = 0.05) and 0.07 (t = 0.3)
    cos = torch.nn.functional.cosine_similarity(u.flatten(1), (eps - x0).flatten(1)).min()
    assert cos > 0.85, float(cos)  # measured 0.91 and 0.94


def test_pure_noise_predicts_the_class_mean(model64):
    """At t = T (pure noise) the best x0 is E[x0 | class]: the model is trained up to the ODE's start."""
    x_real, y_real = digits_data(torch.float64)
    means = torch.stack([x_real[y_real == c].mean(0) for c in range(NUM_CLASSES)])
    x, labels = _batch(b=20, seed=5)
    tt = torch.tensor(model64.noise.T, dtype=torch.float64)
    x0_hat, _ = to_data_and_noise(model64(x, tt, labels), x, 1 - tt, tt, "flow")
    err = float(((x0_hat - means[labels]) ** 2).mean())
    assert err < 0.05 * float(means.var()), err  # measured 0.004 against a variance of 0.31


def test_guidance_one_is_conditional_and_zero_unconditional(model64):
    x, labels = _batch()
    t = torch.tensor(0.3, dtype=torch.float64)
    cond, uncond = model64(x, t, labels), model64(x, t, None)
    assert not torch.allclose(cond, uncond, atol=1e-3)
    torch.testing.assert_close(model64(x, t, labels, guidance=1.0), cond, atol=1e-6, rtol=0)
    torch.testing.assert_close(model64(x, t, labels, guidance=0.0), uncond, atol=1e-6, rtol=0)
    torch.testing.assert_close(model64(x, t, labels, guidance=3.0), uncond + 3.0 * (cond - uncond), atol=1e-6, rtol=0)


def test_guided_call_is_one_batched_forward(model):
    batches = []
    hook = model.module.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))
    try:
        x, labels = _batch(torch.float32, b=5)
        model(x, torch.tensor(0.6), labels, guidance=2.5)
    finally:
        hook.remove()
    assert batches == [10]


def test_reference_solve_gives_the_asked_classes(model):
    """A fine solve (Euler, i.e. DDIM on the flow, 40 steps) of guided samples is classified as asked."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(2)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(1))
    schedule = dataclasses.replace(build("ddim", model.noise, 40), guidance=3.0)
    result = sample(model, schedule, noise, cond=labels)
    assert result.nfe == 40
    acc = float((load_classifier().predict(result.sample.clamp(-1, 1)) == labels).float().mean())
    assert acc >= REF_ACC_MIN, acc
    metrics = model.data_metrics(result.sample, labels)
    assert metrics["class_acc"] == pytest.approx(acc) and metrics["fd"] > 0


def test_baseline_and_compare_through_the_cli(tmp_path):
    runner = CliRunner()
    path = tmp_path / "ddim5.json"
    result = runner.invoke(app, ["baseline", "ddim", "--model", "digits-flow", "--nfe", "5", "--out", str(path)])
    assert result.exit_code == 0, result.output
    s = load(path)
    assert s.nfe == 5 and s.name == "ddim" and s.t_start == pytest.approx(1.0, abs=1e-5)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "--model", "digits-flow", "--nfe", "5", "--schedules", str(path),
                                 "--baselines", "dpmsolver++2m", "--size", "4", "--no-cache", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["schedule"] for r in rows] == ["dpmsolver++2m", "ddim"]
    for r in rows:
        assert r["nfe"] == 5 and 0 < r["mse_ref"] < 1 and 0.0 <= r["class_acc"] <= 1.0 and r["fd"] > 0, r


def test_missing_weights_raise(tmp_path):
    from autotune.errors import ModelError

    with pytest.raises(ModelError, match="missing"):
        load_digits_flow(weights_dir=tmp_path)


def test_training_smoke(tmp_path):
    from autotune.models.digits_train import train_digits

    rec = train_digits(tmp_path, seed=3, steps=2, threads=1, batch=8, log_every=1, model_name="digits-flow")
    assert rec["model"] == "digits-flow" and rec["parameterization"] == "flow" and len(rec["loss_curve"]) == 2
    assert (tmp_path / UNET_FILE).is_file() and (tmp_path / TRAIN_RECORD).is_file()
    assert not (tmp_path / "digits.safetensors").exists()  # the flow run leaves digits' files alone
    assert load_digits_flow(weights_dir=tmp_path).fingerprint() != load_digits_flow().fingerprint()


def test_zoo_train_cli_trains_digits_flow(tmp_path):
    from typer.testing import CliRunner

    from autotune.cli import app

    result = CliRunner().invoke(app, ["zoo", "train", "digits-flow", "--out", str(tmp_path), "--steps", "2",
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "digits_flow.safetensors").is_file() and (tmp_path / "digits_flow_train.json").is_file()
