"""Finalists chosen on the held-out validation set (search/validate.py, `autotune search --validate`)."""

from __future__ import annotations

import json

import pytest
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
        eval_set = EvalSet("validation", (2,), size=64, seed=0)  # no larger than the screen: never screened

        def __init__(self, figures):
            self.figures = figures

        def evaluate(self, s, screen=None):
            assert screen is None
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


def test_validation_screens_finalists_far_behind_the_best_so_far(gmm):
    """A finalist whose mean on the first VALIDATION_SCREEN_SAMPLES noises is over VALIDATION_SCREEN_FACTOR x the
    best-so-far's on them stops there and is never chosen; one close to the best is scored in full."""
    import numpy as np

    from autotune.evaluate.evaluator import Evaluator
    from autotune.evaluate.ids import PER_SAMPLE
    from autotune.evaluate.metrics import decode_errors
    from autotune.search.validate import VALIDATION_SCREEN_SAMPLES

    good, close = build("unipc-bh2-o3", gmm.noise, 8), build("dpmsolver++2m", gmm.noise, 8)
    far = build("ddim", gmm.noise, 3)
    held_out = Evaluator(gmm, "validation", size=512, ref_steps=20)
    best, scored = pick_on_validation(held_out, [("good", good), ("far", far), ("close", close)])
    assert [f.screened for f in scored] == [False, True, False] and best.label == "good"
    assert scored[1].validation["screened"] == VALIDATION_SCREEN_SAMPLES
    unscreened = Evaluator(gmm, "validation", size=512, ref_steps=20)
    best_all, all_scored = pick_on_validation(unscreened, [("good", good), ("far", far), ("close", close)],
                                              screen=False)
    assert not any(f.screened for f in all_scored) and best_all.label == "good"
    far_errors = decode_errors(all_scored[1].validation[PER_SAMPLE]).astype(np.float64)
    head = far_errors[:VALIDATION_SCREEN_SAMPLES].mean()  # what the screen saw, and what the stopped finalist says
    assert scored[1].validation["mse_ref"] == pytest.approx(head, rel=1e-6)
    assert all_scored[2].validation["mse_ref"] == pytest.approx(scored[2].validation["mse_ref"], rel=1e-12)
    # first in line, the far one has nothing to be screened against: scored in full, then beaten
    best, scored = pick_on_validation(held_out, [("far", far), ("good", good)])
    assert not any(f.screened for f in scored) and best.label == "good"


def test_selection_value_of_a_diverged_or_unscored_schedule_is_inf():
    assert selection_value({"mse_ref": float("inf"), "mse_ref_cvar": float("inf"), "diverged": True}) == float("inf")
    assert selection_value({"mse_ref": 1.0}) == float("inf")


def test_search_records_the_validation_choice(tmp_path):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(app, ["search", "--model", "gmm2d", "--nfe", "4", "--budget", "8", "--workers", "0",
                                 "--refine", "3", "--validate", "64", "--no-cache", "--out", str(out)])
    assert r.exit_code == 0, r.output
    v = json.loads(out.read_text())["metadata"]["validation"]
    assert v["set"].startswith("validation-s0-n64")
    assert any(k.split(" (gave up")[0] == "refined" for k in v["finalists"])  # stage 1's refinement may give up
    assert v["mse_ref"] == v["finalists"][v["chosen"]]
    assert v["selection"][v["chosen"]] == min(v["selection"].values())
    assert any(label.startswith("named ") for label in v["finalists"])  # the named schedules compete too


@pytest.mark.parametrize("nfe, flags, gives_up", [("3", ["--no-analytic-first"], False), ("4", [], True)])
def test_search_says_when_stage_1s_refinement_gave_up(tmp_path, monkeypatch, nfe, flags, gives_up):
    """Under a bar only the lowest start clears (RACE), the line on stage 1's refinement and its finalist's label
    say the same thing: it went on (gmm2d NFE 3 without the analytic-first start: it was the lowest at halfway), or
    it gave up after half its steps (NFE 4, where the analytic-first start was lower)."""
    from autotune.search import job

    monkeypatch.setattr(job, "GIVE_UP", 1e-9)
    out = tmp_path / "s.json"
    r = CliRunner().invoke(app, ["search", "--model", "gmm2d", "--nfe", nfe, "--budget", "8", "--workers", "0",
                                 "--refine", "4", "--validate", "64", "--no-cache", "--out", str(out), *flags])
    assert r.exit_code == 0, r.output
    finalists = json.loads(out.read_text())["metadata"]["validation"]["finalists"]
    assert ("refined (gave up after 2 steps)" if gives_up else "refined") in finalists, finalists
    line = next(ln for ln in r.output.splitlines() if ln.startswith("refined the grid"))
    assert ("(gave up after 2" in line) == gives_up, line  # the line may wrap after it (80 columns)
    assert sum("(gave up after 2 steps)" in label for label in finalists) >= 2  # all but the lowest start
