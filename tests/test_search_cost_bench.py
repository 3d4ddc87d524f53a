"""bench/search_cost.py reads a real search's trials: the best-so-far curve counts true evaluations only (cache
hits are free) and never rises, and the evaluation that first reaches a value is found on it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "search_cost.py"


def _load_bench():
    # bench/ is a folder of scripts, not an installed package: load the module from its file
    spec = importlib.util.spec_from_file_location("bench_search_cost", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
