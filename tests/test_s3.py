"""S3: schedule features, the ranking-aware MLP and its scikit-learn comparison, and the `s3` search loop."""

import json
import math
import time

import numpy as np
import pytest
import torch

from autotune.evaluate.evaluator import Evaluator
from autotune.predictors.s3 import (ForestRegressor, MLPRanker, ScheduleFeatures, log_target, make_predictor,
                                    ranking_quality)
from autotune.sampling.named import NAMED, build
from autotune.search.runner import InProcessPool, run_search
from autotune.search.s3 import S3
from autotune.search.strategy import SearchError, make_strategy
from search_helpers import search_context


def synthetic(space, features, n, seed):
    """Prior schedules with a smooth synthetic metric: log-SNR spacing near a target, plus per-choice costs."""
    rng = np.random.default_rng(seed)
    vecs = np.stack([space.encode(space.sample_prior(rng)) for _ in range(n)])
    x = features(vecs)
    names = features.names
    pos = x[:, [i for i, name in enumerate(names) if name.startswith("pos[")]]
    target = np.linspace(0, 1, pos.shape[1] + 2)[1:-1]
    metric = 3.0 * ((pos - target) ** 2).sum(axis=1)
    metric += 0.4 * x[:, names.index("solver[0]=ipndm")] + 0.2 * x[:, names.index("prediction[1]=noise")]
    metric += 0.1 * x[:, names.index("order[2]")]
    return vecs, np.exp(metric)  # a positive metric, learnt in log units


# -- features and helpers -------------------------------------------------------------------------------------


def test_features_place_times_in_log_snr_and_one_hot_the_choices(gmm):
    space = search_context(gmm).space
    f = ScheduleFeatures(space, gmm.noise)
    vecs = np.stack([space.encode(space.sample_prior(np.random.default_rng(i))) for i in range(20)])
    x = f(vecs)
    assert x.shape == (20, f.dim) and np.all(np.isfinite(x))
    pos = x[:, [i for i, n in enumerate(f.names) if n.startswith("pos[")]]
    assert np.all((0 <= pos) & (pos <= 1)) and np.all(np.diff(pos, axis=1) >= 0)
    steps = x[:, [i for i, n in enumerate(f.names) if n.startswith("dpos[")]]
    assert np.allclose(steps.sum(axis=1), 1.0)
    for family, k in (("solver", 4), ("prediction", 2), ("corrector", 3)):
        cols = [i for i, n in enumerate(f.names) if n.startswith(f"{family}[1]=")]
        assert len(cols) == k and np.all(x[:, cols].sum(axis=1) == 1)
    # a time halfway in log-SNR sits at 0.5; without a noise schedule positions are linear in t
    lo, hi = (float(gmm.noise.lambda_(torch.tensor(t, dtype=torch.float64))) for t in (1.0, gmm.noise.t_min))
    t_mid = float(gmm.noise.t_of_lambda(torch.tensor((lo + hi) / 2, dtype=torch.float64)))
    assert f.positions(np.array([t_mid]))[0] == pytest.approx(0.5)
    assert ScheduleFeatures(space).positions(np.array([0.25]))[0] == pytest.approx(0.75)


def test_log_target_ranks_diverged_last():
    y = log_target([0.1, 1.0, math.inf, float("nan")])
    assert y[0] < y[1] < y[2] == y[3] and np.all(np.isfinite(y))


def test_ranking_quality_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 40).astype(float)
    q = ranking_quality(a, b)
    assert q.kendall == pytest.approx(scipy_stats.kendalltau(a, b).statistic)
    assert q.spearman == pytest.approx(scipy_stats.spearmanr(a, b).statistic)
    assert ranking_quality([1, 2, 3], [3, 2, 1]).kendall == pytest.approx(-1.0)


# -- predictors -----------------------------------------------------------------------------------------------


def test_mlp_and_forest_learn_a_synthetic_ranking(gmm):
    space = search_context(gmm).space
    f = ScheduleFeatures(space, gmm.noise)
    vecs, metric = synthetic(space, f, 200, seed=1)
    x, y = f(vecs), log_target(metric)
    quality, seconds = {}, {}
    MLPRanker(epochs=2).fit(x[:10], y[:10])  # torch's one-off start-up cost (optimizer, kernels) is not the fit's
    for kind in ("mlp", "forest"):
        model = make_predictor(kind, seed=0)
        start = time.perf_counter()
        model.fit(x[:100], y[:100])
        seconds[kind] = time.perf_counter() - start
        quality[kind] = ranking_quality(model.predict(x[100:]), y[100:])
        mean, spread = model.predict(x[100:], return_std=True)
        assert mean.shape == spread.shape == (100,) and np.all(spread >= 0)
    print(f"\nheld-out ranking on 100 points: mlp {quality['mlp']} in {seconds['mlp']:.2f} s, "
          f"forest {quality['forest']} in {seconds['forest']:.2f} s")
    assert quality["mlp"].kendall > 0.7, quality
    assert quality["forest"].kendall > 0.5, quality
    # the fit's time is printed, not asserted: tests do not time things (it took 1.9 s on a loaded 2-core machine)


def test_mlp_is_deterministic_given_its_seed():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(30, 5))
    y = x @ np.arange(5.0)
    p1 = MLPRanker(seed=3, epochs=50).fit(x, y).predict(x)
    p2 = MLPRanker(seed=3, epochs=50).fit(x, y).predict(x)
    p3 = MLPRanker(seed=4, epochs=50).fit(x, y).predict(x)
    assert np.array_equal(p1, p2) and not np.array_equal(p1, p3)
    assert np.array_equal(ForestRegressor(seed=3).fit(x, y).predict(x), ForestRegressor(seed=3).fit(x, y).predict(x))
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("gp")

def test_mlp_ranks_on_sampled_pairs_above_the_pair_limit(monkeypatch):
    """Above PAIR_LIMIT points the ranking loss runs on sampled pairs, each oriented worse-first with no ties; the fit
    is still deterministic and still learns the ranking; below it every pair is used (the dense loss)."""
    import autotune.predictors.s3 as predictors

    monkeypatch.setattr(predictors, "PAIR_LIMIT", 40)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(260, 4))
    y = x[:, 0] + 0.5 * x[:, 1] ** 2
    y[:10] = y[10]  # ties: never a pair
    t = torch.from_numpy(y).float()
    gen = torch.Generator().manual_seed(0)
    weights = torch.ones(2, len(y))
    loss = MLPRanker(members=2)._rank_loss(t, weights, gen)
    right = loss(torch.stack([t, t]) * 1e6)  # predictions ordering every pair right by a wide margin: loss near 0
    wrong = loss(torch.stack([-t, -t]) * 1e6)  # every pair ordered wrong: a large loss (a tie would add log 2)
    assert float(right.max()) < 1e-5 and float(wrong.min()) > 10
    dense = MLPRanker(members=2)._rank_loss(t[:30], weights[:, :30], gen)  # below the limit
    assert float(dense(torch.stack([t[:30], t[:30]]) * 1e6).max()) < 1e-5
    fit = lambda: MLPRanker(seed=1, epochs=100).fit(x[:200], y[:200]).predict(x[200:])  # noqa: E731
    p1, p2 = fit(), fit()
    assert np.array_equal(p1, p2)
    assert ranking_quality(p1, y[200:]).kendall > 0.7


def test_mlp_draws_pairs_per_point_pairs_and_refuses_empty_training(monkeypatch):
    """``pairs_per_point`` sets how many pairs the sampled ranking loss draws (s3-mf asks fewer than the default):
    the generator advances by exactly the two index draws of N x pairs_per_point each."""
    import autotune.predictors.s3 as predictors

    monkeypatch.setattr(predictors, "PAIR_LIMIT", 40)
    t = torch.linspace(0.0, 1.0, 100)
    for k in (4, predictors.PAIRS_PER_POINT):
        gen, expected = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        MLPRanker(members=2, pairs_per_point=k)._rank_loss(t, torch.ones(2, 100), gen)
        torch.randint(100, (100 * k,), generator=expected)
        torch.randint(100, (100 * k,), generator=expected)
        assert torch.equal(gen.get_state(), expected.get_state())
    for bad in ({"epochs": 0}, {"pairs_per_point": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            MLPRanker(**bad)


# -- the search loop ------------------------------------------------------------------------------------------


def test_restored_s3_asks_the_same_batch_in_the_model_phase(gmm):
    ctx = search_context(gmm)
    a = S3(ctx, n_init=10, children=256)
    f = ScheduleFeatures(ctx.space, gmm.noise)
    for _ in range(3):
        batch = a.ask(6)
        assert len({s.hash() for s in batch}) == 6 and all(ctx.space.contains(s) for s in batch)
        values = f(np.stack([ctx.space.encode(s) for s in batch]))[:, 0] + 0.1  # a synthetic metric
        for i, (s, v) in enumerate(zip(batch, values)):
            a.tell(s, math.inf if i == 1 else float(v))
    assert a.phase == "model" and a.rounds == 2
    state = json.loads(json.dumps(a.state(), allow_nan=False))  # strict JSON: a diverged value is null
    b = S3(ctx, n_init=10, children=256)
    b.load_state(state)
    assert b.predictions == a.predictions  # the predictor's record survives the state
    assert [s.hash() for s in a.ask(5)] == [s.hash() for s in b.ask(5)]
    told = {s.hash() for s, _ in a.evaluated}
    assert not told & {s.hash() for s in a.ask(5)}  # never proposes a schedule twice


def test_s3_records_what_its_predictor_said_of_each_proposal(gmm):
    """Every schedule the predictor proposed carries its prediction (members' mean and spread), the round, how
    many told points it was trained on, and its feature-space distance to the nearest of them; the seed
    population carries none."""
    ctx = search_context(gmm)
    s3 = S3(ctx, n_init=8, children=128)
    f = ScheduleFeatures(ctx.space, gmm.noise)
    asked = []
    for _ in range(4):
        batch = s3.ask(4)
        asked += [s.hash() for s in batch]
        for s, v in zip(batch, f(np.stack([ctx.space.encode(s) for s in batch]))[:, 0] + 0.1):
            s3.tell(s, float(v))
    model_phase = asked[8:]
    assert [p.hash for p in s3.predictions] == model_phase
    assert [p.round for p in s3.predictions] == [1] * 4 + [2] * 4
    assert [p.told for p in s3.predictions] == [8] * 4 + [12] * 4
    told_features = f(np.stack([ctx.space.encode(s) for s, _ in s3.evaluated[:8]]))
    schedule = next(s for s, _ in s3.evaluated if s.hash() == model_phase[0])
    nearest = np.sqrt(((f(ctx.space.encode(schedule)[None]) - told_features) ** 2).sum(-1)).min()
    assert s3.predictions[0].distance == pytest.approx(nearest)
    assert all(math.isfinite(p.mean) and p.spread >= 0 for p in s3.predictions)


def test_killed_s3_search_resumes_on_the_same_trajectory(gmm, tmp_path):
    """Stopped in the predictor phase and resumed from the store, s3 proposes what an uninterrupted run does."""
    from autotune.cache.store import open_store
    from autotune.search.runner import search_id

    def strategy():
        return S3(search_context(gmm), n_init=16, children=256)

    full = run_search(strategy(), InProcessPool(Evaluator(gmm, "search", size=16)), 40, batch_size=8)

    class Stop(Exception):
        pass

    def stop(progress):
        if progress.true_evaluations >= 32:
            raise Stop

    store = open_store(str(tmp_path / "cache.sqlite"))
    sid = search_id(test="s3-resume")
    with pytest.raises(Stop):
        run_search(strategy(), InProcessPool(Evaluator(gmm, "search", size=16, store=store)), 40, batch_size=8,
                   store=store, sid=sid, callback=stop)
    evaluator = Evaluator(gmm, "search", size=16, store=store)
    resumed = run_search(strategy(), InProcessPool(evaluator), 40, batch_size=8, store=store, sid=sid)
    assert resumed.resumed and evaluator.misses == 8
    assert [t.hash for t in resumed.trials] == [t.hash for t in full.trials]
    assert resumed.best_value == full.best_value


def test_s3_state_writes_each_schedule_as_schedule_to_json_does(gmm):
    """state() makes each schedule's document once (the runner saves it after every batch): the state saved late
    in a search is the one written from scratch, and a schedule's document is made once however often saved."""
    from unittest import mock

    from autotune.search import s3 as s3_module
    from autotune.search.strategy import schedule_to_json

    strategy = S3(search_context(gmm), n_init=8, children=128, partial=4)
    made = []

    def counted(s):
        made.append(s.hash())
        return schedule_to_json(s)

    with mock.patch.object(s3_module, "schedule_to_json", counted):
        for i in range(4):
            for s in strategy.ask(6):
                strategy.tell(s, 1.0 + i + 0.01 * len(made))
            state = strategy.state()
    assert state["evaluated"] == [[schedule_to_json(s), v] for s, v in strategy.evaluated]
    assert state["estimates"] == [[schedule_to_json(s), v] for s, v in strategy.estimates.values()]
    assert state["queue"] == [schedule_to_json(s) for s in strategy.queue]
    assert len(made) == len(set(made)) and len(state["evaluated"]) + len(state["estimates"]) > 12


def test_s3_keeps_exploring_when_everything_diverged(gmm):
    ctx = search_context(gmm)
    strategy = S3(ctx, n_init=4, children=128)
    for _ in range(3):
        for s in strategy.ask(4):
            strategy.tell(s, math.inf)
    assert all(ctx.space.contains(s) for s in strategy.ask(4))
    with pytest.raises(SearchError, match="predictor"):
        S3(ctx, predictor="gp")


def test_s3_beats_the_named_baselines_on_gmm2d_and_compares_with_evolution(gmm):
    budget = 40
    named = min(Evaluator(gmm, "search", size=32).evaluate(build(n, gmm.noise, 4))["mse_ref"] for n in NAMED)
    best, seconds = {}, {}
    for method in ("s3", "evolution"):
        start = time.perf_counter()
        result = run_search(make_strategy(method, search_context(gmm)), InProcessPool(Evaluator(gmm, "search", size=32)),
                            budget=budget, batch_size=8)
        seconds[method] = time.perf_counter() - start
        assert result.true_evaluations == budget and result.best.nfe == 4
        best[method] = result.best_value
    print(f"\ngmm2d NFE 4, budget {budget}: best named {named:.3e}, s3 {best['s3']:.3e} ({seconds['s3']:.1f} s), "
          f"evolution {best['evolution']:.3e} ({seconds['evolution']:.1f} s)")
    assert best["s3"] < 0.5 * named, (best, named)


# -- s3-mf: partial scores first, the best of each round in full ----------------------------------------------


def _mf(gmm, **kw):
    kw = {"partial": 8, "round_size": 8, "promoted": 2, "seed_promoted": 3, "local": 2, **kw}
    return S3(search_context(gmm), children=128, name="s3-mf", **kw)


def test_s3_mf_scores_each_round_in_part_and_promotes_its_best_estimates(gmm):
    """The runner scores the named seeds on their first 8 noises (each costs 8 / 32 of an evaluation), then the 3
    best estimates in full; then a round of 8 partial scores and its 2 best in full; a partial score is never the
    best; the budget counts whole-set evaluations."""
    evaluator = Evaluator(gmm, "search", size=32)
    strategy = _mf(gmm)
    named = {s.hash() for s in strategy.context.seeds if strategy.space.contains(s)}  # 5 of the 8 at NFE 4
    result = run_search(strategy, InProcessPool(evaluator), 12, batch_size=4, screening=None, set_size=32)
    fresh = [t for t in result.trials if not t.cached]
    partial = [t for t in fresh if t.cost is not None]
    assert partial and all(t.cost == 8 / 32 and t.screened == 8 for t in partial)
    assert result.spent == pytest.approx(sum(1.0 if t.cost is None else t.cost for t in fresh))
    assert 12 <= result.spent < 12 + 1  # the last batch may run over by less than one evaluation
    assert result.true_evaluations == len(fresh) > 12
    assert result.best_trial.cost is None and result.best_value == min(t.value for t in fresh if t.cost is None)
    seeds, up = fresh[:len(named)], fresh[len(named):len(named) + 3]
    assert {t.hash for t in seeds} == named
    assert all(t.cost is not None for t in seeds) and all(t.cost is None for t in up)
    assert [t.hash for t in up] == [t.hash for t in sorted(seeds, key=lambda t: t.value)[:3]]
    # nothing scored in full yet to pair with: a seed's estimate is its plain mean error on the first 8 noises
    from autotune.search.runner import partial_screen

    seed = strategy.estimates[seeds[0].hash][0]
    plain = Evaluator(gmm, "search", size=32).evaluate(seed, screen=partial_screen(8, None, None))
    assert plain["screened"] == 8 and seeds[0].value == pytest.approx(float(plain["mse_ref"]), rel=1e-9)
    rounds = fresh[len(named) + 3:]
    first = rounds[:8]
    assert all(t.cost is not None for t in first)
    promoted = sorted(first, key=lambda t: t.value)[:2]
    assert [t.hash for t in rounds[8:10]] == [t.hash for t in promoted] and all(t.cost is None for t in rounds[8:10])


def _tell_features(gmm):
    """A stand-in score for each schedule of a batch (a feature of it), so a test needs no sampling."""
    f = ScheduleFeatures(search_context(gmm).space, gmm.noise)

    def tell_all(strategy, batch):
        for s, v in zip(batch, f(np.stack([strategy.space.encode(s) for s in batch]))[:, 0] + 0.1):
            strategy.tell(s, float(v))
    return tell_all


def _restored(gmm, strategy):
    copy = _mf(gmm)
    copy.load_state(json.loads(json.dumps(strategy.state(), allow_nan=False)))
    return copy


def test_restored_s3_mf_continues_its_round(gmm):
    """Stopped mid-round (the named seeds' round, then a later one), a restored s3-mf hands out the rest of the
    round's picks, then promotes the same ones."""
    tell_all = _tell_features(gmm)
    a = _mf(gmm)
    seeds = a.ask(4)
    assert a.batch_samples() == 8 and {s.hash() for s in seeds} <= {build(n, gmm.noise, 4).hash() for n in NAMED}
    tell_all(a, seeds)
    b = _restored(gmm, a)
    rest_a, rest_b = a.ask(4), b.ask(4)
    assert [s.hash() for s in rest_a] == [s.hash() for s in rest_b] and b.batch_samples() == 8
    tell_all(a, rest_a)
    tell_all(b, rest_b)
    up_a, up_b = a.ask(4), b.ask(4)  # the named seeds' round: its 3 best estimates
    assert [s.hash() for s in up_a] == [s.hash() for s in up_b] and len(up_a) == 3
    assert a.batch_samples() is None  # promoted: scored in full
    _assert_best_estimates(up_a, a.estimates)
    tell_all(a, up_a)
    first = a.ask(4)
    assert a.batch_samples() == 8
    tell_all(a, first)
    b = _restored(gmm, a)
    rest_a, rest_b = a.ask(4), b.ask(4)
    assert [s.hash() for s in rest_a] == [s.hash() for s in rest_b] and a.batch_samples() == b.batch_samples() == 8
    tell_all(a, rest_a)
    tell_all(b, rest_b)
    up_a, up_b = a.ask(4), b.ask(4)
    assert [s.hash() for s in up_a] == [s.hash() for s in up_b] and len(up_a) == 2
    _assert_best_estimates(up_a, {s.hash(): a.estimates[s.hash()] for s in first + rest_a})


def _assert_best_estimates(promoted, estimates):
    """``promoted`` are the best of ``estimates`` (ties in any order)."""
    mine = {s.hash() for s in promoted}
    assert mine <= set(estimates)
    worst_promoted = max(estimates[h][1] for h in mine)
    assert all(v >= worst_promoted for h, (_, v) in estimates.items() if h not in mine)


def test_s3_mf_local_picks_mutate_the_best_full_scores(gmm):
    """With every pick local, a round needs no predictor: each pick keeps most discrete choices of one of the
    LOCAL_PARENTS best schedules scored in full, and none was proposed before."""
    from autotune.search.s3 import LOCAL_PARENTS

    tell_all = _tell_features(gmm)
    s = _mf(gmm, local=8)
    tell_all(s, s.ask(len(NAMED)))  # the named seeds in the space
    up = s.ask(8)
    tell_all(s, up)
    picks = s.ask(8)
    assert s.batch_samples() == 8 and len(picks) == 8 and s.rounds == 0  # no predictor was fitted
    parents = sorted(s.evaluated, key=lambda p: p[1])[:LOCAL_PARENTS]
    assert {p.hash() for p, _ in parents} == {u.hash() for u in up}
    told = {p.hash() for p, _ in s.evaluated} | set(s.estimates)
    choice = s.other_idx
    for pick in picks:
        assert pick.hash() not in told
        v = s.space.encode(pick)[choice]
        kept = max(float(np.mean(v == s.space.encode(p)[choice])) for p, _ in parents)
        assert kept >= 0.5, kept
    with pytest.raises(SearchError, match="local"):
        _mf(gmm, local=9)


def test_s3_fits_its_predictor_with_the_fit_options_and_s3_mf_asks_the_cheaper_fit(gmm, monkeypatch):
    """``fit_options`` reach the predictor at every fit; the registered s3-mf asks MF_EPOCHS, MF_PAIRS_PER_POINT and
    MF_CHILDREN (its loop's cost is the fits), s3 the predictor's defaults."""
    import autotune.search.s3 as s3_module
    from autotune.search.s3 import MF_CHILDREN, MF_EPOCHS, MF_PAIRS_PER_POINT

    asked = []
    real = s3_module.make_predictor
    monkeypatch.setattr(s3_module, "make_predictor", lambda kind, **kw: asked.append(kw) or real(kind, **kw))
    tell_all = _tell_features(gmm)
    s = _mf(gmm, local=2, fit_options={"epochs": 7, "pairs_per_point": 3})
    tell_all(s, s.ask(len(NAMED)))
    tell_all(s, s.ask(8))
    s.ask(8)  # a round: its predictor picks need a fit
    assert s.rounds == 1 and [{k: v for k, v in kw.items() if k != "seed"} for kw in asked] == [
        {"epochs": 7, "pairs_per_point": 3}]
    mf, plain = make_strategy("s3-mf", search_context(gmm)), make_strategy("s3", search_context(gmm))
    assert mf.fit_options == {"epochs": MF_EPOCHS, "pairs_per_point": MF_PAIRS_PER_POINT}
    assert mf.children == MF_CHILDREN and plain.fit_options == {} and plain.children == s3_module.CHILDREN


def test_s3_mf_is_refused_where_it_cannot_score_in_part(gmm):
    from autotune.errors import InputError
    from autotune.search.job import JobConfig, run_search_job

    evaluator = Evaluator(gmm, "search", size=8)
    with pytest.raises(SearchError, match="scores candidates on 8 noises first; the search set has 8"):
        run_search(_mf(gmm), InProcessPool(evaluator), 12, batch_size=4, set_size=8)
    with pytest.raises(SearchError, match="mse_ref alone"):
        run_search(_mf(gmm), InProcessPool(evaluator), 12, batch_size=4, objectives=("mse_ref", "nfe"), set_size=8)
    with pytest.raises(InputError, match="--ratios"):
        run_search_job(JobConfig(model="gmm2d", nfe="4", method="s3-mf", budget=8, ratios="fit", refine=0,
                                 validate=0, score_report=False))
    assert make_strategy("s3-mf", search_context(gmm)).name == "s3-mf"
