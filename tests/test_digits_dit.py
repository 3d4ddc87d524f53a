"""``digits-dit``: a small DiT on digits (rectified flow, CFG) whose blocks are residual units. Checked on a randomly
re-initialised network (adaLN-Zero starts every block at the identity, which would make reuse trivially exact) and
on the shipped weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autotune.models.digits import NUM_CLASSES, load_classifier
from autotune.models.digits_dit import DIT_ARCH, DIT_FILE, TRAIN_RECORD, build_dit, load_digits_dit
from autotune.models.digits_flow import DigitsFlowDenoiser
from autotune.sampling.denoiser import FeatureCache
from autotune.sampling.executor import sample
from autotune.sampling.named import build
from autotune.sampling.reuse import ThresholdReuse, deepcache

BLOCKS = tuple(f"blocks.{k}" for k in range(8))
SPANS = tuple(f"rest{k}" for k in range(1, 8))


@pytest.fixture(scope="module")
def random_dit():
    torch.manual_seed(0)
    dit = build_dit()
    with torch.no_grad():
        for p in dit.parameters():  # off the identity: every block adds something
            p.add_(0.05 * torch.randn_like(p))
    return DigitsFlowDenoiser(dit.eval().requires_grad_(False), "digits-dit", DIT_ARCH)


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 16, 16, generator=g), torch.arange(b) % NUM_CLASSES


def test_units_are_blocks_and_spans_and_the_state_dict_has_no_span(random_dit):
    assert tuple(random_dit.units) == BLOCKS + SPANS
    assert not any(k.startswith("rest") for k in random_dit.module.state_dict())


def test_reusing_a_span_is_reusing_its_blocks(random_dit):
    """Residuals telescope: the span rest1's cached residual is the sum of blocks 1..7's, so reusing it equals
    reusing each of them (recorded at the same call); at the recording inputs both give the full output back."""
    x, labels = _batch()
    x2 = x + 0.3 * _batch(seed=1)[0]
    t, t2 = torch.tensor(0.8), torch.tensor(0.6)
    cache = FeatureCache()
    with torch.no_grad():
        full = random_dit(x, t, labels, guidance=2.0, record=BLOCKS + SPANS, cache=cache)
        again = random_dit(x, t, labels, guidance=2.0, reuse=("rest1",), cache=cache)
        span = random_dit(x2, t2, labels, guidance=2.0, reuse=("rest1",), cache=cache)
        blocks = random_dit(x2, t2, labels, guidance=2.0, reuse=BLOCKS[1:], cache=cache)
        computed = random_dit(x2, t2, labels, guidance=2.0)
        skipped = random_dit(x2, t2, labels, guidance=2.0, skip=("rest1",))
    assert float((again - full).abs().max()) <= 1e-5
    assert float((span - blocks).abs().max()) <= 1e-5
    assert float((span - computed).abs().max()) > 1e-3  # reuse is not recomputation
    assert float((skipped - span).abs().max()) > 1e-3  # nor a skip


def test_threshold_rule_on_a_residual_span_is_firstblockcache(random_dit):
    """A threshold no change reaches reuses rest1 at every call after the first: DeepCache's pattern with one full
    call, on the residual."""
    x, labels = _batch()
    base = dataclasses.replace(build("unipc-flow", random_dit.noise, 6), guidance=2.0)
    always = ThresholdReuse(random_dit, 1e9, first="blocks.0", rest="rest1")
    with torch.no_grad():
        out = sample(always, base, x, labels).sample
        static = sample(random_dit, deepcache(base, 6, "rest1"), x, labels).sample
    assert (always.calls, always.reused) == (6, 5)
    torch.testing.assert_close(out, static, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", [0, 1])
def test_onnx_engine_with_block_reuse_matches_the_executor(random_dit, tmp_path, order):
    pytest.importorskip("onnxruntime")
    from autotune.compile import build_engine

    base = dataclasses.replace(build("unipc-flow", random_dit.noise, 6), guidance=2.0)
    steps = tuple(dataclasses.replace(st, reuse=("rest2",) if k % 2 else (), skip=("blocks.7",) if k == 5 else ())
                  for k, st in enumerate(base.steps))
    schedule = dataclasses.replace(base, steps=steps, reuse_order=order)
    man = build_engine(random_dit, schedule, tmp_path / "e", "onnxruntime")
    assert man.parity["engine_vs_executor_max_abs"] <= 1e-3


def test_shipped_weights_make_the_asked_digits():
    """The shipped EMA weights: a fine guided solve (Euler, 40 steps) is classified as asked."""
    model = load_digits_dit()
    assert model.parameterization == "flow" and model.units == BLOCKS + SPANS
    labels = torch.arange(NUM_CLASSES).repeat_interleave(3)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(1))
    schedule = dataclasses.replace(build("ddim", model.noise, 40), guidance=3.0)
    with torch.no_grad():
        result = sample(model, schedule, noise, cond=labels)
    acc = float((load_classifier().predict(result.sample.clamp(-1, 1)) == labels).float().mean())
    print(f"digits-dit: class accuracy of 30 guided samples (Euler 40): {acc:.2f}")
    assert acc >= 0.9, acc


def test_training_smoke(tmp_path):
    from autotune.models.digits_train import train_digits

    rec = train_digits(tmp_path, seed=3, steps=2, threads=1, batch=8, log_every=1, model_name="digits-dit")
    assert rec["model"] == "digits-dit" and rec["arch"]["depth"] == 8 and len(rec["loss_curve"]) == 2
    assert (tmp_path / DIT_FILE).is_file() and (tmp_path / TRAIN_RECORD).is_file()
    assert not (tmp_path / "digits_flow.safetensors").exists()
    load_digits_dit(weights_dir=tmp_path)  # what training writes loads back


def test_a_residual_mark_that_does_not_fit_the_output_is_refused_in_one_line(random_dit):
    from autotune.errors import SamplingError

    block = random_dit.module.blocks[1]
    block.autotune_residual = ("encoder_hidden_states", "x")  # as if a block returned two streams
    try:
        x, labels = _batch()
        with pytest.raises(SamplingError, match=r"unit 'blocks.1' \(DiTBlock\) returns one output, but its residual"):
            random_dit(x, torch.tensor(0.5), labels, record=("blocks.1",), cache=FeatureCache())
    finally:
        del block.autotune_residual  # the class attribute again
