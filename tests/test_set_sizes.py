"""The search and validation sets' sizes (search/set_sizes.py): larger for a model that samples cheaply, the
defaults for a network, and a size the user gives kept as given."""

from __future__ import annotations

import pytest

from autotune.evaluate.ids import DEFAULT_SIZE
from autotune.search.job import JobConfig, run_search_job
from autotune.search.set_sizes import (CHEAP_SEARCH_SECONDS, CHEAP_SIZES, FIRST_RUN_LIMIT, PROBE_NOISES,
                                       PROBE_REPEAT_SECONDS, PROBE_REPEATS, _probe_runs, choose_sizes,
                                       projected_search_seconds)


def _probe_at(projected: float, budget: int = 96) -> float:
    """The probe seconds that project the search loop on the larger set to ``projected`` seconds."""
    return projected * PROBE_NOISES / (budget * CHEAP_SIZES["search"])


def test_the_projection_is_linear_in_noises_and_budget():
    assert projected_search_seconds(0.001, 96, 512) == pytest.approx(96 * 0.001 * 64)
    assert projected_search_seconds(0.001, 48, 512) == pytest.approx(projected_search_seconds(0.001, 96, 256))


@pytest.mark.parametrize("projected, cheap", [(0.5 * CHEAP_SEARCH_SECONDS, True), (CHEAP_SEARCH_SECONDS, True),
                                              (1.01 * CHEAP_SEARCH_SECONDS, False), (700.0, False)])
def test_a_cheap_probe_gets_the_larger_sets_and_a_dear_one_the_defaults(projected, cheap):
    sizes = choose_sizes(_probe_at(projected), 96, 0, None)
    expected = CHEAP_SIZES if cheap else DEFAULT_SIZE
    assert (sizes.search, sizes.validation, sizes.cheap) == (expected["search"], expected["validation"], cheap)


def test_only_a_cheap_model_refines_on_a_set_of_its_own_and_not_when_the_user_sized_the_search_set():
    assert choose_sizes(_probe_at(1.0), 96, 0, None).refine == CHEAP_SIZES["refine"] > CHEAP_SIZES["search"]
    assert choose_sizes(_probe_at(1.0), 96, 64, None).refine == 0  # 0: the search set itself
    assert choose_sizes(_probe_at(700.0), 96, 0, None).refine == 0
    assert choose_sizes(None, 96, 0, None).refine == 0


def test_without_a_probe_the_defaults():
    sizes = choose_sizes(None, 96, 0, None)
    assert (sizes.search, sizes.validation, sizes.cheap) == (DEFAULT_SIZE["search"], DEFAULT_SIZE["validation"], False)


def test_the_budget_counts_a_bigger_search_is_not_cheap_at_the_same_probe():
    probe = _probe_at(0.8 * CHEAP_SEARCH_SECONDS)
    assert choose_sizes(probe, 96, 0, None).cheap
    assert not choose_sizes(probe, 2 * 96, 0, None).cheap


@pytest.mark.parametrize("set_size, validate, expected", [(64, None, (64, 4096)), (0, 300, (512, 300)),
                                                          (0, 0, (512, 0)), (64, 300, (64, 300))])
def test_sizes_the_user_gives_are_kept(set_size, validate, expected):
    sizes = choose_sizes(_probe_at(1.0), 96, set_size, validate)
    assert (sizes.search, sizes.validation) == expected


def test_a_slow_warm_one_noise_run_ends_the_probe():
    calls = []

    def timed(n):
        calls.append(n)
        return 10 * FIRST_RUN_LIMIT

    assert _probe_runs(timed) == pytest.approx(10 * FIRST_RUN_LIMIT * PROBE_NOISES)
    assert calls == [1, 1]  # cold, then warm: never the full probe


def test_a_slow_cold_run_is_tried_again_warm_before_the_full_probe():
    times = iter([3 * FIRST_RUN_LIMIT, 0.1 * FIRST_RUN_LIMIT, 0.004, 0.003, 0.005, 0.003, 0.004])
    calls = []

    def timed(n):
        calls.append(n)
        return next(times)

    assert _probe_runs(timed) == 0.003
    assert calls == [1, 1] + [PROBE_NOISES] * PROBE_REPEATS


def test_the_probe_is_the_least_of_its_runs_while_they_are_cheap():
    """One run descheduled on a busy machine (a cheap model's millisecond made 5 ms) does not decide the sizes; a
    dearer model's runs stop once they have cost PROBE_REPEAT_SECONDS."""
    def runs_of(full_runs):
        times = iter([0.1 * FIRST_RUN_LIMIT, *full_runs])
        calls = []

        def timed(n):
            calls.append(n)
            return next(times)

        return _probe_runs(timed), len(calls) - 1

    assert runs_of([0.0054, 0.0011, 0.0012, 0.0053, 0.0011]) == (0.0011, PROBE_REPEATS)
    dear = 0.6 * PROBE_REPEAT_SECONDS  # two runs pass the cap
    assert runs_of([dear, 0.9 * dear]) == (0.9 * dear, 2)
    assert choose_sizes(0.0011, 96, 0, None).cheap and not choose_sizes(0.0054, 96, 0, None).cheap  # the line


def test_a_job_on_an_analytic_model_searches_and_validates_on_the_larger_sets(gmm):
    notes = []
    from autotune.search.job import JobHooks

    hooks = JobHooks(notify=notes.append)
    outcome = run_search_job(JobConfig(model="gmm2d", nfe="4", budget=8, batch=4, refine=0, report_size=32),
                             model=gmm, hooks=hooks)
    assert f"-n{CHEAP_SIZES['search']}-" in outcome.eval_set
    assert f"-n{CHEAP_SIZES['validation']}-" in outcome.validation.set_id
    assert any("a cheap model" in n and f"{CHEAP_SIZES['search']} search noises" in n for n in notes)


def test_a_job_with_both_sizes_given_probes_nothing(gmm, monkeypatch):
    import autotune.search.set_sizes as set_sizes

    def refuse(*args, **kwargs):
        raise AssertionError("probed although both sizes were given")

    monkeypatch.setattr(set_sizes, "probe", refuse)
    outcome = run_search_job(JobConfig(model="gmm2d", nfe="4", budget=8, batch=4, refine=0, set_size=16,
                                       validate=32, report_size=32), model=gmm)
    assert "-n16-" in outcome.eval_set and "-n32-" in outcome.validation.set_id


@pytest.mark.parametrize("set_size, fitted", [(0, CHEAP_SIZES["refine"]), (64, 64)])
def test_a_cheap_models_refinements_fit_the_larger_refinement_set(gmm, monkeypatch, set_size, fitted):
    """Every refinement of a cheap model's job (stage 1's best, the other starts) fits the larger set of noises,
    against that set's own reference; with a search set the user sized, the search set."""
    import autotune.search.gradient as gradient
    from autotune.search.job import JobHooks

    seen = []

    class Recording(gradient.Descent):
        def __init__(self, model, schedule, eval_set, reference, **options):
            seen.append((eval_set.size, eval_set.id, reference.final.shape[0]))
            super().__init__(model, schedule, eval_set, reference, **options)

    monkeypatch.setattr(gradient, "Descent", Recording)
    notes = []
    outcome = run_search_job(JobConfig(model="gmm2d", nfe="4", budget=8, batch=4, refine=2, set_size=set_size,
                                       report_size=32), model=gmm, hooks=JobHooks(notify=notes.append))
    assert len(seen) >= 2 and all(size == fitted == n for size, _, n in seen)
    assert all(set_id.startswith("search-") for _, set_id, _ in seen)
    assert (f"-n{fitted}-" in outcome.eval_set) == (set_size != 0)  # the search loop keeps its own set
    assert any(f"{fitted} for the refinement" in n for n in notes) == (set_size == 0)
    assert outcome.best.metadata["refine_set"] == seen[0][1]  # the file says which noises the refinement fitted
