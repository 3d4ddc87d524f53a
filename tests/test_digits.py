"""The built-in `digits` model: weights, the Denoiser contract, CFG, unit skipping, sample quality."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autotune.errors import ModelError
from autotune.models.digits import (
    CLASSIFIER_FILE, NUM_CLASSES, UNET_FILE, WEIGHTS_DIR, DigitsDenoiser, load_classifier, load_digits,
)
from autotune.models.guidance import ClassifierFreeGuidance
from autotune.models.registry import BUILTIN
from autotune.sampling.denoiser import Denoiser
from autotune.sampling.executor import sample
from autotune.sampling.named import build


@pytest.fixture(scope="module")
def model() -> DigitsDenoiser:
    return load_digits(torch.float32)


@pytest.fixture(scope="module")
def model64() -> DigitsDenoiser:
    return load_digits(torch.float64)


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


def _batch(dtype=torch.float64, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 16, 16, generator=g).to(dtype), torch.arange(b) % NUM_CLASSES


def test_weights_load_and_attributes(model):
    assert (WEIGHTS_DIR / UNET_FILE).stat().st_size < 5e6
    assert (WEIGHTS_DIR / CLASSIFIER_FILE).is_file()
    assert isinstance(model, Denoiser)
    assert model.sample_shape == (1, 16, 16) and model.num_classes == 10
    assert model.parameterization == "epsilon" and model.noise.kind == "vp_discrete"
    assert 5e5 <= sum(p.numel() for p in model.module.parameters()) <= 1.5e6
    assert len(model.units) >= 6 and "mid_attn" in model.units
    assert model.fingerprint() == load_digits().fingerprint()
    assert BUILTIN["digits"].factory is load_digits


def test_output_shapes(model):
    x, labels = _batch(torch.float32)
    t = torch.tensor(0.5)
    for cond, g in ((None, None), (labels, None), (labels, 3.0), (None, 3.0), (3, 2.0)):
        out = model(x, t, cond, guidance=g)
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_guidance_one_is_conditional_and_zero_unconditional(model64):
    x, labels = _batch()
    t = torch.tensor(0.3, dtype=torch.float64)
    cond = model64(x, t, labels)
    uncond = model64(x, t, None)
    assert not torch.allclose(cond, uncond, atol=1e-3)
    torch.testing.assert_close(model64(x, t, labels, guidance=1.0), cond, atol=1e-6, rtol=0)
    torch.testing.assert_close(model64(x, t, labels, guidance=0.0), uncond, atol=1e-6, rtol=0)


def test_batched_cfg_equals_two_forwards(model64):
    x, labels = _batch()
    t = torch.tensor(0.7, dtype=torch.float64)
    cond, uncond = model64(x, t, labels), model64(x, t, None)
    torch.testing.assert_close(model64(x, t, labels, guidance=3.0), uncond + 3.0 * (cond - uncond), atol=1e-6, rtol=0)


def test_cfg_wrapper_runs_one_doubled_forward():
    calls = []

    def inner(x, tm, c):
        calls.append(x.shape[0])
        return x * c[:, None].to(x.dtype)

    cfg = ClassifierFreeGuidance(inner, torch.tensor(0))
    out = cfg(torch.ones(3, 2), torch.zeros(3), torch.tensor([1, 2, 3]), 2.0)
    assert calls == [6]
    torch.testing.assert_close(out, torch.tensor([[2.0] * 2, [4.0] * 2, [6.0] * 2]))
    torch.testing.assert_close(cfg(torch.ones(2, 2), torch.zeros(2), None, 5.0), torch.zeros(2, 2))


def test_skipping_a_unit_changes_output_keeps_shape(model):
    x, labels = _batch(torch.float32)
    t = torch.tensor(0.5)
    base = model(x, t, labels, guidance=2.0)
    for unit in model.units:
        out = model(x, t, labels, skip=frozenset({unit}), guidance=2.0)
        assert out.shape == base.shape and torch.isfinite(out).all()
        assert (out - base).abs().max() > 1e-4, unit
    torch.testing.assert_close(model(x, t, labels, guidance=2.0), base)  # skipping is undone afterwards


def test_bad_labels_raise(model):
    x, _ = _batch(torch.float32, b=2)
    t = torch.tensor(0.5)
    with pytest.raises(ModelError, match="0..9"):
        model(x, t, torch.tensor([0, 10]))
    with pytest.raises(ModelError, match="shape"):
        model(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ModelError, match="integer"):
        model(x, t, torch.tensor([0.0, 1.0]))


def test_guided_samples_are_the_asked_class(model, clf):
    labels = torch.arange(10).repeat_interleave(10)
    noise = torch.randn(100, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    schedule = dataclasses.replace(build("dpmsolver++2m", model.noise, 10), guidance=3.0)
    result = sample(model, schedule, noise, cond=labels)
    assert result.nfe == 10 and result.sample.shape == noise.shape
    acc = float((clf.predict(result.sample.clamp(-1, 1)) == labels).float().mean())
    assert acc >= 0.8, acc


def test_classifier_features(clf):
    x, _ = _batch(torch.float32)
    assert clf.features(x).shape == (6, 128)
    assert clf.predict(x).shape == (6,)


def test_missing_weights_raise(tmp_path):
    with pytest.raises(ModelError, match="missing"):
        load_digits(weights_dir=tmp_path)


def test_training_smoke(tmp_path):
    from autotune.models.digits_train import train_classifier, train_digits

    logs = []
    rec = train_digits(tmp_path, seed=3, steps=2, threads=1, log=logs.append, batch=8, log_every=1)
    assert rec["steps"] == 2 and len(rec["loss_curve"]) == 2 and len(logs) == 2
    assert load_digits(weights_dir=tmp_path).fingerprint() != load_digits().fingerprint()
    rec = train_classifier(tmp_path, seed=3, threads=1, epochs=1, batch=256)
    assert 0.0 <= rec["held_out_accuracy"] <= 1.0
    assert load_classifier(weights_dir=tmp_path).features(torch.zeros(1, 1, 16, 16)).shape == (1, 128)
