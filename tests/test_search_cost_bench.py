"""bench/search_cost.py reads a real search's trials: the best-so-far curve counts true evaluations only (cache
hits are free) and never rises, and the evaluation that first reaches a value is found on it; s3's predictions are
set against the true values of the schedules they proposed."""

from __future__ import annotations

from bench_scripts import load_bench


def _load_bench():
    return load_bench("search_cost")


def test_best_so_far_follows_a_real_search_over_its_true_evaluations():
    from autotune.search.job import JobConfig, run_search_job

    bench = _load_bench()
    config = JobConfig(model="gmm2d", nfe="4", method="evolution", budget=12, refine=0, validate=0,
                       score_report=False)
    search = run_search_job(config, None).search
    curve = bench.best_so_far(search.trials)
    assert len(curve) == search.true_evaluations == sum(not t.cached for t in search.trials)
    assert all(b <= a for a, b in zip(curve, curve[1:]))
    assert curve[-1] == min(t.value for t in search.trials)
    first = bench.evaluations_to_reach(curve, curve[-1])
    assert curve[first - 1] == curve[-1] and (first == 1 or curve[first - 2] > curve[-1])
    assert bench.evaluations_to_reach(curve, curve[-1] / 2) is None
    assert bench.new_bests([3.0, 2.0, 2.0, 1.0, 1.0]) == 3
    assert 1 <= bench.new_bests(curve) == len(set(curve)) <= len(curve)


def test_prediction_rows_pair_s3s_word_with_the_true_values(capsys):
    import math

    from autotune.models.registry import load_model
    from autotune.search.job import JobConfig

    bench = _load_bench()
    config = JobConfig(model="gmm2d", nfe="4", method="s3", budget=32, refine=0, validate=0, score_report=False)
    search, strategy = bench.run_search_stage(config, load_model("gmm2d"))
    rows = bench.prediction_rows(strategy.predictions, search.trials)
    value = {t.hash: t.value for t in search.trials}
    assert len(rows) == sum(math.isfinite(value[p.hash]) for p in strategy.predictions) > 0
    for row, p in zip(rows, [p for p in strategy.predictions if math.isfinite(value[p.hash])]):
        assert row["true"] == math.log(value[p.hash]) and row["pred"] == p.mean and row["round"] == p.round
        earlier = [t.value for t in search.trials if not t.cached][:p.told]
        assert row["improved"] == (value[p.hash] < min(earlier))
    bench.print_prediction_report(rows)
    out = capsys.readouterr().out
    assert "kendall" in out and out.count("proposals, mean err") == 3


def test_reach_shares_are_taken_against_evolutions_own_seed_and_never_sorts_last():
    import argparse
    import math

    import pytest

    bench = _load_bench()
    evolution = [5.0, 4.0, 4.0, 3.0]  # final 3.0, first reached at its 4th evaluation
    assert bench.reach_share([6.0, 3.0, 2.0, 2.0], evolution) == 2 / 4
    assert bench.reach_share(evolution, evolution) == 1.0
    assert bench.reach_share([6.0, 3.5, 3.1, 3.1], evolution) == math.inf
    assert bench.median_share([0.5, math.inf, 0.25]) == 0.5
    assert bench.median_share([0.5, math.inf]) == math.inf  # failed at half the seeds: no finite median
    assert bench.seed_list("0,1,2") == [0, 1, 2]
    for bad in ("", "a", "0,0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.seed_list(bad)


def test_a_partial_score_costs_its_share_and_is_never_the_best_so_far():
    from autotune.search.trial import Trial

    bench = _load_bench()

    def trial(value, cost=None, cached=False):
        return Trial(number=0, hash="h", value=value, objectives={"mse_ref": value}, schedule="{}", cost=cost,
                     cached=cached)

    trials = [trial(4.0), trial(1.0, cost=0.125), trial(3.0, cost=0.125), trial(2.0), trial(2.0, cached=True)]
    assert bench.best_so_far(trials) == [4.0, 4.0, 4.0, 2.0]  # the estimate 1.0 is not a score in full
    assert bench.spent_so_far(trials) == [1.0, 1.125, 1.25, 2.25]  # the cache hit is free
    evolution = [4.0, 3.0, 3.0, 2.0]  # final 2.0 after 4 evaluations
    assert bench.reach_share(bench.best_so_far(trials), evolution, bench.spent_so_far(trials)) == 2.25 / 4
