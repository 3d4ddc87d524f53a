"""Finalists chosen on the held-out validation set (search/validate.py, `autotune search --validate`)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from autotune.cli import app
from autotune.evaluate.sets import EvalSet
from autotune.sampling.named import build
from autotune.sampling.noise import VPLinear
from autotune.search.selection import TAIL_WEIGHT, selection_value
from autotune.search.trial import Trial
from autotune.search.validate import finalists, pick_on_validation
from autotune.space.fileformat import dumps


def test_validation_noise_is_disjoint_from_search_and_report():
    sets = {kind: EvalSet(kind, (2,), size=64, seed=0).noise() for kind in ("search", "validation", "report")}
    for a in sets:
        for b in sets:
            if a != b:
                assert not torch.isclose(sets[a][:, None], sets[b][None]).all(-1).any()


def test_finalists_put_extras_first_then_best_distinct_trials():
    ns = VPLinear()
    a, b, c = (build(n, ns, 5) for n in ("ddim", "dpmsolver++2m", "unipc-bh2-o2"))
    trials = [Trial(n, s.hash(), v, {"mse_ref": v}, dumps(s))
              for n, (v, s) in enumerate([(3.0, a), (1.0, b), (1.0, b), (float("inf"), c)])]
    out = finalists(trials, extra=[("refined", c)], top=3)
    assert [label for label, _ in out] == ["refined", "trial 1", "trial 0"]  # inf dropped, repeat of b dropped
    assert finalists(trials, top=1)[0][1].hash() == b.hash()


def test_pick_on_validation_takes_the_lowest_mean_plus_tail():
    # y has the lowest mean but a heavy tail (a few samples in another mode); z is a little worse on average
    # and has no tail: the default choice is z. With the tail of y as light as z's, y wins.
    figures = {"x": (2.0, 4.0), "y": (0.5, 8.0), "z": (0.8, 1.2)}

    class Fake:
        def __init__(self, figures):
            self.figures = figures

        def evaluate(self, s):
            mean, tail = self.figures[s]
            return {"mse_ref": mean, "mse_ref_cvar": tail, "diverged": False}

    best, scored = pick_on_validation(Fake(figures), [("a", "x"), ("b", "y"), ("c", "z")])
    assert best.label == "c" and [f.validation["mse_ref"] for f in scored] == [2.0, 0.5, 0.8]
    assert selection_value(scored[1].validation) == 0.5 + TAIL_WEIGHT * 8.0
    best, _ = pick_on_validation(Fake({**figures, "y": (0.5, 1.2)}), [("a", "x"), ("b", "y"), ("c", "z")])
    assert best.label == "b"
    # another objective is chosen on its own figure alone
    best, _ = pick_on_validation(Fake(figures), [("a", "x"), ("b", "y")], objective="mse_ref_cvar")
    assert best.label == "a"


def test_selection_value_of_a_diverged_or_unscored_schedule_is_inf():
    assert selection_value({"mse_ref": float("inf"), "mse_ref_cvar": float("inf"), "diverged": True}) == float("inf")
    assert selection_value({"mse_ref": 1.0}) == float("inf")


def test_search_records_the_validation_choice(tmp_path):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(app, ["search", "--model", "gmm2d", "--nfe", "4", "--budget", "8", "--workers", "0",
                                 "--refine", "3", "--validate", "64", "--no-cache", "--out", str(out)])
    assert r.exit_code == 0, r.output
    v = json.loads(out.read_text())["metadata"]["validation"]
    assert v["set"].startswith("validation-s0-n64") and "refined" in v["finalists"]
    assert v["mse_ref"] == v["finalists"][v["chosen"]]
    assert v["selection"][v["chosen"]] == min(v["selection"].values())
    assert any(label.startswith("named ") for label in v["finalists"])  # the named schedules compete too
