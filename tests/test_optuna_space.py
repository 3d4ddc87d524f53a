"""Optuna strategies (`optuna-tpe`, `optuna-cmaes`, `optuna-random`): the space as distributions, seeds first,
always-valid proposals, diverged values, JSON resume, and a short search on gmm2d."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

optuna = pytest.importorskip("optuna")

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402

from autotune.evaluate.evaluator import Evaluator  # noqa: E402
from autotune.sampling.named import NAMED, build  # noqa: E402
from autotune.sampling.noise import EDM, FlowMatching, VPDiscrete, VPLinear  # noqa: E402
from autotune.search.optuna_space import DIVERGED_VALUE, OptunaSpace  # noqa: E402
from autotune.search.runner import InProcessPool, run_search  # noqa: E402
from autotune.search.strategy import make_strategy, method_names  # noqa: E402
from autotune.space.encoding import ScheduleSpace  # noqa: E402
from autotune.space.schedule import PREDICTIONS  # noqa: E402
from autotune.space.solvers import SEARCH_SOLVERS as SOLVERS  # noqa: E402
from search_helpers import search_context  # noqa: E402

METHODS = [m for m in method_names() if m.startswith("optuna-")]
NOISES = {"vp_discrete": VPDiscrete.from_diffusers_config({}), "vp_linear": VPLinear(), "edm": EDM(),
          "flow": FlowMatching()}


def test_registered():
    assert {"optuna-tpe", "optuna-random"} <= set(METHODS)
    try:
        import cmaes  # noqa: F401
    except ImportError:
        return
    assert "optuna-cmaes" in METHODS


# -- the space as distributions -----------------------------------------------------------------------------------


def test_distributions_match_the_space_bounds_and_kinds():
    space = ScheduleSpace(4, 1.0, 0.0, units=("mid", "up.0"))
    m = OptunaSpace(space, VPLinear(), time_scale="t")
    assert list(m.distributions) == list(space.names) == list(m.param_names)
    for c in space.coords:
        d = m.distributions[c.name]
        if c.kind == "real":
            assert isinstance(d, FloatDistribution) and (d.low, d.high) == (c.low, c.high) and not d.log
        elif c.kind == "int":
            assert isinstance(d, IntDistribution) and (d.low, d.high) == (c.low, c.high)
        else:  # cat and bool: the indices
            assert isinstance(d, CategoricalDistribution) and d.choices == tuple(range(int(c.low), int(c.high) + 1))
    numeric = OptunaSpace(space, VPLinear(), time_scale="t", categorical=False)
    for c in space.coords:
        d = numeric.distributions[c.name]
        if c.kind in ("cat", "bool"):
            assert isinstance(d, IntDistribution) and (d.low, d.high) == (c.low, c.high)
    assert {c.kind for c in space.coords} == {"real", "int", "cat", "bool"}


def test_times_in_log_snr():
    noise = VPLinear()
    space = ScheduleSpace(5, 1.0, 0.0, ratio_range=None)
    m = OptunaSpace(space, noise)  # lambda is the default
    lam = noise.lambda_(torch.tensor([1.0, noise.t_min], dtype=torch.float64)).tolist()
    for k in range(4):
        d = m.distributions[f"lambda[{k}]"]
        assert isinstance(d, FloatDistribution) and d.low == pytest.approx(lam[0]) and d.high == pytest.approx(lam[1])
    assert "t[0]" not in m.distributions and m.time_scale == "lambda"
    # params -> schedule -> params round trip: the times come back to ~1e-9 (the grid itself is exact elsewhere)
    for name in NAMED:
        s = build(name, noise, 5)
        vec = m.to_vector(m.encode(s))
        np.testing.assert_allclose(vec, space.encode(s), rtol=1e-9, atol=1e-12)
        d = m.decode(m.encode(s))
        assert d.times == pytest.approx(s.times, rel=1e-9)
        assert [dataclasses.replace(x, t=0.0) for x in d.steps] == [dataclasses.replace(x, t=0.0) for x in s.steps]
    # t_end > 0: the range ends at lambda(t_end); a noise without a finite lambda there falls back to times
    assert OptunaSpace(ScheduleSpace(3, 1.0, 0.2), noise).distributions["lambda[0]"].high == pytest.approx(
        float(noise.lambda_(torch.tensor(0.2, dtype=torch.float64))))
    assert OptunaSpace(space, None).time_scale == "t"


@st.composite
def spaces(draw):
    noise = draw(st.sampled_from(sorted(NOISES)))
    t_start = NOISES[noise].T
    return noise, ScheduleSpace(
        n_steps=draw(st.integers(1, 6)), t_start=t_start, t_end=draw(st.sampled_from([0.0, 0.0, t_start / 3])),
        units=draw(st.lists(st.sampled_from(["mid", "up.1"]), unique=True, max_size=2).map(tuple)),
        solvers=tuple(draw(st.lists(st.sampled_from(SOLVERS), min_size=1, unique=True))),
        predictions=tuple(draw(st.lists(st.sampled_from(PREDICTIONS), min_size=1, unique=True))),
        allow_corrector=draw(st.booleans()), max_order=draw(st.none() | st.integers(1, 3)),
        ratio_range=draw(st.sampled_from([None, (0.8, 1.2)])),
    )


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spaces(), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_any_params_decode_to_a_valid_schedule_of_the_space(noise_space, lam, categorical, seed):
    noise, space = noise_space
    m = OptunaSpace(space, NOISES[noise], "lambda" if lam else "t", categorical)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        params = {}
        for name, d in m.distributions.items():
            if isinstance(d, FloatDistribution):
                params[name] = float(rng.choice([d.low, d.high, rng.uniform(d.low, d.high)]))
            elif isinstance(d, IntDistribution):
                params[name] = int(rng.integers(d.low, d.high + 1))
            else:
                params[name] = d.choices[rng.integers(len(d.choices))]
        s = m.decode(params)
        assert space.contains(s)
        again = m.encode(s)  # a schedule's params lie inside the distributions
        for name, d in m.distributions.items():
            assert d._contains(d.to_internal_repr(again[name])), (name, again[name], d)


# -- the strategies -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_seeds_come_first_then_valid_proposals(gmm, method):
    ctx = search_context(gmm)
    strategy = make_strategy(method, ctx)
    asked = strategy.ask(3) + strategy.ask(3) + strategy.ask(5)
    assert [s.hash() for s in asked[: len(ctx.seeds)]] == [s.hash() for s in ctx.seeds]
    assert all(a is s for a, s in zip(asked, ctx.seeds))  # the seeds themselves, not a lambda round trip
    for i, s in enumerate(asked):
        strategy.tell(s, math.inf if i % 4 == 3 else 0.01 * (i + 1))
    for _ in range(4):
        batch = strategy.ask(8)
        assert len(batch) == 8 and all(ctx.space.contains(s) and s.nfe == 4 for s in batch)
        for s in batch:
            strategy.tell(s, float(np.random.default_rng(len(strategy.trials)).random()))
    assert not strategy.pending and not strategy.waiting
    values = [t.value for t in strategy.study.get_trials(deepcopy=False)]
    assert DIVERGED_VALUE in values and all(v is not None and math.isfinite(v) for v in values)
    json.dumps(strategy.state(), allow_nan=False)  # strict JSON: a diverged value is not stored as inf


def test_seeds_outside_the_space_are_proposed_verbatim_and_not_learnt(gmm):
    ctx = search_context(gmm, solvers=("dpm",), allow_corrector=False, predictions=("data",))
    inside = [s for s in ctx.seeds if ctx.space.contains(s)]
    outside = [s for s in ctx.seeds if not ctx.space.contains(s)]
    assert inside and outside
    strategy = make_strategy("optuna-tpe", ctx)
    asked = strategy.ask(len(ctx.seeds) + 2)
    assert asked[: len(outside)] == outside and asked[len(outside): len(ctx.seeds)] == inside
    for s in asked:
        strategy.tell(s, 1.0)
    assert len(strategy.study.get_trials(deepcopy=False)) == len(inside) + 2


def test_duplicate_schedules_are_told_to_their_trials_in_order(gmm):
    ctx = search_context(gmm)
    strategy = make_strategy("optuna-tpe", ctx)
    asked = strategy.ask(len(ctx.seeds))
    twins = [i for i, s in enumerate(asked) if s.hash() == asked[1].hash()]
    assert twins == [1, 2]  # dpmsolver++2m and ++3m are the same schedule at 4 steps
    for i, s in enumerate(asked):
        strategy.tell(s, float(i))
    trials = strategy.study.get_trials(deepcopy=False)
    assert [t.value for t in trials] == [float(i) for i in range(len(asked))]
    assert not strategy.pending


def test_a_schedule_never_asked_is_added_to_the_study(gmm):
    ctx = search_context(gmm)
    strategy = make_strategy("optuna-tpe", ctx)
    stranger = ctx.space.sample_prior(np.random.default_rng(5))
    strategy.tell(stranger, 0.5)
    complete = strategy.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.value for t in complete] == [0.5]
    assert min(stranger.times[1:-1]) > gmm.noise.t_min  # (so that its times are inside the lambda range)
    assert strategy.map.decode(complete[0].params).times == pytest.approx(stranger.times, rel=1e-9)
    assert strategy.ask(1)[0] is ctx.seeds[0]  # the seeds still come first


@pytest.mark.parametrize("method", METHODS)
def test_resume_with_waiting_seeds_and_pending_trials(gmm, method):
    ctx = search_context(gmm, seed=7)
    a = make_strategy(method, ctx)
    first = a.ask(4)  # three seeds still wait in the queue
    for s in first[:3]:
        a.tell(s, 1.0)  # one asked trial stays pending
    a.tell(ctx.space.sample_prior(np.random.default_rng(1)), 0.3)  # and one stranger was added
    b = make_strategy(method, ctx)
    b.load_state(json.loads(json.dumps(a.state())))
    assert b.pending == a.pending and b.waiting == a.waiting
    for round_ in range(4):
        x, y = a.ask(6), b.ask(6)
        assert [s.hash() for s in x] == [s.hash() for s in y], round_
        for i, (s, t) in enumerate(zip(x, y)):
            v = math.inf if i == 2 else 0.1 * i + round_
            a.tell(s, v)
            b.tell(t, v)
    a.tell(first[3], 0.2)
    b.tell(first[3], 0.2)
    assert not a.pending and not b.pending
    assert [s.hash() for s in a.ask(5)] == [s.hash() for s in b.ask(5)]


def test_cmaes_resume_replays_the_optimizer(gmm, caplog):
    if "optuna-cmaes" not in METHODS:
        pytest.skip("cmaes is not installed")
    ctx = search_context(gmm)
    a = make_strategy("optuna-cmaes", ctx)
    rng = np.random.default_rng(0)
    for _ in range(6):  # past the seeds and into CMA-ES generations
        for s in a.ask(8):
            a.tell(s, float(rng.random()))
    gens = {v for t in a.study.get_trials(deepcopy=False) for k, v in t.system_attrs.items()
            if k.endswith(":generation")}  # "cmawm:generation": CMA-ES with margin proposed the trial
    assert {0, 1} <= gens  # and its optimizer was told a whole generation
    state = json.loads(json.dumps(a.state()))
    with caplog.at_level(logging.WARNING, logger="autotune.search.optuna_space"):
        b = make_strategy("optuna-cmaes", ctx)
        b.load_state(state)
    assert not caplog.records  # replayed, not re-added
    assert [s.hash() for s in a.ask(8)] == [s.hash() for s in b.ask(8)]
    # a log that no longer replays (params edited): the trials are re-added, the search goes on
    state["trials"][-1]["params"]["lambda[0]"] += 1e-3
    c = make_strategy("optuna-cmaes", ctx)
    with caplog.at_level(logging.WARNING, logger="autotune.search.optuna_space"):
        c.load_state(state)
    assert any("diverged" in r.message for r in caplog.records)
    assert all(ctx.space.contains(s) for s in c.ask(8))


def test_incompatible_state_is_a_search_error(gmm):
    from autotune.search.strategy import SearchError

    a = make_strategy("optuna-tpe", search_context(gmm))
    with pytest.raises(SearchError):
        make_strategy("optuna-random", search_context(gmm)).load_state(a.state())
    with pytest.raises(SearchError, match="another search space"):
        make_strategy("optuna-tpe", search_context(gmm, nfe=5)).load_state(a.state())


def test_optuna_logging_is_left_as_it_was(gmm):
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        strategy = make_strategy("optuna-tpe", search_context(gmm))
        for s in strategy.ask(3):
            strategy.tell(s, 1.0)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("method", ["optuna-tpe", "optuna-cmaes"])
def test_search_on_gmm2d_beats_the_named_baselines(gmm, method):
    if method not in METHODS:
        pytest.skip("cmaes is not installed")
    evaluator = Evaluator(gmm, "search", size=32)
    result = run_search(make_strategy(method, search_context(gmm)), InProcessPool(evaluator), budget=40, batch_size=8)
    named = min(evaluator.evaluate(build(n, gmm.noise, 4))["mse_ref"] for n in NAMED)
    assert result.true_evaluations == 40 and result.best.nfe == 4
    assert result.best_value <= named  # the baselines are evaluated first
    assert result.best_value < 0.5 * named, (result.best_value, named)
