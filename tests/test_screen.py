"""Multi-fidelity scoring: the Screen that stops a hopeless candidate after its first noises, and the search
loop's Screening that sets it from the best trial."""

import math

import numpy as np
import pytest

from autotune.cache.store import open_store
from autotune.evaluate.evaluator import Evaluator
from autotune.evaluate.ids import PER_SAMPLE
from autotune.evaluate.metrics import Screen, decode_errors
from autotune.sampling.named import NAMED, build
from autotune.search.runner import InProcessPool, Screening, run_search
from autotune.search.strategy import make_strategy
from search_helpers import search_context


def test_a_screened_candidate_stops_and_is_neither_remembered_nor_stored(gmm, tmp_path):
    store = open_store(tmp_path / "c.db")
    ev = Evaluator(gmm, "search", size=64, store=store)
    bad = build("ddim", gmm.noise, 4)
    full = Evaluator(gmm, "search", size=64).evaluate(bad)  # another evaluator: nothing shared with `ev`
    head = decode_errors(full[PER_SAMPLE])[:16].mean()
    m = ev.evaluate(bad, Screen(16, limit=0.5 * head, scale=2.0))
    assert m["screened"] == 16 and not m["cached"] and not m["diverged"]
    assert m["mse_ref_screened"] == pytest.approx(head, rel=1e-5)
    assert m["mse_ref"] == pytest.approx(2.0 * head, rel=1e-5)  # the paired estimate: partial mean x scale
    assert len(decode_errors(m[PER_SAMPLE])) == 16 and math.isnan(m["traj_err"])
    assert ev.cached(bad) is None  # a partial score must never answer for the whole set
    again = ev.evaluate(bad)  # asked without a screen: scored in full, and now stored
    assert "screened" not in again and again["mse_ref"] == pytest.approx(full["mse_ref"], rel=1e-6)
    assert ev.cached(bad) is not None


def test_a_candidate_that_passes_the_screen_gets_the_whole_set_figures(gmm):
    s = build("unipc-bh2-o3", gmm.noise, 4)
    plain = Evaluator(gmm, "search", size=64).evaluate(s)
    head = decode_errors(plain[PER_SAMPLE])[:16].mean()
    screened = Evaluator(gmm, "search", size=64).evaluate(s, Screen(16, limit=2.0 * head))
    assert "screened" not in screened
    np.testing.assert_allclose(decode_errors(screened[PER_SAMPLE]), decode_errors(plain[PER_SAMPLE]), rtol=1e-5,
                               atol=1e-9)
    for k in ("mse_ref", "mse_ref_p99", "traj_err", "sliced_w"):
        assert screened[k] == pytest.approx(plain[k], rel=1e-5), k


def test_screen_and_screening_refuse_nonsense():
    with pytest.raises(ValueError):
        Screen(0, 1.0)
    with pytest.raises(ValueError):
        Screen(8, float("nan"))
    with pytest.raises(ValueError):
        Screening(samples=32, factor=1.0)  # a factor of 1 would stop candidates as good as the best
    assert Screening().screen(1e-3, None) is None  # no best yet: nothing to compare with
    screen = Screening(samples=4, factor=3.0).screen(2e-3, np.array([1e-3, 1e-3, 2e-3, 0.0, 9.0]))
    assert screen.samples == 4 and screen.limit == pytest.approx(3 * 1e-3) and screen.scale == pytest.approx(2.0)


def test_screened_search_finds_as_well_on_fewer_samples_and_says_what_it_stopped(gmm):
    """The same strategy and budget with and without the screen: the screened run sampled fewer noises, its
    best is a fully scored trial, and each stopped trial's value is the paired estimate over the screen's factor
    times the best's at the time."""
    results, sampled = {}, {}
    for label, screening in (("plain", None), ("screened", Screening(samples=16, factor=3.0))):
        ev = Evaluator(gmm, "search", size=64)
        strategy = make_strategy("evolution", search_context(gmm, nfe=4))
        results[label] = run_search(strategy, InProcessPool(ev), budget=48, batch_size=8, screening=screening)
        sampled[label] = sum(t.screened or 64 for t in results[label].trials if not t.cached)
    plain, screened = results["plain"], results["screened"]
    assert screened.true_evaluations == 48 and screened.screened > 0
    assert screened.screened == sum(bool(t.screened) for t in screened.trials)
    assert sampled["screened"] == sampled["plain"] - (64 - 16) * screened.screened  # each stopped at 16 of 64
    assert not screened.best_trial.screened
    named = min(Evaluator(gmm, "search", size=64).evaluate(build(n, gmm.noise, 4))["mse_ref"] for n in NAMED)
    assert screened.best_value <= named  # the named seeds are scored in full first
    assert screened.best_value <= 1.5 * plain.best_value, (screened.best_value, plain.best_value)
    best_so_far = math.inf
    for t in screened.trials:
        if t.screened:
            assert t.value > 3.0 * best_so_far * 0.999 or t.diverged
        else:
            best_so_far = min(best_so_far, t.value) if t.finite else best_so_far


def test_screening_is_only_for_a_plain_mse_search(gmm):
    ev = Evaluator(gmm, "search", size=32)
    strategy = make_strategy("evolution", search_context(gmm, nfe=4))
    with pytest.raises(ValueError, match="mse_ref alone"):
        run_search(strategy, InProcessPool(ev), budget=8, objectives=("traj_err",), screening=Screening())
