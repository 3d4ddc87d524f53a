"""bench/search.py's evals column: the true evaluations, or for a search with partial scores (s3-mf) the whole-set
evaluations it spent over the scores it made."""

from __future__ import annotations

import math

import pytest
from bench_scripts import load_bench

from autotune.evaluate.metrics import excess


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

    outcome = SimpleNamespace(seconds=1.0, search_seconds=1.0, budget_spent=96, true_evaluations=96,
                              method="s3", schedule_path="x.json", config=SimpleNamespace(final="zero"),
                              best=SimpleNamespace(times=(1.0, 0.5, 0.0)))
    peer = np.full(1024, 1e-2)
    at_cliff = np.full(1024, 1e-3)
    at_cliff[:10] = 0.3  # 10 of 1024 fail: the p99 (the 11th worst) is ours 0.1x, resampled often 30x
    decided = np.full(1024, 1e-3)
    rows = [bench.compare_row("m", 5, scored(e), {"unipc-bh1-o3": scored(peer)}, outcome) for e in (at_cliff, decided)]
    (low, high), (low2, high2) = rows[0]["p99_ratio_ci"], rows[1]["p99_ratio_ci"]
    assert rows[0]["met"]["p99"] and low < 0.2 and high > 5 and not rows[0]["met"]["p99_whole_ci"]
    assert rows[1]["met"]["p99_whole_ci"] and low2 == high2 == pytest.approx(rows[1]["p99_ratio"], rel=1e-6)
    assert "p99 no worse than best peer: met in 2 of 2 rows (whole 95% CI: 1)" in bench.summary(rows)


def _row(model: str, nfe: int, mean_ratio: float, **extra) -> dict:
    """A saved row with what the tables read (as --json writes it)."""
    peer = {"mse_ref": 1.0, "mse_ref_median": 1.0, "mse_ref_p99": 1.0}
    return {"model": model, "nfe": nfe, "best_peer": "unipc-bh1-o3", "ours": dict(peer), "peers": {"x": peer},
            "mean_ratio": mean_ratio, "mean_ratio_ci": [mean_ratio * 0.9, mean_ratio * 1.1], "p99_ratio": 0.5,
            "met": {"mean": mean_ratio <= 0.5, "mean_whole_ci": mean_ratio * 1.1 <= 0.5, "p99": True, "dist": None},
            "dist": {}, "dist_ratio": None,
            "search_wall_s": 10.0, "true_evaluations": 96, "report_set": f"report-s0-n{extra.pop('n', 1024)}-1x8x8",
            **extra}


def test_saved_rows_make_one_table_a_later_run_replacing_an_earlier_row(tmp_path):
    """--rows: the rows of several runs' --json files, one per (model, NFE), the later file's winning; each row
    keeps the code it was measured on, and the provenance lines say which."""
    import json

    bench = load_bench("search")
    old = tmp_path / "old.json"
    old.write_text(json.dumps([_row("digits", 5, 0.6), _row("digits", 6, 0.3)]))  # no code: an older bench's
    new = tmp_path / "new.json"
    new.write_text(json.dumps([_row("digits", 5, 0.2, code="abc1234", date="2026-12-06"),
                               _row("gmm64", 5, 0.1, code="abc1234", date="2026-12-06", n=16384)]))
    rows = bench.saved_rows([str(old), str(new)])
    assert [(r["model"], r["nfe"], r["mean_ratio"]) for r in rows] == [("digits", 6, 0.3), ("digits", 5, 0.2),
                                                                       ("gmm64", 5, 0.1)]
    assert rows[1]["rows_file"] == str(new)
    assert bench.provenance(rows) == ["code not recorded: digits 6",
                                      "abc1234: digits 5, 2026-12-06; gmm64 5, 2026-12-06"]
    assert bench.report_sizes(rows) == "1024 / 16384"
    assert "mean <= 0.5x best peer, NFE <= 6: met in 3 of 3 rows (whole 95% CI: 3)" in bench.summary(rows)
    reversed_order = bench.saved_rows([str(new), str(old)])  # the order of the files decides
    assert [(r["model"], r["nfe"], r["mean_ratio"]) for r in reversed_order] == [("gmm64", 5, 0.1),
                                                                                 ("digits", 5, 0.6),
                                                                                 ("digits", 6, 0.3)]
    assert "mean <= 0.5x best peer, NFE <= 6: met in 2 of 3 rows (whole 95% CI: 2)" in bench.summary(reversed_order)


@pytest.mark.parametrize("text, message", [("{}", "the JSON list --json writes, not dict"),
                                           ('[{"model": "m", "nfe": 5}]', "row 0 lacks best_peer"),
                                           ("[1]", "row 0 lacks model"), ("not json", "not a readable rows file")])
def test_a_bad_rows_file_is_named(tmp_path, text, message):
    bench = load_bench("search")
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        bench.saved_rows([str(path)])


def test_code_version_is_the_checkouts_commit(tmp_path, monkeypatch):
    """Each row records the commit it was measured on, "+changes" when tracked files differ from it."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git")
    bench = load_bench("search")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    assert bench.code_version() == "unknown"  # not a checkout

    def git(*argv):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *argv],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("commit", "-qm", "one")
    (tmp_path / "untracked.txt").write_text("not code\n")
    assert bench.code_version() == git("rev-parse", "--short", "HEAD")
    (tmp_path / "f.py").write_text("a = 2\n")
    assert bench.code_version() == git("rev-parse", "--short", "HEAD") + "+changes"


def test_distribution_metrics_get_a_paired_interval_and_a_verdict():
    """`excess_intervals` of both sample sets' draws on the same resamples of the report noises (`metric_draws`, as
    `paired_dist_intervals` takes them): samples far from the data are worse with the whole interval, the same
    samples are even (0 exactly), and a verdict reads the interval."""
    import torch

    from autotune.models.registry import load_model

    bench = load_bench("search")
    gmm = load_model("gmm2d")
    data = gmm.sample_data(256, torch.Generator().manual_seed(1)).float()
    collapsed = torch.zeros_like(data)  # every sample at the origin: far from the mixture's spread

    def intervals(ours, peer):
        return bench.excess_intervals(bench.metric_draws(gmm, ours, None)[1], bench.metric_draws(gmm, peer, None)[1])

    worse = intervals(collapsed, data)
    assert set(worse) == {"nll_gap", "swd"} and worse["swd"][0] > 0  # ours (collapsed) worse, decided
    better = intervals(data, collapsed)
    assert better["swd"][1] < 0
    assert intervals(data, data.clone()) == {"nll_gap": [0.0, 0.0], "swd": [0.0, 0.0]}

    decided = bench.dist_entry("swd", 0.5, 0.1, worse["swd"])
    assert (decided["no_worse"], decided["decided_worse"], bench.dist_verdict(decided)) == (False, True, "NO")
    undecided = bench.dist_entry("class_acc", 0.95, 0.96, [-0.01, 0.03])  # higher is better: excess = peer - ours
    assert (undecided["no_worse"], undecided["decided_worse"]) == (False, False)
    assert bench.dist_verdict(undecided) == "NO, undecided"
    unmeasured = bench.dist_entry("fd", 12.0, 10.0, None)
    assert unmeasured["decided_worse"] is None and bench.dist_verdict(unmeasured) == "NO"
    assert bench.dist_verdict(bench.dist_entry("fd", 9.0, 10.0, [-2.0, -0.5])) == "ok"
    assert excess("class_acc", 0.95, 0.96) == pytest.approx(0.01) and excess("fd", 12.0, 10.0) == 2.0


def test_digits_scores_resamples_as_it_scores_a_set():
    """data_metric_draws: a resample that is the whole set (in any order) gives data_metrics' figures; class
    accuracy of a resample is the share of its rows classified as asked."""
    import numpy as np
    import torch

    from autotune.models.digits import _classifier_and_real_features
    from autotune.models.registry import load_model

    digits = load_model("digits")
    x = (torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.6).clamp(-1, 1)
    labels = torch.arange(64) % 10
    whole = digits.data_metrics(x, labels)
    rows = np.stack([np.arange(64), np.arange(64)[::-1], np.repeat(np.arange(8), 8)])
    draws = digits.data_metric_draws(x, labels, rows)
    assert draws["fd"][:2] == pytest.approx([whole["fd"]] * 2, rel=1e-9) and draws["fd"][2] != draws["fd"][0]
    clf, _ = _classifier_and_real_features()
    correct = (clf.predict(x) == labels).double().numpy()
    assert draws["class_acc"] == pytest.approx(correct[rows].mean(1))
    assert draws["class_acc"][0] == pytest.approx(whole["class_acc"])


def test_the_summary_counts_distribution_misses_the_interval_decides():
    bench = load_bench("search")

    def with_dist(entry):
        row = _row("digits", 5, 0.2)
        row["dist"] = {"fd": entry}
        row["met"].update(dist=entry["no_worse"], dist_decided_worse=entry["decided_worse"],
                          dist_whole_ci=entry["whole_ci_no_worse"])
        return row

    rows = [with_dist(bench.dist_entry("fd", 12.0, 10.0, [1.0, 3.0])),  # worse, decided
            with_dist(bench.dist_entry("fd", 12.0, 10.0, [-1.0, 3.0])),  # worse on the figure only
            with_dist(bench.dist_entry("fd", 9.0, 10.0, [-2.0, -0.5])),  # better, decided
            with_dist(bench.dist_entry("fd", 9.0, 10.0, None))]  # a row saved before the intervals
    assert bench.summary(rows)[-1] == ("distribution metrics no worse (models with one): met in 2 of 4 rows; of 3 "
                                       "with paired intervals, worse with the whole 95% CI in 1, no worse with it in 1")


def test_recheck_gives_a_saved_row_its_intervals_from_its_schedule_file(tmp_path):
    """--rows --recheck-dist: the row's schedule file and its best peer are sampled again on the report noises
    its id names; they must reproduce the saved figures (a row whose figures they do not match is refused), and
    the row gains the intervals a fresh run would have given it."""
    from types import SimpleNamespace

    import torch

    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.registry import load_model
    from autotune.sampling.named import build
    from autotune.space.fileformat import dumps

    bench = load_bench("search")
    model = load_model("gmm2d")
    report = Evaluator(model, "report", size=64, seed=3)
    schedule = build("ddim", model.noise, 4)
    path = tmp_path / "ours.json"
    path.write_text(dumps(schedule))
    ours = report.evaluate(schedule)
    noise, peers, samples = report.eval_set.noise(torch.float32), {}, {}
    for peer in ("unipc-bh1-o3", "dpmsolver++2m"):
        samples[peer] = bench.run_peer(model, peer, noise, None, 4, None)
        peers[peer] = bench.sample_metrics(model, samples[peer], report.reference(None, nfe=4), None)
    outcome = SimpleNamespace(seconds=1.0, search_seconds=1.0, budget_spent=4, true_evaluations=4,
                              method="s3", schedule_path=path, config=SimpleNamespace(final="zero"), best=schedule)
    fresh = bench.compare_row("gmm2d", 4, ours, peers, outcome,
                              bench.paired_dist_intervals(model, report, schedule, ours, peers, samples, 4, None))
    saved = bench.compare_row("gmm2d", 4, ours, peers, outcome)
    saved["report_set"] = report.eval_set.id
    assert saved["ends_at"] == 0.0 and saved["final"] == "zero"  # where the written schedule ends, and --final
    assert all(d["excess_ci"] is None for d in saved["dist"].values())
    lines = []
    bench.recheck_dist([saved], SimpleNamespace(code="abc1234"), tmp_path, lines.append)
    assert saved["dist"] == fresh["dist"] and all(d["excess_ci"] is not None for d in saved["dist"].values())
    assert saved["met"]["dist_decided_worse"] == fresh["met"]["dist_decided_worse"]
    assert saved["dist_ci_code"] == "abc1234" and lines[0].startswith("gmm2d NFE 4: NLL gap ")

    saved["ours"]["swd"] *= 1.01  # figures the schedule file does not give
    with pytest.raises(RuntimeError, match="ours: its samples drawn again score"):
        bench.recheck_dist([saved], SimpleNamespace(code="abc1234"), tmp_path, lines.append)
    path.unlink()
    bench.recheck_dist([saved], SimpleNamespace(code="abc1234"), tmp_path, lines.append)
    assert lines[-1] == "gmm2d NFE 4: kept as saved (no schedule file)"


def test_a_ratio_on_the_target_shows_the_digit_that_decides_it():
    bench = load_bench("search")
    assert bench.marked(0.4952, True, 0.5) == "0.495 ok" and bench.marked(0.5030, False, 0.5) == "0.503 NO"
    assert bench.marked(0.47, True, 0.5) == "0.47 ok" and bench.marked(0.998, True, 1.0) == "0.998 ok"
    assert bench.marked(0.4952, None) == "0.50" and bench.marked(math.inf, False, 0.5) == "inf NO"


def test_finalists_are_scored_on_the_report_set_and_the_lines_name_the_three_choices():
    """--score-finalists: every finalist validation scored in full is scored on the report set (a screened one is
    not: it could not be chosen), with its schedule; the line per row names the chosen finalist, the one lowest on
    validation's mean and the one lowest on the report set, each as report mean / best peer's."""
    from types import SimpleNamespace

    from autotune.sampling.noise import VPLinear
    from autotune.sampling.named import build
    from autotune.search.selection import TAIL_WEIGHT
    from autotune.search.validate import Finalist
    from autotune.space.fileformat import loads

    bench = load_bench("search")
    noise = VPLinear()
    schedules = {name: build(name, noise, 5) for name in ("ddim", "dpmsolver++2m", "unipc-bh2-o2")}

    def figures(mean: float, cvar: float) -> dict:
        return {"mse_ref": mean, "mse_ref_median": mean / 2, "mse_ref_p99": cvar / 2, "mse_ref_cvar": cvar}

    validation = {"ddim": figures(3.0, 9.0), "dpmsolver++2m": figures(1.0, 40.0), "unipc-bh2-o2": figures(2.0, 4.0)}
    report_means = {"ddim": 5.0, "dpmsolver++2m": 1.5, "unipc-bh2-o2": 3.0}
    scored = [Finalist(name, schedules[name], validation[name]) for name in validation]
    screened = Finalist("stopped", build("ddim", noise, 4), {"mse_ref": 0.1, "mse_ref_cvar": 0.1, "screened": 128})
    chosen = scored[2]  # as validation would have it: the figures here are the bench's to carry, not to judge
    outcome = SimpleNamespace(validation=SimpleNamespace(scored=scored + [screened], chosen=chosen,
                                                         set_id="validation-s0-n512"))
    evaluated = []

    class Report:
        eval_set = SimpleNamespace(size=1024)
        progress = None

        def evaluate(self, schedule):
            evaluated.append(schedule)
            name = next(k for k, s in schedules.items() if s.hash() == schedule.hash())
            return figures(report_means[name], 10.0)

    fin = bench.score_finalists(Report(), outcome, peer_mean=10.0)
    assert fin["chosen"] == "unipc-bh2-o2" and set(fin["by_label"]) == set(validation)
    assert len(evaluated) == 3  # the screened finalist is not scored
    two_m = fin["by_label"]["dpmsolver++2m"]
    assert two_m["report_over_best_peer"] == pytest.approx(0.15)
    assert two_m["validation"]["mse_ref_cvar"] == 40.0 and two_m["selection"] == pytest.approx(1.0 + TAIL_WEIGHT * 40.0)
    assert loads(two_m["schedule"]).hash() == schedules["dpmsolver++2m"].hash()
    assert bench.score_finalists(Report(), SimpleNamespace(validation=None), 1.0) is None

    (line,) = bench.finalist_lines([{"model": "m", "nfe": 5, "finalists": fin}, {"model": "n", "nfe": 5}])
    assert line == ("m NFE 5, report mean / best peer's: chosen 0.30 (unipc-bh2-o2); lowest validation mean 0.15 "
                    "(dpmsolver++2m); lowest on the report set 0.15 (dpmsolver++2m); 3 finalists")
