"""Reuse of the guidance direction (models/guidance.py, ``GUIDANCE_UNIT``): a call that reuses it runs the
conditional half alone; the schedule rules, the executor, stage 2's repair and an ONNX engine carry it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from autotune.errors import SamplingError, ScheduleError
from autotune.models.digits import load_digits
from autotune.models.guidance import ClassifierFreeGuidance, with_guidance_unit
from autotune.sampling.denoiser import FeatureCache, Units
from autotune.sampling.executor import sample
from autotune.sampling.named import build
from autotune.sampling.noise import VPLinear
from autotune.sampling.reuse import deepcache
from autotune.space.schedule import GUIDANCE_UNIT, Step, Schedule, reusable_for


class Recorder:
    """``inner(x, t, c)``: the batch sizes it was called with; its guidance direction is ``c`` whatever x and t."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, c):
        self.batches.append(x.shape[0])
        return x * t[:, None] + c[:, None]


def test_reusing_the_direction_runs_the_conditional_half_only_and_is_exact_when_it_is_constant():
    inner = Recorder()
    cfg = ClassifierFreeGuidance(inner, torch.tensor(0.0))
    x, c = torch.randn(4, 3), torch.tensor([1.0, 2.0, 3.0, 4.0])
    cache = FeatureCache()
    t0, t1 = torch.full((4,), 0.8), torch.full((4,), 0.5)
    full = cfg.masked(None, x, t0, c, 3.0, record={GUIDANCE_UNIT}, cache=cache)
    torch.testing.assert_close(full, cfg(x, t0, c, 3.0), atol=0, rtol=0)  # recording changes nothing computed
    torch.testing.assert_close(cache[GUIDANCE_UNIT], c[:, None].expand(4, 3))
    assert inner.batches == [8, 8]
    reused = cfg.masked(None, x, t1, c, 3.0, reuse={GUIDANCE_UNIT}, cache=cache)
    assert inner.batches[-1] == 4  # one forward of the plain batch
    torch.testing.assert_close(reused, cfg(x, t1, c, 3.0))


def test_guidance_reuse_needs_a_guided_call_and_a_cached_direction():
    cfg = ClassifierFreeGuidance(Recorder(), torch.tensor(0.0))
    x, c, t = torch.randn(2, 3), torch.tensor([1.0, 2.0]), torch.full((2,), 0.5)
    with pytest.raises(SamplingError, match="needs a guided call"):
        cfg.masked(None, x, t, c, None, reuse={GUIDANCE_UNIT}, cache=FeatureCache())
    with pytest.raises(SamplingError, match="needs a guided call"):
        cfg.masked(None, x, t, None, 2.0, record={GUIDANCE_UNIT}, cache=FeatureCache())
    with pytest.raises(SamplingError, match="no cached output"):
        cfg.masked(None, x, t, c, 2.0, reuse={GUIDANCE_UNIT}, cache=FeatureCache())
    with pytest.raises(SamplingError, match="feature cache"):
        cfg.masked(None, x, t, c, 2.0, reuse={GUIDANCE_UNIT})


def test_guided_models_declare_the_unit_and_unguided_schedules_may_not_reuse_it():
    units = with_guidance_unit(Units(("a",), ("deep",)))
    assert tuple(units) == ("a",) and units.reusable == ("a", "deep", GUIDANCE_UNIT)
    assert reusable_for(units, 2.0) == ("a", "deep", GUIDANCE_UNIT)
    assert reusable_for(units, None) == ("a", "deep")
    assert load_digits().units.reusable[-1] == GUIDANCE_UNIT
    steps = (Step(0.9), Step(0.5, reuse=(GUIDANCE_UNIT,)), Step(0.0))
    Schedule(t_start=1.0, steps=steps, guidance=2.0)
    with pytest.raises(ScheduleError, match="no guidance") as e:
        Schedule(t_start=1.0, steps=steps)
    assert e.value.field == "steps[1].reuse"


def test_a_guidance_reusing_step_caches_no_other_unit():
    # step 1 computes "a" but on half the batch, so it is not cached: a reuse of "a" at step 2 has no source
    steps = (Step(0.9, skip=("a",)), Step(0.6, reuse=(GUIDANCE_UNIT,)), Step(0.3, reuse=("a",)), Step(0.0))
    with pytest.raises(ScheduleError, match="no earlier model call computed it"):
        Schedule(t_start=1.0, steps=steps, guidance=2.0)
    ok = (Step(0.9), Step(0.6, reuse=(GUIDANCE_UNIT,)), Step(0.3, reuse=("a",)), Step(0.0))
    Schedule(t_start=1.0, steps=ok, guidance=2.0)


def test_stage2_repair_counts_a_guidance_reusing_step_as_caching_nothing():
    from autotune.search.skip_stage import COMPUTE, REUSE, SKIP, SkipMaskSearch

    base = dataclasses.replace(build("dpmsolver++2m", VPLinear(), 4), guidance=2.0)
    search = SkipMaskSearch(base, ("a",), 10.0, reusable=("a", GUIDANCE_UNIT), reuse_orders=(0,))
    assert search.units == ("a", GUIDANCE_UNIT)
    genome = np.array([SKIP, COMPUTE, COMPUTE, REUSE, REUSE, COMPUTE, COMPUTE, COMPUTE], dtype=np.int8)
    repaired = search._repair(genome)
    assert list(repaired[:6]) == [SKIP, COMPUTE, COMPUTE, REUSE, COMPUTE, COMPUTE]  # step 2's reuse of "a" undone
    s = search.schedule_of(repaired)
    assert [st.reuse for st in s.steps] == [(), (GUIDANCE_UNIT,), (), ()]
    # the DeepCache-style seeds cover the guidance direction too
    assert any(GUIDANCE_UNIT in st.reuse for st in search.ask(1)[0].steps)


def test_stage2_seeds_a_guided_search_with_the_direction_and_a_deep_unit_reused_together():
    from autotune.search.skip_stage import COMBINED_UNITS, FULL_TAIL, SkipMaskSearch

    base = dataclasses.replace(build("dpmsolver++2m", VPLinear(), 12), guidance=2.0)
    units = ("deep0", "deep1", "deep2", GUIDANCE_UNIT)
    search = SkipMaskSearch(base, (), 10.0, seed=1, reusable=units)
    combined = [s for s in search.ask(len(search.seeds)) if any(len(st.reuse) > 1 for st in s.steps)]
    assert len(combined) == 2 * COMBINED_UNITS  # intervals 2 and 3 for deep0 and deep1, not deep2
    for s, (unit, interval) in zip(combined, [("deep0", 2), ("deep0", 3), ("deep1", 2), ("deep1", 3)]):
        expect = [() if k % interval == 0 or k >= 12 - FULL_TAIL else (unit, GUIDANCE_UNIT) for k in range(12)]
        assert [tuple(sorted(st.reuse)) for st in s.steps] == [tuple(sorted(r)) for r in expect]
        assert s.reuse_order == 1  # seeds carry the first-order forecast
    unguided = SkipMaskSearch(dataclasses.replace(base, guidance=None), (), 10.0, seed=1, reusable=units[:3])
    assert not any(len(st.reuse) > 1 for s in unguided.ask(len(unguided.seeds)) for st in s.steps)


def _batch(b=6):
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(3)), torch.arange(b) % 10


def test_digits_reusing_the_direction_halves_the_batch_of_its_calls_and_stays_close(digits, guided):
    x, labels = _batch()
    full = sample(digits, guided, x, labels).sample
    batches: list[int] = []
    hook = digits.module.conv_in.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    try:
        for order in (0, 1):
            s = dataclasses.replace(deepcache(guided, 2, GUIDANCE_UNIT), reuse_order=order)
            batches.clear()
            out = sample(digits, s, x, labels).sample
            assert batches == [12, 6, 12, 6, 12, 6]
            rms = float((out - full).pow(2).mean().sqrt())
            assert 1e-5 < rms < 0.1, rms  # an approximation: close, not equal
        # with the deep branch reused in the same steps: its cached conditional half is read
        both = guided.with_steps([dataclasses.replace(st, reuse=(GUIDANCE_UNIT, "deep0") if k % 2 else ())
                                  for k, st in enumerate(guided.steps)])
        batches.clear()
        out = sample(digits, both, x, labels).sample
        assert batches == [12, 6, 12, 6, 12, 6] and torch.isfinite(out).all()
        assert float((out - full).pow(2).mean().sqrt()) < 0.2
    finally:
        hook.remove()


def test_onnx_engine_with_guidance_reuse_matches_the_executor(digits, guided, tmp_path):
    pytest.importorskip("onnxruntime")
    from autotune.compile import build_engine

    s = dataclasses.replace(deepcache(guided, 2, GUIDANCE_UNIT), reuse_order=1)
    man = build_engine(digits, s, tmp_path / "e", "onnxruntime")
    assert man.parity["engine_vs_executor_max_abs"] <= 1e-3


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_a_guided_search_offers_stage2_the_guidance_direction_and_an_unguided_one_does_not(tmp_path, monkeypatch,
                                                                                          guidance):
    from typer.testing import CliRunner

    from autotune.cli import app
    from autotune.evaluate import ids
    from autotune.search import skip_stage

    monkeypatch.setitem(ids.DEFAULT_SIZE, "report", 8)
    seen = {}
    original = skip_stage.run_stage2

    def spy(*args, **kwargs):
        seen["reusable"] = kwargs["reusable"]
        return original(*args, **kwargs)

    monkeypatch.setattr(skip_stage, "run_stage2", spy)
    out = tmp_path / "s.json"
    args = ["search", "--model", "digits", "--nfe", 4, "--method", "random", "--budget", 4, "--workers", 0,
            "--refine", 0, "--no-cache", "--set-size", 4, "--validate", 0, "--stage2-budget", 4, "--reuse",
            "--out", out] + (["--guidance", guidance] if guidance is not None else [])
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "deep0" in seen["reusable"]
    assert (GUIDANCE_UNIT in seen["reusable"]) == (guidance is not None)
