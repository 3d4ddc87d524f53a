"""Reuse of cached unit outputs (DeepCache, block caching): Step.reuse, the plan, the executor's feature cache,
the baker and an ONNX engine, digits' deep branches, the named reuse policies."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
from torch import nn

from autotune.errors import SamplingError, ScheduleError
from autotune.search.strategy import SearchError
from autotune.sampling.coefficients import make_plan
from autotune.sampling.denoiser import FeatureCache, TorchDenoiser, Units, forecast
from autotune.sampling.executor import sample
from autotune.sampling.named import build
from autotune.sampling.noise import VPLinear
from autotune.sampling.reuse import ThresholdReuse, deepcache, without_reuse
from autotune.space.fileformat import dumps, loads
from autotune.space.schedule import Schedule, Step


def _with(schedule: Schedule, **per_step) -> Schedule:
    """``_with(s, s2={"reuse": (...)})`` edits steps[2]."""
    steps = list(schedule.steps)
    for key, changes in per_step.items():
        steps[int(key[1:])] = dataclasses.replace(steps[int(key[1:])], **changes)
    return schedule.with_steps(steps)


class Counting(nn.Module):
    """A unit that counts its forwards; ``const`` makes its output independent of the input (so reuse is exact)."""

    autotune_prunable = True

    def __init__(self, const: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.const = const
        self.calls = 0

    def forward(self, h):
        self.calls += 1
        return self.lin(torch.ones_like(h) if self.const else h)


class TinyNet(nn.Module):
    def __init__(self, const: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.block = Counting(const)
        self.out = nn.Linear(8, 3)

    def forward(self, x, t):
        return self.out(self.block(self.inp(x)) + t[:, None] * 1e-3)


# -- the schedule value and its file ---------------------------------------------------------------------------

def test_reuse_is_in_identity_and_file_only_when_used():
    ns = VPLinear()
    s = build("dpmsolver++2m", ns, 4)
    assert all("reuse" not in st for st in s.identity()["steps"])
    assert '"reuse"' not in dumps(s)
    r = _with(s, s2={"reuse": ("mid", "down")})
    assert r.steps[2].reuse == ("down", "mid")  # canonical: sorted
    assert r.hash() != s.hash() and without_reuse(r).hash() == s.hash()
    back = loads(dumps(r))
    assert back == r and back.hash() == r.hash() and back.units_reused == {"down", "mid"}
    assert json.loads(dumps(r))["steps"][2]["reuse"] == ["down", "mid"]


def test_reuse_order_is_in_identity_and_file_only_when_used_and_checked():
    ns = VPLinear()
    r = deepcache(build("dpmsolver++2m", ns, 6), 2)
    f = dataclasses.replace(r, reuse_order=1)
    assert "reuse_order" not in r.identity() and '"reuse_order"' not in dumps(r)
    assert f.hash() != r.hash() and json.loads(dumps(f))["reuse_order"] == 1
    back = loads(dumps(f))
    assert back == f and back.hash() == f.hash()
    # nothing reused: the order changes nothing computed, so it is dropped (same value, same hash)
    plain = build("dpmsolver++2m", ns, 6)
    assert dataclasses.replace(plain, reuse_order=1) == plain
    assert json.loads(dumps(dataclasses.replace(r, reuse_order=2)))["reuse_order"] == 2
    for bad in (3, -1, True, 1.0, "1"):
        with pytest.raises(ScheduleError) as e:
            dataclasses.replace(r, reuse_order=bad)
        assert e.value.field == "reuse_order"
    with pytest.raises(ScheduleError) as e:
        loads(dumps(f).replace('"reuse_order": 1', '"reuse_order": 3'))
    assert e.value.field == "reuse_order"


def test_forecast_extrapolates_linearly_in_time():
    h0, h1 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    t0, t1 = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    out = forecast([(t0, h0), (t1, h1)], torch.tensor(0.6, dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([4.0, 0.5]))  # half a step on: h1 + 0.5 (h1 - h0)
    assert out.dtype == torch.float32
    assert forecast([(t1, h1)], 0.6) is h1  # one computed output: DeepCache's copy


def test_second_order_forecast_is_the_parabola_through_the_last_three():
    ts = [torch.tensor(v, dtype=torch.float64) for v in (0.95, 0.8, 0.7, 0.55)]

    def h(t):  # a feature quadratic in time: what order 2 extrapolates exactly and order 1 does not
        t = float(t)
        return torch.tensor([1.0 + 2.0 * t - 3.0 * t * t, -0.5 * t * t], dtype=torch.float64)

    history = [(t, h(t)) for t in ts[:3]]
    torch.testing.assert_close(forecast(history, ts[3], order=2), h(ts[3]), atol=1e-12, rtol=0)
    assert float((forecast(history, ts[3], order=1) - h(ts[3])).abs().max()) > 1e-2
    # order 1 reads the last two as before (a longer history changes nothing), order 0 copies
    torch.testing.assert_close(forecast(history, ts[3], order=1), forecast(history[1:], ts[3]), atol=0, rtol=0)
    assert forecast(history, ts[3], order=0) is history[-1][1]
    # two outputs: the highest order they allow, the line
    torch.testing.assert_close(forecast(history[1:], ts[3], order=2), forecast(history[1:], ts[3]), atol=0, rtol=0)
    # structured features (a transformer block's pair, None where it outputs none) are forecast part by part
    pairs = [(t, (None, x)) for t, x in history]
    assert forecast(pairs, ts[3], order=2)[0] is None
    torch.testing.assert_close(forecast(pairs, ts[3], order=2)[1], h(ts[3]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("steps, field, reason", [
    ([Step(0.5, reuse=("a",)), Step(0.0)], "steps[0].reuse", "first step cannot reuse"),
    ([Step(0.6), Step(0.3, skip=("a",), reuse=("a",)), Step(0.0)], "steps[1].reuse", "both skipped and reused"),
    ([Step(0.6, skip=("a",)), Step(0.3, reuse=("a",)), Step(0.0)], "steps[1].reuse", "no earlier model call"),
    # "a" contains "a.b": a call that reuses or skips "a" does not run "a.b"
    ([Step(0.6, skip=("a",)), Step(0.3, reuse=("a.b",)), Step(0.0)], "steps[1].reuse", "no earlier model call"),
    ([Step(0.6), Step(0.3, reuse=("a", "a")), Step(0.0)], "steps[1].reuse", "twice"),
    ([Step(0.6), Step(0.3, reuse=("",)), Step(0.0)], "steps[1].reuse", "list of unit names"),
])
def test_bad_reuse_is_refused_naming_the_field(steps, field, reason):
    with pytest.raises(ScheduleError, match=reason) as e:
        Schedule(1.0, tuple(steps))
    assert e.value.field == field


def test_reuse_after_an_earlier_computing_call_is_valid():
    s = Schedule(1.0, (Step(0.7), Step(0.5, reuse=("a",)), Step(0.3, reuse=("a.b",)), Step(0.0, reuse=("a",))))
    assert s.units_reused == {"a", "a.b"} and not s.units_used


def test_unknown_reused_units_are_refused_like_skipped_ones():
    s = Schedule(1.0, (Step(0.5), Step(0.0, reuse=("deep9",))))
    with pytest.raises(ScheduleError, match="unknown unit 'deep9'") as e:
        s.check_units(Units(("down0",), ("deep0",)))
    assert e.value.field == "steps[1].reuse"
    Schedule(1.0, (Step(0.5), Step(0.0, reuse=("deep0",)))).check_units(Units(("down0",), ("deep0",)))
    with pytest.raises(ScheduleError, match="steps\\[1\\].skip"):  # reuse-only units cannot be skipped
        Schedule(1.0, (Step(0.5), Step(0.0, skip=("deep0",)))).check_units(Units(("down0",), ("deep0",)))
    text = dumps(Schedule(1.0, (Step(0.5), Step(0.0, reuse=("deep9",)))))
    with pytest.raises(ScheduleError, match="unknown unit"):
        loads(text, units=Units(("down0",), ("deep0",)))
    with pytest.raises(ScheduleError, match="reuse\\[0\\]"):
        loads(text.replace('"deep9"', "3"))


def test_units_keep_their_reusable_names_through_pickle():
    u = Units(("a", "b"), ("deep",))
    assert u == ("a", "b") and u.reusable == ("a", "b", "deep")
    v = pickle.loads(pickle.dumps(u))
    assert v == u and v.reusable == u.reusable


# -- plan and executor -----------------------------------------------------------------------------------------

def test_plan_calls_carry_reuse_and_record():
    ns = VPLinear()
    s = _with(build("dpmsolver++2m", ns, 5), s1={"reuse": ("block",)}, s2={"reuse": ("block",)},
              s4={"reuse": ("block",)})
    calls = make_plan(s, ns).calls
    assert [sorted(c.reuse) for c in calls] == [[], ["block"], ["block"], [], ["block"]]
    assert [sorted(c.record) for c in calls] == [["block"], [], [], ["block"], []]
    assert all(not c.reuse and not c.record for c in make_plan(without_reuse(s), ns).calls)


def test_executor_reuses_the_cached_output_and_skips_the_compute():
    torch.manual_seed(0)
    ns = VPLinear()
    noise = torch.randn(4, 3)
    full = build("dpmsolver++2m", ns, 5)
    reused = _with(full, s1={"reuse": ("block",)}, s2={"reuse": ("block",)}, s4={"reuse": ("block",)})
    # a unit whose output does not depend on its input: reusing it is exact, and it runs only at steps 0 and 3
    model = TorchDenoiser(TinyNet(const=True), ns, "epsilon")
    a = sample(model, full, noise)
    model.module.block.calls = 0
    b = sample(model, reused, noise)
    assert model.module.block.calls == 2 and b.nfe == 5
    torch.testing.assert_close(b.sample, a.sample, atol=0, rtol=0)
    assert "forward" not in model.module.block.__dict__  # the unit is restored after each call
    # an input-dependent unit: reuse really changes the result
    model = TorchDenoiser(TinyNet(const=False), ns, "epsilon")
    assert (sample(model, reused, noise).sample - sample(model, full, noise).sample).abs().max() > 1e-6


class Clock(nn.Module):
    """A unit whose output is a polynomial of degree ``power`` in the model time: affine by default, so a
    first-order forecast of it is exact (with ``power`` 2, a second-order one)."""

    autotune_prunable = True

    def __init__(self, power: int = 1) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 8)
        self.power = power
        self.calls = 0

    def forward(self, t):
        self.calls += 1
        return self.lin((t ** self.power)[:, None])


class ClockNet(nn.Module):
    def __init__(self, power: int = 1) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.clock = Clock(power)
        self.out = nn.Linear(8, 3)

    def forward(self, x, t):
        return self.out(torch.tanh(self.inp(x) + self.clock(t / 1000)))


def test_first_order_reuse_forecasts_a_unit_affine_in_time_exactly():
    torch.manual_seed(0)
    ns = VPLinear()
    noise = torch.randn(4, 3)
    full = build("dpmsolver++2m", ns, 6)
    pattern = _with(full, s2={"reuse": ("clock",)}, s3={"reuse": ("clock",)}, s5={"reuse": ("clock",)})
    model = TorchDenoiser(ClockNet(), ns, "epsilon")
    calls = make_plan(dataclasses.replace(pattern, reuse_order=1), ns).calls
    assert [c.forecast for c in calls] == [False, False, True, True, False, True]
    assert [sorted(c.record) for c in calls] == [["clock"], ["clock"], [], [], ["clock"], []]
    a = sample(model, full, noise).sample
    copied = sample(model, pattern, noise).sample
    model.module.clock.calls = 0
    forecast_run = sample(model, dataclasses.replace(pattern, reuse_order=1), noise)
    assert model.module.clock.calls == 3 and forecast_run.nfe == 6
    assert (copied - a).abs().max() > 1e-3  # a copy of a moving unit is wrong ...
    torch.testing.assert_close(forecast_run.sample, a, atol=1e-5, rtol=0)  # ... its linear forecast exact


def test_second_order_reuse_forecasts_a_unit_quadratic_in_time_exactly():
    torch.manual_seed(0)
    ns = VPLinear()
    noise = torch.randn(4, 3)
    full = build("dpmsolver++2m", ns, 7)
    pattern = _with(full, s3={"reuse": ("clock",)}, s5={"reuse": ("clock",)}, s6={"reuse": ("clock",)})
    net = ClockNet(power=2)
    model = TorchDenoiser(net, ns, "epsilon")
    calls = make_plan(dataclasses.replace(pattern, reuse_order=2), ns).calls
    assert [c.forecast for c in calls] == [0, 0, 0, 2, 0, 2, 2]
    a = sample(model, full, noise).sample
    first = sample(model, dataclasses.replace(pattern, reuse_order=1), noise).sample
    net.clock.calls = 0
    second = sample(model, dataclasses.replace(pattern, reuse_order=2), noise)
    assert net.clock.calls == 4 and second.nfe == 7
    assert (first - a).abs().max() > 1e-2  # a line through a moving parabola is off ...
    # ... the parabola through three is exact (to float32 rounding: the samples reach 250 here)
    torch.testing.assert_close(second.sample, a, atol=1e-5, rtol=1e-6)


def test_a_forecasting_call_needs_the_run_feature_cache():
    from autotune.sampling.denoiser import call_model

    ns = VPLinear()
    s = dataclasses.replace(_with(build("dpmsolver++2m", ns, 4), s2={"reuse": ("clock",)}), reuse_order=1)
    ins = make_plan(s, ns).calls[2]
    model = TorchDenoiser(ClockNet(), ns, "epsilon")
    with pytest.raises(SamplingError, match="FeatureCache"):
        call_model(model, ins, torch.zeros(2, 3), ins.time, None, None, {"clock": torch.zeros(2, 8)})
    assert isinstance(FeatureCache(), dict) and FeatureCache().history == {}


def test_a_model_without_reuse_support_refuses_a_reusing_schedule():
    class Plain:
        noise = VPLinear()
        parameterization = "epsilon"
        units = ("block",)

        def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None):
            return 0 * x

        def fingerprint(self):
            return "plain"

    s = _with(build("ddim", VPLinear(), 3), s1={"reuse": ("block",)})
    with pytest.raises(SamplingError, match="cannot reuse"):
        sample(Plain(), s, torch.randn(2, 3))
    assert sample(Plain(), without_reuse(s), torch.randn(2, 3)).nfe == 3


# -- digits: deep branches, guidance, baker, engine ------------------------------------------------------------

# the fixtures ``digits`` and ``guided`` (unipc-bh2-o2, NFE 6, guidance 2) are tests/conftest.py's

def _batch(b=6):
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(3)), torch.arange(b) % 10


def test_digits_deep_branches_keep_weights_and_outputs(digits):
    assert set(digits.units.reusable) - set(digits.units) == {"deep0", "deep1", "guidance"}
    assert not any(k.startswith("deep") for k in digits.module.state_dict())
    x, labels = _batch()
    t = torch.tensor(0.4)
    base = digits(x, t, labels, guidance=2.0)
    cache: dict = {}
    again = digits(x, t, labels, guidance=2.0, record=frozenset({"deep0", "deep1", "mid_attn"}), cache=cache)
    torch.testing.assert_close(again, base, atol=0, rtol=0)
    assert cache["deep0"].shape == (2 * 6, 64, 16, 16)  # CFG's doubled batch is what the unit saw
    # reusing at the same time and input returns the same output
    for unit in ("deep0", "deep1", "mid_attn"):
        torch.testing.assert_close(digits(x, t, labels, guidance=2.0, reuse=frozenset({unit}), cache=cache), base)
    with pytest.raises(SamplingError, match="no cached output"):
        digits(x, t, labels, guidance=2.0, reuse=frozenset({"up0_extra"}), cache=cache)


def test_deepcache_on_digits_with_guidance_runs_baked_alike(digits, guided):
    from autotune.compile.bake import BakedSampler

    x, labels = _batch()
    full = sample(digits, guided, x, labels).sample
    d2 = deepcache(guided, 2)
    assert [st.reuse for st in d2.steps] == [(), ("deep0",), (), ("deep0",), (), ("deep0",)]
    out = sample(digits, d2, x, labels).sample
    rms = float((out - full).pow(2).mean().sqrt())  # reuse is an approximation: close, not equal
    assert 1e-4 < rms < 0.2 and torch.isfinite(out).all(), rms
    with torch.no_grad():
        baked = BakedSampler(digits, d2)(x, labels)
    torch.testing.assert_close(baked, out, atol=1e-6, rtol=0)
    f2 = dataclasses.replace(deepcache(guided, 3), reuse_order=1)  # the forecast, baked: same graph constants
    out = sample(digits, f2, x, labels).sample
    assert float((out - sample(digits, deepcache(guided, 3), x, labels).sample).abs().max()) > 1e-4
    with torch.no_grad():
        torch.testing.assert_close(BakedSampler(digits, f2)(x, labels), out, atol=1e-6, rtol=0)
    q = dataclasses.replace(deepcache(guided, 2), reuse_order=2)  # second order: three computed before step 5
    out2 = sample(digits, q, x, labels).sample
    assert float((out2 - sample(digits, dataclasses.replace(q, reuse_order=1), x, labels).sample).abs().max()) > 1e-5
    with torch.no_grad():
        torch.testing.assert_close(BakedSampler(digits, q)(x, labels), out2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_onnx_engine_with_reuse_matches_the_executor(digits, guided, tmp_path, order):
    pytest.importorskip("onnxruntime")
    from autotune.compile import build_engine

    s = dataclasses.replace(_with(deepcache(guided, 3), s4={"skip": ("mid_attn",)}), reuse_order=order)
    assert s.reuse_order == order
    man = build_engine(digits, s, tmp_path / "e", "onnxruntime")
    assert man.parity["engine_vs_executor_max_abs"] <= 1e-3


def test_threshold_rule_decides_from_the_first_block(digits, guided):
    x, labels = _batch()
    full = sample(digits, guided, x, labels).sample
    never = ThresholdReuse(digits, 0.0)
    torch.testing.assert_close(sample(never, guided, x, labels).sample, full, atol=0, rtol=0)
    assert (never.calls, never.reused) == (6, 0)
    always = ThresholdReuse(digits, 1e9)
    out = sample(always, guided, x, labels).sample
    assert (always.calls, always.reused) == (6, 5)  # the first call of a run is full
    torch.testing.assert_close(out, sample(digits, deepcache(guided, 6), x, labels).sample, atol=1e-6, rtol=0)
    sample(always, guided, x, labels)  # a second run starts full again
    assert (always.calls, always.reused) == (12, 10)
    with pytest.raises(SamplingError, match="no unit"):
        ThresholdReuse(digits, 0.1, rest="deep7")


# -- stage 2: compute / reuse / skip ---------------------------------------------------------------------------

def test_three_state_search_asks_valid_schedules_seeded_with_deepcache():
    from autotune.search.skip_stage import SkipMaskSearch

    ns = VPLinear()
    base = build("dpmsolver++2m", ns, 6)
    search = SkipMaskSearch(base, ("mid_attn",), 10.0, seed=1, reusable=("deep0", "deep1"))
    asked = search.ask(6)  # DeepCache's patterns first, with the first-order forecast
    assert asked[0].hash() == dataclasses.replace(deepcache(base, 2, "deep0"), reuse_order=1).hash()
    assert asked[3].hash() == dataclasses.replace(deepcache(base, 2, "deep1"), reuse_order=1).hash()
    rng_latency = iter(range(100))
    for _ in range(4):
        batch = search.ask(8)
        for s in batch:
            assert not s.steps[0].reuse  # validated by Schedule on construction; step 0 never reuses
            assert all(u != "deep0" and u != "deep1" for st in s.steps for u in st.skip)  # reuse-only units
            search.tell(s, (float(len(s.units_reused)), 5.0 + next(rng_latency) % 10))
    genes = [search.mask(s) for s, _ in search.population]
    assert any((g == 2).any() for g in genes) or any((search.mask(s) == 2).any() for s in batch)  # skips happen
    assert any((g[:-1] == 1).any() for g in genes)
    orders = {s.reuse_order for s in batch} | {s.reuse_order for s, _ in search.population}
    assert orders == {0, 1, 2}  # the order gene takes every value
    copy_only = SkipMaskSearch(base, ("mid_attn",), 10.0, seed=1, reusable=("deep0", "deep1"), reuse_orders=(0,))
    assert copy_only.ask(1)[0].hash() == deepcache(base, 2, "deep0").hash()
    assert all(s.reuse_order == 0 for s in copy_only.ask(8))
    with pytest.raises(SearchError, match="reuse orders"):
        SkipMaskSearch(base, ("mid_attn",), 10.0, reusable=("deep0",), reuse_orders=(3,))
    # the state round-trips
    again = SkipMaskSearch(base, ("mid_attn",), 10.0, seed=1, reusable=("deep0", "deep1"))
    again.load_state(search.state())
    assert again.ask(2) == search.ask(2)


def test_after_the_seeds_the_best_genomes_are_asked_at_the_other_reuse_orders():
    from autotune.search.skip_stage import ORDER_TRIALS, SkipMaskSearch

    base = build("dpmsolver++2m", VPLinear(), 6)
    search = SkipMaskSearch(base, (), 10.0, seed=1, reusable=("deep0",))
    seeds = search.ask(len(search.seeds))
    assert {s.reuse_order for s in seeds} == {1}
    # told: the third and first seeds are the fittest (lowest mse_ref, within the latency limit), the second is over
    for s, v in zip(seeds, [(0.5, 5.0), (0.1, 50.0), (0.2, 5.0)]):
        search.tell(s, v)
    trials = search.ask(ORDER_TRIALS * 2)
    assert [(s.hash(), s.reuse_order) for s in trials] == [
        (dataclasses.replace(seeds[i], reuse_order=o).hash(), o) for i in (2, 0) for o in (0, 2)]
    assert search.reorders_left == 0
    after = search.ask(4)  # then the search goes on as before: nothing asked twice
    assert not {s.hash() for s in after} & {s.hash() for s in seeds + trials}
    # restored mid-way, it asks the rest of the variants
    again = SkipMaskSearch(base, (), 10.0, seed=1, reusable=("deep0",))
    again.ask(len(again.seeds))
    for s, v in zip(seeds, [(0.5, 5.0), (0.1, 50.0), (0.2, 5.0)]):
        again.tell(s, v)
    first = again.ask(1)
    restored = SkipMaskSearch(base, (), 10.0, seed=1, reusable=("deep0",))
    restored.load_state(again.state())
    assert first + restored.ask(3) == trials
    # one order only: no order gene, nothing to try
    assert SkipMaskSearch(base, (), 10.0, seed=1, reusable=("deep0",), reuse_orders=(1,)).reorders_left == 0


def test_long_schedules_also_seed_deepcache_with_the_last_steps_computed():
    from autotune.search.skip_stage import FULL_TAIL, SkipMaskSearch

    base = build("dpmsolver++2m", VPLinear(), 12)
    search = SkipMaskSearch(base, (), 10.0, seed=1, reusable=("deep0",))
    asked = search.ask(5)  # intervals 2, 3, 5, then 2 and 3 with the tail computed
    tail = [dataclasses.replace(deepcache(base, n, "deep0"), reuse_order=1) for n in (2, 3)]
    tail = [t.with_steps([dataclasses.replace(st, reuse=()) if k >= 12 - FULL_TAIL else st
                          for k, st in enumerate(t.steps)]) for t in tail]
    assert [s.hash() for s in asked[3:5]] == [t.hash() for t in tail]
    assert not any(st.reuse for st in asked[3].steps[-FULL_TAIL:]) and asked[3].steps[-FULL_TAIL - 1].reuse


def test_skip_only_search_is_unchanged_without_reusable():
    from autotune.search.skip_stage import SkipMaskSearch

    base = build("dpmsolver++2m", VPLinear(), 5)
    a = SkipMaskSearch(base, ("a", "b"), 10.0, seed=3)
    assert all(not s.units_reused for s in a.ask(10))
    assert a.mask(a.ask(1)[0]).dtype == bool


def test_diffusers_scheduler_refuses_reuse_naming_the_field():
    from autotune.diffusers_scheduler import check_replayable

    s = _with(build("ddim", VPLinear(), 3), s1={"reuse": ("deep0",)})
    with pytest.raises(ScheduleError, match="reused units cannot be replayed") as e:
        check_replayable(s)
    assert e.value.field == "steps[1].reuse"
    check_replayable(without_reuse(s))


def _reuse_bench():
    from bench_scripts import load_bench

    return load_bench("reuse")


def test_reuse_bench_reads_the_no_reuse_front_at_a_latency():
    bench = _reuse_bench()
    points = [(200.0, 1e-2, 10), (100.0, 1e-1, 5), (150.0, 2e-1, 7)]  # (ms, mse_ref, NFE), any order
    assert bench.no_reuse_at(points, 199.0) == (1e-1, 5)  # NFE 7 fits but is worse than NFE 5
    assert bench.no_reuse_at(points, 200.0) == (1e-2, 10)
    assert bench.no_reuse_at(points, 99.0) is None


def test_reuse_bench_interpolates_a_policy_front_at_a_latency():
    bench = _reuse_bench()
    points = [(300.0, 1e-4), (100.0, 1e-2), (200.0, 1e-3)]  # (ms, mse_ref), any order
    assert bench.front_at(points, 150.0) == pytest.approx(10 ** -2.5)  # halfway in log between 100 and 200 ms
    assert bench.front_at(points, 300.0) == pytest.approx(1e-4)
    assert bench.front_at(points, 99.0) is None and bench.front_at(points, 301.0) is None


def test_reuse_bench_heartbeat_samples_as_the_evaluator_and_speaks_during_long_runs(capsys):
    from autotune.sampling.executor import sample_in_chunks

    heart = _reuse_bench().Heartbeat(every=0.0)  # every step is "long"
    heart.task = "scoring"
    from autotune.models.analytic import GaussianMixtureDenoiser

    model = GaussianMixtureDenoiser([1.0, 2.0], [[0.0, 1.0], [2.0, -1.0]], 0.3, VPLinear())
    schedule = build("unipc-bh2-o2", model.noise, 4)
    noise = torch.randn(6, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    got = heart.sampler(model, schedule, noise, keep_states=True)
    want = sample_in_chunks(model, schedule, noise, keep_states=True)
    assert torch.equal(got.sample, want.sample) and len(got.states) == len(want.states)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"  ... scoring: step {k} of 4 on 6 samples" for k in range(1, 5)]
    heart.every = 3600.0  # a quiet run: nothing printed
    heart.sampler(model, schedule, noise)
    assert capsys.readouterr().out == ""
