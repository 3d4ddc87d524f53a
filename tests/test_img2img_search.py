"""Image-to-image evaluation and search: a schedule starting below T is scored from the set's images noised to
its t_start, against a reference solved from that same state; `autotune search --strength` searches such
schedules against the named ones cut as img2img pipelines cut them."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from autotune.cli import app
from autotune.evaluate.evaluator import Evaluator
from autotune.models.registry import load_model
from autotune.sampling.executor import sample
from autotune.sampling.named import build, for_strength, img2img_peers, steps_for_strength
from autotune.sampling.noise import noised, starts_from_image


@pytest.fixture(scope="module")
def gmm():
    return load_model("gmm2d")


def test_a_partial_schedule_is_scored_from_noised_images(gmm):
    evaluator = Evaluator(gmm, "search", size=64)
    part = for_strength(build("dpmsolver++2m", gmm.noise, 10), 0.5)
    assert starts_from_image(gmm.noise, part.t_start) and part.nfe == 5
    full_ref = evaluator.reference(nfe=part.nfe)  # the references schedules of this NFE are scored against
    start = evaluator.start_state(None, part.t_start, part.nfe)
    expected = noised(gmm.noise, full_ref.final, evaluator.eval_set.image_noise(full_ref.final.dtype), part.t_start)
    assert torch.equal(start, expected)
    ref = evaluator.reference(None, part.t_start, part.nfe)
    assert float(ref.times[0]) == pytest.approx(part.t_start) and ref.check_max_abs < 1e-3
    # the score is this schedule's samples from that start against that reference
    metrics = evaluator.evaluate(part)
    ours = sample(gmm, part, evaluator.eval_set.noise(torch.float32), start=start.float()).sample
    mse = float(((ours.double() - ref.final.double()) ** 2).flatten(1).mean(1).mean())
    assert metrics["mse_ref"] == pytest.approx(mse, rel=1e-5)
    # the same schedule from pure noise would be another evaluation with another key
    assert evaluator.key(part).eval_set != evaluator.key(build("dpmsolver++2m", gmm.noise, 5)).eval_set


def test_strength_cuts_like_the_pipelines():
    assert steps_for_strength(4, 0.6) == 7 and int(7 * 0.6) == 4
    assert steps_for_strength(5, 1.0) == 5
    from autotune.sampling.noise import VPLinear

    t_start, peers = img2img_peers(VPLinear(), 4, 0.6)
    assert all(p.nfe == 4 for p in peers) and any(p.t_start == t_start for p in peers)
    assert {p.name for p in peers} >= {"ddim@0.6", "dpmsolver++2m@0.6"}


def test_search_with_strength_writes_a_partial_schedule_that_beats_the_cut_peers(tmp_path):
    out = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["search", "--model", "gmm2d", "--nfe", "4", "--strength", "0.6", "--method",
                                      "random", "--budget", "16", "--workers", "0", "--validate", "64", "--no-cache",
                                      "--report-size", "256", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    t_start, _ = img2img_peers(load_model("gmm2d").noise, 4, 0.6)
    assert doc["t_start"] == pytest.approx(t_start) and doc["nfe"] == 4
    assert re.search(r"\S+@0\.6", result.output) and "vs " in result.output  # cut peers in the closing table
    assert "report-s0-n256" in result.output  # --report-size sets the closing table's set


@pytest.mark.parametrize("args,match", [
    (["--strength", "1.5"], "expected a fraction"),
    (["--strength", "nan"], "expected a fraction"),
    (["--strength", "0.5", "--nfe", "4-6"], "one --nfe"),
    (["--strength", "0.5", "--refine", "3"], "do not apply"),
])
def test_bad_strength_is_one_line(tmp_path, args, match):
    base = ["search", "--model", "gmm2d", "--workers", "0", "--no-cache", "--out", str(tmp_path / "s.json")]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code != 0 and match in result.output and "Traceback" not in result.output
