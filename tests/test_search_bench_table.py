"""bench/search.py's evals column: the true evaluations, or for a search with partial scores (s3-mf) the whole-set
evaluations it spent over the scores it made."""

from __future__ import annotations

import pytest
from bench_scripts import load_bench


def test_evals_column_shows_the_budget_spent_when_scores_were_partial():
    bench = load_bench("search")
    assert bench.evals_text({"true_evaluations": 96, "budget_spent": 96}) == "96"
    assert bench.evals_text({"true_evaluations": 96}) == "96"  # rows written before budget_spent existed
    assert bench.evals_text({"true_evaluations": 1026, "budget_spent": 96.0}) == "96/1026"


def test_a_row_carries_the_p99_ratio_interval_and_the_summary_counts_rows_it_decides():
    """The p99 target is met on the point figure; the paired-bootstrap interval of ours / peer p99 says whether the
    report set decides it (a tail of about 1 % failures on 1024 noises does not)."""
    from types import SimpleNamespace

    import numpy as np

    from autotune.evaluate.ids import PER_SAMPLE
    from autotune.evaluate.metrics import encode_errors, error_summary

    bench = load_bench("search")

    def scored(errors):
        return {**error_summary(errors), PER_SAMPLE: encode_errors(errors)}

    outcome = SimpleNamespace(seconds=1.0, search=SimpleNamespace(seconds=1.0, spent=96), true_evaluations=96,
                              method="s3", schedule_path="x.json")
    peer = np.full(1024, 1e-2)
    at_cliff = np.full(1024, 1e-3)
    at_cliff[:10] = 0.3  # 10 of 1024 fail: the p99 (the 11th worst) is ours 0.1x, resampled often 30x
    decided = np.full(1024, 1e-3)
    rows = [bench.compare_row("m", 5, scored(e), {"unipc-bh1-o3": scored(peer)}, outcome) for e in (at_cliff, decided)]
    (low, high), (low2, high2) = rows[0]["p99_ratio_ci"], rows[1]["p99_ratio_ci"]
    assert rows[0]["met"]["p99"] and low < 0.2 and high > 5 and not rows[0]["met"]["p99_whole_ci"]
    assert rows[1]["met"]["p99_whole_ci"] and low2 == high2 == pytest.approx(rows[1]["p99_ratio"], rel=1e-6)
    assert "p99 no worse than best peer: met in 2 of 2 rows (whole 95% CI: 1)" in bench.summary(rows)
