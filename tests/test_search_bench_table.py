"""bench/search.py's evals column: the true evaluations, or for a search with partial scores (s3-mf) the whole-set
evaluations it spent over the scores it made."""

from __future__ import annotations

from bench_scripts import load_bench


def test_evals_column_shows_the_budget_spent_when_scores_were_partial():
    bench = load_bench("search")
    assert bench.evals_text({"true_evaluations": 96, "budget_spent": 96}) == "96"
    assert bench.evals_text({"true_evaluations": 96}) == "96"  # rows written before budget_spent existed
    assert bench.evals_text({"true_evaluations": 1026, "budget_spent": 96.0}) == "96/1026"
