"""Evaluation sets, references, metrics, the Evaluator's cache use, and `autotune eval` / `autotune compare`."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from autotune.cli import app
from autotune.evaluate.evaluator import Evaluator
from autotune.evaluate.metrics import score
from autotune.evaluate.reference import compute_reference
from autotune.evaluate.sets import EvalSet
from autotune.models.diffusers_dir import load_pipeline_dir
from autotune.models.registry import load_model
from autotune.sampling.denoiser import TorchDenoiser
from autotune.sampling.named import KARRAS_NAMED, NAMED, SIGMA_MIN_NAMED, build
from autotune.sampling.noise import VPLinear

runner = CliRunner()


def test_search_and_report_sets_are_disjoint_and_reproducible():
    a, b = EvalSet("search", (2,), size=8), EvalSet("report", (2,), size=8)
    assert a.id != b.id and not torch.allclose(a.noise(), b.noise())
    assert torch.equal(a.noise(), EvalSet("search", (2,), size=8).noise())
    labels = EvalSet("report", (2,), size=20, num_classes=10).labels()
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 2)


def test_reference_is_checked_and_far_more_accurate_than_the_schedules():
    model = load_model("gmm2d", torch.float64)
    s = EvalSet("search", (2,), size=64)
    ref = compute_reference(model, s, steps=100, dtype=torch.float64)
    exact = model.exact_ode_solution(s.noise(torch.float64), t_end=0.0)
    true_err = float(((ref.final.double() - exact) ** 2).mean())
    fastest = score(model, build("unipc-bh2-o3", model.noise, 10), s, ref)["mse_ref"]
    assert true_err < 1e-3 * fastest and ref.check_mse < 1e-3 * fastest
    assert ref.meta["check_solver"] != ref.meta["solver"]


def test_diverging_schedule_scores_as_diverged_with_its_step():
    ns = VPLinear()
    model = TorchDenoiser(lambda x, tm: torch.where(tm[:, None] < 500, torch.full_like(x, math.nan), 0 * x), ns,
                          "epsilon")
    model.sample_shape = (2,)
    ev = Evaluator(model, "search", size=4)
    ev.references[ev.reference_version(None, nfe=4)] = compute_reference(
        TorchDenoiser(lambda x, tm: 0 * x, ns, "epsilon"), ev.eval_set, steps=10)
    metrics = ev.evaluate(build("ddim", ns, 4))  # evaluates at t = 1, .75, .5, .25: NaN from the call at .25
    assert metrics["diverged"] and metrics["diverged_at"] == 3 and metrics["mse_ref"] == math.inf


def test_each_schedule_is_scored_against_the_reference_its_nfe_needs():
    """Few-step schedules (NFE <= FEW_STEP_NFE) against the few-step reference, others against the default one,
    by one evaluator; an evaluator given its steps uses them for every schedule."""
    from autotune.evaluate.ids import DEFAULT_REF_STEPS, FEW_STEP_NFE, FEW_STEP_REF_STEPS

    gmm = load_model("gmm2d")
    few, more = (build("unipc-bh2-o2", gmm.noise, n) for n in (FEW_STEP_NFE, FEW_STEP_NFE + 1))
    ev = Evaluator(gmm, "search", size=8)
    ev.evaluate(few), ev.evaluate(more)
    assert sorted(r.meta["steps"] for r in ev.references.values()) == [FEW_STEP_REF_STEPS, DEFAULT_REF_STEPS]
    assert ev.key(few).eval_set.endswith(f"-k{FEW_STEP_REF_STEPS}") and ev.key(more).eval_set.endswith(
        f"-k{DEFAULT_REF_STEPS}")
    fixed = Evaluator(gmm, "search", size=8, ref_steps=20)
    fixed.evaluate(few), fixed.evaluate(more)
    assert [r.meta["steps"] for r in fixed.references.values()] == [20]


def test_second_eval_comes_from_the_cache(tmp_path):
    schedule = tmp_path / "s.json"
    assert runner.invoke(app, ["baseline", "unipc-bh2-o2", "--model", "gmm2d", "--nfe", "5", "--out",
                               str(schedule)]).exit_code == 0
    args = ["eval", "--model", "gmm2d", "--schedule", str(schedule), "--json", "--cache", str(tmp_path / "c.sqlite")]
    first = runner.invoke(app, args)
    second = runner.invoke(app, args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = json.loads(first.output), json.loads(second.output)
    assert {"nfe", "mse_ref", "diverged", "seconds"} <= set(a) and a["nfe"] == 5 and a["diverged"] is False
    assert a["cached"] is False and b["cached"] is True and a["mse_ref"] == b["mse_ref"]


def test_compare_agrees_with_diffusers_schedulers(pipeline_dirs, tmp_path):
    """The table's mse_ref of each named schedule equals diffusers' own scheduler scored on the same noise."""
    from peers import PEERS, run_peer

    pipe = pipeline_dirs["v_prediction"]
    result = runner.invoke(app, ["compare", "--model", str(pipe), "--nfe", "5,8", "--size", "8", "--no-cache",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert {r["schedule"] for r in rows} == set(NAMED) | set(SIGMA_MIN_NAMED) | set(KARRAS_NAMED)
    model = load_pipeline_dir(pipe)
    ev = Evaluator(model, "report", size=8)
    noise = ev.eval_set.noise(torch.float32)
    for r in rows:
        if r["schedule"] not in PEERS:  # ipndm; diffusers' bh1 onto 0 is NaN (the -smin ones are its peers)
            continue
        ref = ev.reference(None, nfe=r["nfe"]).final.double()  # each NFE's, as compare scored it
        peer = run_peer(r["schedule"], model.unet, model.scheduler_config, noise, r["nfe"]).double()
        peer_mse = float(((peer - ref) ** 2).mean())
        assert np.isclose(r["mse_ref"], peer_mse, rtol=1e-3, atol=1e-9), (r["schedule"], r["nfe"], peer_mse)
    assert (tmp_path / "compare.csv").read_text().startswith("schedule,file,nfe,mse_ref")


def test_frechet_distance_draws_are_the_fid_formula_on_each_resample():
    """The batched refits (weighted moments, sqrt of the real covariance once) equal the textbook formula with
    scipy's matrix square root on each resample, for sets whose mean sits far from zero."""
    import scipy.linalg

    from autotune.evaluate.distribution import frechet_distance, frechet_distance_draws
    from autotune.evaluate.metrics import bootstrap_indices

    def textbook(a, b):
        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        return float(((a.mean(0) - b.mean(0)) ** 2).sum()
                     + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real))

    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    samples = rng.normal(size=(300, 6)) * 1.5 + 20.0
    rows = np.vstack([np.arange(300)[None], bootstrap_indices(300, 5)])
    draws = frechet_distance_draws(samples, real, rows)
    assert draws.shape == (6,) and len(set(draws.round(6))) == 6  # each resample its own figure
    assert np.allclose(draws, [textbook(samples[r], real) for r in rows], rtol=1e-9)
    assert frechet_distance(samples, real) == pytest.approx(textbook(samples, real), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance_draws(samples, real, np.zeros((3, 1), dtype=int))


def test_report_sets_carry_paired_draws_of_the_distribution_metrics():
    """A report-set evaluation stores the model's distribution metrics on DIST_RESAMPLES bootstrap resamples, the
    same index sets for every schedule (so two rows give a paired interval); search-set evaluations do not pay
    for them. The whole-set figures are the same either way."""
    from autotune.evaluate.evaluator import Evaluator
    from autotune.evaluate.ids import DATA_DRAWS
    from autotune.evaluate.metrics import DIST_RESAMPLES, bootstrap_indices, decode_errors, excess_interval
    from autotune.sampling.named import build

    gmm = load_model("gmm2d", torch.float64)
    report = Evaluator(gmm, "report", size=64)
    ddim, unipc = (report.evaluate(build(n, gmm.noise, 3)) for n in ("ddim", "unipc-bh2-o2"))
    assert set(ddim[DATA_DRAWS]) == {"nll_gap", "swd"}
    draws = {k: decode_errors(v) for k, v in ddim[DATA_DRAWS].items()}
    assert all(d.shape == (DIST_RESAMPLES,) for d in draws.values())
    # the draws are the metric on the resamples of bootstrap_indices, recomputed here from the samples
    from autotune.sampling.executor import sample_in_chunks

    final = sample_in_chunks(gmm, build("ddim", gmm.noise, 3), report.eval_set.noise(torch.float32), None).sample
    again = gmm.data_metric_draws(final, None, bootstrap_indices(64, DIST_RESAMPLES)[:3])
    assert np.allclose(draws["swd"][:3], again["swd"], rtol=1e-5)
    assert ddim["swd"] == pytest.approx(gmm.data_metrics(final)["swd"], rel=1e-9)
    low, high = excess_interval("swd", draws["swd"], decode_errors(unipc[DATA_DRAWS]["swd"]))
    assert low <= high and low > 0  # DDIM at 3 steps against UniPC: decided worse on 64 noises
    search = Evaluator(gmm, "search", size=64).evaluate(build("ddim", gmm.noise, 3))
    assert DATA_DRAWS not in search and search["swd"] > 0


def test_distribution_metrics_separate_data_from_noise():
    from autotune.evaluate.distribution import frechet_distance, sliced_wasserstein

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=1e-6)  # a mean shift of 1 in 4 dimensions
    t = torch.from_numpy(a)
    assert sliced_wasserstein(t, t) == 0.0 and sliced_wasserstein(t, t + 1.0) > 0.3
    gmm = load_model("gmm2d", torch.float64)
    true = gmm.data_metrics(gmm.sample_data(256, torch.Generator().manual_seed(3)))
    noise = gmm.data_metrics(torch.randn(256, 2, dtype=torch.float64))
    assert true["nll_gap"] < noise["nll_gap"] and true["swd"] < noise["swd"]


def test_mixture_nll_gap_is_zero_for_the_data_and_large_for_samples_collapsed_onto_the_modes():
    """The raw NLL rewards collapse (samples on the means have a lower NLL than the data); the gap does not."""
    from autotune.sampling.executor import sample
    from autotune.sampling.named import NAMED

    gmm = load_model("gmm2d", torch.float64)
    n = 512
    data = gmm.sample_data(n, torch.Generator().manual_seed(12345))  # the very samples data_metrics compares to
    assert gmm.data_metrics(data)["nll_gap"] == pytest.approx(0.0, abs=1e-12)
    modes = torch.multinomial(gmm.weights, n, replacement=True, generator=torch.Generator().manual_seed(1))
    collapsed = gmm.means[modes]
    assert -gmm.log_prob(collapsed).mean() < -gmm.log_prob(data).mean()  # lower raw NLL than the data itself
    assert gmm.data_metrics(collapsed)["nll_gap"] > 0.5
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    coarse, fine = (gmm.data_metrics(sample(gmm, NAMED["dpmsolver++2m"](gmm.noise, k), noise).sample)["nll_gap"]
                    for k in (4, 200))
    assert fine < 0.2 < 5.0 < coarse


def test_digits_metrics_in_the_evaluation(tmp_path):
    from autotune.models.digits_train import digits_data

    digits = load_model("digits")
    real, labels = digits_data()
    good = digits.data_metrics(real[:256], labels[:256])
    bad = digits.data_metrics(torch.randn(256, 1, 16, 16), labels[:256])
    assert good["fd"] < 0.2 * bad["fd"] and good["class_acc"] > 0.95 and bad["class_acc"] < 0.5
    metrics = Evaluator(digits, "search", size=16, ref_steps=20).evaluate(
        __import__("dataclasses").replace(build("unipc-bh2-o2", digits.noise, 8), guidance=2.0))
    assert {"fd", "class_acc", "mse_ref", "traj_err"} <= set(metrics) and metrics["class_acc"] > 0.6


def test_cached_eval_needs_neither_torch_nor_the_model(tmp_path):
    """The second `autotune eval` is answered through the model memo: torch is never imported."""
    import subprocess
    import sys

    schedule = tmp_path / "s.json"
    assert runner.invoke(app, ["baseline", "ddim", "--model", "gmm2d", "--nfe", "4", "--out", str(schedule)]).exit_code == 0
    args = ["eval", "--model", "gmm2d", "--schedule", str(schedule), "--json", "--cache", str(tmp_path / "c.sqlite")]
    assert runner.invoke(app, args).exit_code == 0  # computes, stores the row and the model memo
    code = ("import sys; from autotune.cli import app\n"
            f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"cached": true' in done.stdout and done.stdout.strip().endswith("NO-TORCH"), done.stdout
