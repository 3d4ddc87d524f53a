"""DC-Solver: compensation identity and gradient, ratio fitting, CPR fit/predict and strict file, CLI, search hook."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from autotune.cli import app
from autotune.evaluate.evaluator import Evaluator
from autotune.predictors.cpr import CPRError, RatioSample, fit_cpr, load_cpr, loads, save_cpr, to_dict
from autotune.sampling.coefficients import compensation
from autotune.sampling.executor import sample
from autotune.sampling.named import build
from autotune.search.dc_fit import (DCFitError, FitSettings, attach_ratio_source, base_schedule, fit_ratios,
                                    fit_key, trajectory_loss, with_fitted_ratios, with_ratios, without_ratios)
from autotune.space.fileformat import load, save

FAST = FitSettings(datapoints=8, iterations=12)


@pytest.fixture(scope="module")
def gmm_eval(gmm):
    ev = Evaluator(gmm, "search", size=16)
    ev.reference(None)
    return ev


def test_compensation_with_ratio_one_is_the_identity():
    times = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1], dtype=torch.float64)
    comp = compensation(3, torch.tensor(1.0, dtype=torch.float64), 2, times)
    weights = dict((j, float(w)) for j, w in comp.outputs)
    assert weights == pytest.approx({3: 1.0, 2: 0.0, 1: 0.0}, abs=1e-15)
    # and a ratio other than 1 interpolates: the weights of a Lagrange polynomial sum to one
    comp = compensation(3, torch.tensor(1.3, dtype=torch.float64), 2, times)
    assert sum(float(w) for _, w in comp.outputs) == pytest.approx(1.0)
    assert float(dict(comp.outputs)[2]) != 0.0


def test_ratio_one_samples_like_no_compensation_and_override_tensor_applies(gmm):
    s = build("unipc-bh2-o2", gmm.noise, 6)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = sample(gmm, s, noise).sample
    ones = torch.ones(6, dtype=torch.float64, requires_grad=True)  # compensation active, at ratio 1
    assert torch.allclose(sample(gmm, s, noise, ratios=ones, differentiable=True).sample.detach(), plain, atol=1e-12)
    ratios = torch.tensor([1, 1, 1.2, 0.9, 1.1, 1.3], dtype=torch.float64)
    via_tensor = sample(gmm, s, noise, ratios=ratios).sample  # a plain override tensor must apply
    via_schedule = sample(gmm, with_ratios(s, ratios.tolist()), noise).sample
    assert torch.equal(via_tensor, via_schedule)
    assert not torch.allclose(via_tensor, plain)


def test_gradient_flows_to_the_ratios(gmm, gmm_eval):
    s = build("dpmsolver++2m", gmm.noise, 6)
    ratios = torch.ones(6, dtype=torch.float64, requires_grad=True)
    out = sample(gmm, s, gmm_eval.eval_set.noise(torch.float64), ratios=ratios, differentiable=True)
    ((out.sample - gmm_eval.reference().final.double()) ** 2).mean().backward()
    assert ratios.grad is not None and torch.isfinite(ratios.grad).all()
    assert (ratios.grad[2:] != 0).all() and (ratios.grad[:2] == 0).all()  # warm-up steps are not compensated


@pytest.mark.parametrize("solver", ["unipc-bh2-o2", "dpmsolver++2m"])
@pytest.mark.parametrize("method", ["joint", "greedy"])
def test_fitting_lowers_the_trajectory_loss_on_gmm(gmm, gmm_eval, solver, method):
    s = build(solver, gmm.noise, 5)
    fit = fit_ratios(gmm, s, gmm_eval.eval_set, gmm_eval.reference(), dataclasses.replace(FAST, method=method))
    assert fit.loss_after < 0.8 * fit.loss_before
    assert fit.ratios[:2] == (1.0, 1.0) and any(r != 1.0 for r in fit.ratios[2:])
    # the reported loss is the loss of the returned schedule, recomputed independently
    assert trajectory_loss(gmm, fit.schedule, gmm_eval.eval_set, gmm_eval.reference(), 8) == pytest.approx(
        fit.loss_after, rel=1e-9)
    # the fit does not leak into the report set: the fitted ratios also lower its final error there
    report = Evaluator(gmm, "report", size=64)
    assert report.evaluate(fit.schedule)["mse_ref"] < report.evaluate(s)["mse_ref"]


def test_fitting_lowers_the_loss_on_digits_with_guidance():
    from autotune.models.registry import load_model

    m = load_model("digits")
    ev = Evaluator(m, "search", size=4, ref_steps=40)
    s = base_schedule(m, "unipc-bh2-o2", 4, 2.0)
    fit = fit_ratios(m, s, ev.eval_set, ev.reference(2.0), FitSettings(datapoints=4, iterations=6))
    assert fit.loss_after < fit.loss_before
    assert fit.schedule.guidance == 2.0


def test_fit_settings_and_schedules_without_compensable_steps_are_rejected(gmm, gmm_eval):
    with pytest.raises(DCFitError, match="method"):
        FitSettings(method="newton")
    with pytest.raises(DCFitError, match="lr"):
        FitSettings(lr=0.0)
    with pytest.raises(DCFitError, match="none to compensate"):
        fit_ratios(gmm, build("ddim", gmm.noise, 2), gmm_eval.eval_set, gmm_eval.reference(), FAST)


def _samples(truth):
    return [RatioSample(n, g, tuple([1.0, 1.0] + [truth((k + 1) / n, g, n) for k in range(2, n)]))
            for n in (4, 5, 6, 8, 10) for g in (1.0, 2.0, 4.0, 6.0, 8.0)]


def test_cpr_recovers_a_cascade_polynomial_and_predicts_unseen_configurations():
    def truth(x, g, n):
        return 1.0 + (0.1 - 0.01 * g + 0.002 * n) * x - 0.05 * x**2 * (g / 8) ** 2 + 0.03 * x**3 * (n / 10)

    cpr = fit_cpr(_samples(truth), "fp", "unipc-bh2-o2")
    assert cpr.degrees == (3, 2, 2)
    for n, g in ((7, 3.0), (9, 5.0)):
        expected = [1.0, 1.0] + [truth((k + 1) / n, g, n) for k in range(2, n)]
        assert cpr.predict(n, g) == pytest.approx(expected, abs=1e-9)
    # a grid too thin for the asked degree lowers it, and says so in the file
    thin = fit_cpr([s for s in _samples(truth) if s.guidance in (1.0, 2.0)], "fp", "x", degrees=(3, 2, 2))
    assert thin.degrees[1] == 1 and thin.fit["requested_degrees"] == [3, 2, 2]


def test_cpr_file_round_trip_and_strict_reader(tmp_path, gmm):
    cpr = fit_cpr(_samples(lambda x, g, n: 1 + 0.1 * x * g / n), "fp-abc", "unipc-bh2-o2")
    path = save_cpr(cpr, tmp_path / "cpr.json")
    back = load_cpr(path)
    assert back.predict(7, 3.0) == cpr.predict(7, 3.0)
    assert (back.coefficients == cpr.coefficients).all() and back.degrees == cpr.degrees
    s = dataclasses.replace(build("unipc-bh2-o2", gmm.noise, 7), guidance=3.0)
    assert [st.ratio for st in back.apply(s).steps] == pytest.approx(list(cpr.predict(7, 3.0)))
    doc = to_dict(cpr)
    bad_docs = {
        "schema_version": {**doc, "schema_version": 2},
        "kind": {**doc, "kind": "autotune.schedule"},
        "coefficients": {**doc, "coefficients": [[1.0]]},
        "grid.guidance": {**doc, "grid": {"nfe": [4], "guidance": [1.0, None]}},
        "unknown field": {**doc, "extra": 1},
        "model_fingerprint": {k: v for k, v in doc.items() if k != "model_fingerprint"},
    }
    for field, bad in bad_docs.items():
        with pytest.raises(CPRError, match=field):
            loads(json.dumps(bad), "cpr.json")
    with pytest.raises(CPRError, match="not valid JSON"):
        loads("{", "cpr.json")
    with pytest.raises(CPRError, match="guidance"):
        cpr.predict(5, None)  # fitted with guidance: an unguided request is an error, not a silent 0
    with pytest.raises(CPRError, match="fitted on model"):
        cpr.check_model("another")


def test_search_hook_fits_once_and_stores_under_the_fitted_hash(tmp_path, gmm):
    from autotune.cache.store import open_store

    store = open_store(str(tmp_path / "c.sqlite"))
    ev = attach_ratio_source(Evaluator(gmm, "search", size=16, store=store), "fit", FAST)
    s = build("unipc-bh2-o2", gmm.noise, 5)
    first = ev.evaluate(s)
    fitted = load_from_json(first["evaluated_schedule"])
    assert fitted.hash() != s.hash() and without_ratios(fitted).hash() == s.hash()
    assert first["schedule_hash"] == fitted.hash() and not first["cached"]
    plain = Evaluator(gmm, "search", size=16, store=store)
    assert plain.evaluate(fitted)["cached"]  # stored under the fitted schedule's hash
    assert plain.evaluate(s)["mse_ref"] > first["mse_ref"]
    # a fresh evaluator finds the fit in the store (no refit) and the evaluation in the cache
    # the fit is against the reference the schedule is scored against (its NFE's)
    key = fit_key(ev.fingerprint, s, f"{ev.eval_set.id}/{ev.reference_version(None, nfe=s.nfe)}", FAST)
    assert store.get_search_state(key)["ratios"] == [st.ratio for st in fitted.steps]
    again = attach_ratio_source(Evaluator(gmm, "search", size=16, store=store), "fit", FAST)
    assert again.evaluate(s)["cached"]
    assert with_fitted_ratios(gmm, s, ev.eval_set, ev.reference(nfe=s.nfe), FAST, store=store,
                              fingerprint=ev.fingerprint,
                              ref_version=ev.reference_version(None, nfe=s.nfe)).hash() == fitted.hash()
    with pytest.raises(DCFitError, match="--ratios"):
        attach_ratio_source(ev, "magic")


def load_from_json(text):
    from autotune.space.fileformat import loads as schedule_loads

    return schedule_loads(text)


def test_cli_dc_fit_and_cpr_fit_apply_end_to_end(tmp_path):
    runner = CliRunner()
    cache = str(tmp_path / "c.sqlite")
    base = tmp_path / "s.json"
    assert runner.invoke(app, ["baseline", "unipc-bh2-o2", "--model", "gmm2d", "--nfe", "5", "--out",
                               str(base)]).exit_code == 0
    r = runner.invoke(app, ["dc", "fit", "--model", "gmm2d", "--schedule", str(base), "--out",
                            str(tmp_path / "f.json"), "--iterations", "10", "--cache", cache])
    assert r.exit_code == 0, r.output
    fitted = load(tmp_path / "f.json")
    assert fitted.metadata["dc_fit"]["loss_after"] < fitted.metadata["dc_fit"]["loss_before"]
    assert any(st.ratio != 1.0 for st in fitted.steps)
    r = runner.invoke(app, ["cpr", "fit", "--model", "gmm2d", "--nfe", "4-6", "--out", str(tmp_path / "cpr.json"),
                            "--iterations", "8", "--degrees", "2,0,1", "--cache", cache])
    assert r.exit_code == 0, r.output
    assert load_cpr(tmp_path / "cpr.json").grid_nfe == (4, 5, 6)
    r = runner.invoke(app, ["cpr", "apply", "--cpr", str(tmp_path / "cpr.json"), "--model", "gmm2d", "--nfe", "7",
                            "--out", str(tmp_path / "a.json")])
    assert r.exit_code == 0, r.output
    applied = load(tmp_path / "a.json")
    assert applied.nfe == 7 and applied.steps[2].ratio != 1.0
    r = runner.invoke(app, ["cpr", "apply", "--cpr", str(base), "--schedule", str(base), "--out",
                            str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "not a CPR file" in r.output
    r = runner.invoke(app, ["cpr", "apply", "--cpr", str(tmp_path / "cpr.json"), "--schedule", str(base), "--nfe",
                            "6", "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "has 5 steps" in r.output


def test_cli_dc_fit_on_digits_with_guidance(tmp_path):
    runner = CliRunner()
    base = tmp_path / "s.json"
    save(base_schedule(_digits(), "dpmsolver++2m", 4, 1.5), base)
    r = runner.invoke(app, ["dc", "fit", "--model", "digits", "--schedule", str(base), "--out",
                            str(tmp_path / "f.json"), "--iterations", "4", "--datapoints", "3", "--no-cache"])
    assert r.exit_code == 0, r.output
    fitted = load(tmp_path / "f.json")
    assert fitted.guidance == 1.5 and fitted.metadata["dc_fit"]["loss_after"] <= fitted.metadata["dc_fit"]["loss_before"]


def _digits():
    from autotune.models.registry import load_model

    return load_model("digits")


def test_search_with_fitted_ratios_writes_the_fitted_schedule(tmp_path):
    """`autotune search --ratios fit`: every candidate is scored with ratios fitted for it; the trials and the
    written file carry those ratios, and the search-set value is that of the fitted schedule."""
    import json

    from autotune.cache.store import open_store
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.registry import load_model
    from autotune.space.fileformat import load

    cache = str(tmp_path / "c.sqlite")
    out = tmp_path / "s.json"
    r = CliRunner().invoke(app, ["search", "--model", "gmm2d", "--nfe", "5", "--budget", "8", "--batch", "4",
                                 "--set-size", "128", "--workers", "0", "--ratios", "fit", "--cache", cache,
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    best = load(out)
    assert any(abs(st.ratio - 1.0) > 1e-3 for st in best.steps)
    meta = json.loads(out.read_text())["metadata"]
    trials = open_store(cache).trials(meta["search_id"])
    from autotune.space.fileformat import loads

    assert len(trials) >= 8
    # the written file is one of the scored (fitted) schedules, or a refined one (from stage 1's best or from a
    # named schedule as good) with ratios fitted for its grid; which one the validation set chose
    scored = {loads(t["metrics"]["schedule"]).hash() for t in trials}
    assert best.hash() in scored or meta["validation"]["chosen"].startswith("refined")
    plain = Evaluator(load_model("gmm2d"), "search", size=128).evaluate(best)["mse_ref"]
    assert abs(plain - meta["search_value"]) <= 1e-9 * max(1.0, plain)
    bad = CliRunner().invoke(app, ["search", "--model", "gmm2d", "--nfe", "5", "--budget", "2", "--workers", "0",
                                   "--ratios", "guess", "--no-cache", "--out", str(tmp_path / "b.json")])
    assert bad.exit_code == 2 and "--ratios" in bad.output
