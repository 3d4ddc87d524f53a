"""Text-to-image evaluation sets carry prompts: searches and scores of a text model use them (and so guidance
has an effect); without --prompts they use the empty prompt, as before."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autotune.errors import AutotuneError  # noqa: E402
from autotune.evaluate.evaluator import Evaluator  # noqa: E402
from autotune.evaluate.sets import EvalSet  # noqa: E402
from autotune.models.latent import load_latent_pipeline_dir  # noqa: E402
from autotune.models.registry import load_model  # noqa: E402
from autotune.sampling.named import build  # noqa: E402
from tiny_sd import PROMPTS  # noqa: E402


@pytest.fixture(scope="module")
def sd_dir(tiny_sd_dir):
    return tiny_sd_dir


def test_prompts_cycle_over_the_set_and_name_it():
    plain = EvalSet("search", (4, 8, 8), size=5)
    with_prompts = EvalSet("search", (4, 8, 8), size=5, prompts=("a", "b"))
    assert with_prompts.conditions() == ["a", "b", "a", "b", "a"] and plain.conditions() is None
    assert with_prompts.id != plain.id and with_prompts.id.startswith(plain.id)
    assert EvalSet("search", (4, 8, 8), size=5, prompts=("a", "c")).id != with_prompts.id
    assert torch.equal(with_prompts.noise(), plain.noise())  # same noise: only the conditions differ


def test_guided_scores_use_the_prompts(sd_dir):
    model = load_latent_pipeline_dir(sd_dir)
    guided = dataclasses.replace(build("dpmsolver++2m", model.noise, 4), guidance=7.5)
    on_prompts = Evaluator(model, "search", size=8, prompts=PROMPTS)
    on_empty = Evaluator(model, "search", size=8)
    ref_p, ref_e = on_prompts.reference(7.5, nfe=4).final, on_empty.reference(7.5, nfe=4).final  # what evaluate uses
    assert (ref_p - ref_e).abs().max() > 1e-3  # the prompts reach the model
    assert on_prompts.evaluate(guided)["mse_ref"] != on_empty.evaluate(guided)["mse_ref"]


def test_prompts_for_a_model_without_text_are_one_line():
    with pytest.raises(AutotuneError, match="not a text-to-image model"):
        Evaluator(load_model("gmm2d"), "search", size=4, prompts=("a cat",))


def test_cli_search_with_prompts(sd_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from autotune.cli import app
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["search", "--model", str(sd_dir), "--nfe", "4", "--refine", "2",
                                      "--guidance", "7.5", "--prompts", str(prompts), "--method", "random",
                                      "--budget", "4", "--workers", "0", "--set-size", "8", "--validate", "0",
                                      "--report-size", "8", "--no-cache", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "-p4." in json.loads(out.read_text())["metadata"]["eval_set"]


def test_cli_compare_with_prompts(sd_dir, tmp_path):
    """`autotune compare --prompts` scores the named schedules on the prompts (another set id than without)."""
    import json

    from typer.testing import CliRunner

    from autotune.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    rows = {}
    for label, extra in (("prompts", ["--prompts", str(prompts)]), ("empty", [])):
        out = tmp_path / f"{label}.json"
        result = CliRunner().invoke(app, ["compare", "--model", str(sd_dir), "--nfe", "4", "--baselines",
                                          "dpmsolver++2m", "--guidance", "7.5", "--size", "8", "--no-cache", "--out",
                                          str(out), *extra])
        assert result.exit_code == 0, result.output
        rows[label] = json.loads(out.read_text())
    assert "-p4." in rows["prompts"]["eval_set"] and "-p" not in rows["empty"]["eval_set"]
    mse = {k: [r["mse_ref"] for r in v["rows"]] for k, v in rows.items()}
    assert mse["prompts"] != mse["empty"]  # the prompts reach the scores
