"""Search strategies (one conformance suite over the registry), the runner, resuming, and the CLI."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from autotune.cache.store import open_store
from autotune.evaluate.evaluator import Evaluator
from autotune.evaluate.ids import PER_SAMPLE
from autotune.evaluate.metrics import decode_errors
from autotune.sampling.named import NAMED, SIGMA_MIN_NAMED, build
from autotune.search.runner import InProcessPool, run_search, search_id
from autotune.search.strategy import make_strategy, method_names
from search_helpers import search_context


@pytest.mark.parametrize("method", method_names())
def test_strategy_conformance(gmm, method):
    """Every strategy: valid schedules in the space, JSON state, and a restored copy continues identically."""
    ctx = search_context(gmm)
    a = make_strategy(method, ctx)
    for _ in range(3):
        batch = a.ask(5)
        # n, or for a strategy scoring in part a batch of one fidelity (s3-mf's promotions): at least one, at most n
        assert len(batch) == 5 or (getattr(a, "partial_scores", False) and 1 <= len(batch) < 5), len(batch)
        for i, s in enumerate(batch):
            assert ctx.space.contains(s) and s.nfe == 4
            a.tell(s, float(i) if i != 2 else math.inf)
    state = json.loads(json.dumps(a.state()))  # JSON, not pickle
    b = make_strategy(method, ctx)
    b.load_state(state)
    assert [s.hash() for s in a.ask(4)] == [s.hash() for s in b.ask(4)]


def test_unknown_method_is_a_one_line_error(gmm):
    from autotune.search.strategy import SearchError

    with pytest.raises(SearchError, match="unknown search method"):
        make_strategy("annealing", search_context(gmm))


@pytest.mark.parametrize("method", ["evolution", "random"])
def test_search_beats_the_named_baselines_on_gmm2d(gmm, method):
    evaluator = Evaluator(gmm, "search", size=32)
    strategy = make_strategy(method, search_context(gmm, nfe=4))
    result = run_search(strategy, InProcessPool(evaluator), budget=40, batch_size=8)
    named = min(evaluator.evaluate(build(n, gmm.noise, 4))["mse_ref"] for n in NAMED)
    assert result.true_evaluations == 40 and result.best.nfe == 4
    assert result.best_value <= named  # the baselines are proposed first: a search cannot lose to them
    if method == "evolution":
        assert result.best_value < 0.5 * named, (result.best_value, named)


def test_interrupted_search_resumes_without_evaluating_twice(gmm, tmp_path):
    store = open_store(str(tmp_path / "cache.sqlite"))
    sid = search_id(test="resume")

    class Stop(Exception):
        pass

    stopped_at = []

    def stop_after_two_batches(progress):
        if progress.true_evaluations >= 16:
            stopped_at.append(progress.true_evaluations)
            raise Stop

    evaluator = Evaluator(gmm, "search", size=16, store=store)
    with pytest.raises(Stop):
        run_search(make_strategy("evolution", search_context(gmm)), InProcessPool(evaluator), 40, batch_size=8,
                   store=store, sid=sid, callback=stop_after_two_batches)
    evaluator = Evaluator(gmm, "search", size=16, store=store)  # a fresh process would start like this
    result = run_search(make_strategy("evolution", search_context(gmm)), InProcessPool(evaluator), 40, batch_size=8,
                        store=store, sid=sid)
    assert result.resumed and result.true_evaluations == 40
    assert evaluator.misses == 40 - stopped_at[0]  # only the remaining budget was computed
    hashes = [t.hash for t in result.trials if not t.cached]
    assert len(hashes) == len(set(hashes)) == 40  # no schedule was evaluated twice


def test_resume_drops_trials_the_saved_state_does_not_cover(gmm, tmp_path):
    """Rows written after the last saved state (a kill between a batch's trials and its state) are redone."""
    store = open_store(str(tmp_path / "cache.sqlite"))
    sid = search_id(test="stray")

    def search(budget):
        return run_search(make_strategy("evolution", search_context(gmm)),
                          InProcessPool(Evaluator(gmm, "search", size=16, store=store)), budget, batch_size=8,
                          store=store, sid=sid)

    first = search(8)
    count = store.get_search_state(sid)["trials"]
    assert count == len(first.trials) == len(store.trials(sid))
    for k in range(3):  # a cut batch's rows: recorded, but not covered by the state
        store.add_trial(sid, count + k, "stray", {"value": 0.0, "cached": False, "objectives": {"mse_ref": 0.0}})
    second = search(16)
    assert second.resumed and second.true_evaluations == 16
    rows = store.trials(sid)
    assert [r["trial_number"] for r in rows] == list(range(len(second.trials)))
    assert "stray" not in {r["schedule_hash"] for r in rows} and second.best_value > 0.0


def _cli(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "autotune.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, **kwargs)


def _saved_search(cache):
    """The one saved search: its id, its state and its trial rows (read with sqlite3, as an outside observer)."""
    import sqlite3

    from autotune.cache.store import loads

    with sqlite3.connect(cache) as db:
        rows = db.execute("SELECT search_id, state FROM search_states "
                          "WHERE search_id NOT LIKE 'model-memo:%'").fetchall()
        assert len(rows) == 1
        sid, state = rows[0][0], loads(rows[0][1])
        trials = [{"number": n, "hash": h, **loads(m)} for n, h, m in db.execute(
            "SELECT trial_number, schedule_hash, metrics FROM search_trials WHERE search_id = ? ORDER BY trial_number",
            (sid,))]
    return sid, state, trials


def _search_rows(cache):
    with open_store(str(cache)) as store:
        return {e["schedule_hash"] for e in store.iter_evaluations() if e["eval_set"].startswith("search-")}


def test_sigkilled_search_finishes_with_no_evaluation_done_twice(tmp_path):
    """A real process killed with SIGKILL mid-search; the re-run resumes from the saved state and the trial rows,
    answers everything already scored from the cache (counted as cache hits), and computes only the rest."""
    import optuna

    cache = tmp_path / "cache.sqlite"
    args = ["search", "--model", "gmm2d", "--nfe", "4", "--budget", "48", "--batch", "4", "--workers", "0",
            "--refine", "0", "--validate", "0", "--report-size", "64", "--cache", cache, "--out", tmp_path / "s.json"]
    proc = subprocess.Popen([sys.executable, "-m", "autotune.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if cache.exists() and len(_search_rows(cache)) >= 9:  # of 13 on this machine: screened scores are not kept
            break
    assert proc.poll() is None, "the search finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _search_rows(cache)
    sid, state, rows = _saved_search(cache)
    count = state["trials"]
    assert isinstance(count, int)  # the state keeps a count; the trials are rows of their own
    assert set(state) == {"version", "strategy", "true_evaluations", "cache_hits", "trials", "seconds", "screened",
                          "screen_errors", "spent"}
    assert state["spent"] == state["true_evaluations"]  # every candidate scored in full: each cost one
    assert 0 < count < 48 + len(NAMED) and len(rows) >= count
    saved = rows[:count]
    assert [t["number"] for t in saved] == list(range(count))
    done = _cli(*args, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "(resumed)" in done.stdout
    _, state, trials = _saved_search(cache)
    assert [t["number"] for t in trials] == list(range(state["trials"]))  # rows past the saved state were redone
    assert [t["hash"] for t in trials[:count]] == [t["hash"] for t in saved]
    computed = [t["hash"] for t in trials if not t["cached"]]
    assert len(computed) == len(set(computed)) == 48  # the budget, each candidate computed once
    resumed_part = trials[count:]
    for t in resumed_part:
        if t["hash"] in before:  # already in the cache when the search restarted: must not be computed again
            assert t["cached"], t
    hits = sum(t["cached"] for t in trials)
    assert hits == state["cache_hits"] and f"({hits} cache hits)" in " ".join(done.stdout.split())
    # the cut batch came from the cache, but for candidates the screen stopped there (a screened score is not kept)
    assert sum(t["cached"] for t in resumed_part) >= sum(not r.get("screened") for r in rows[count:])
    stored = {t["hash"] for t in trials if not t["cached"] and not t.get("screened")}  # a screened score is not kept
    # and the named schedules that are no seed of the search (diffusers' bh1), scored on its set for the closing table
    from autotune.models.registry import load_model
    compared = {build(n, load_model("gmm2d").noise, 4).hash() for n in SIGMA_MIN_NAMED} - before - stored
    assert compared and _search_rows(cache) == before | stored | compared and len(stored) < len(computed)
    study = optuna.load_study(study_name=f"autotune-{sid}", storage=f"sqlite:///{cache}")
    numbers = sorted(t.user_attrs["trial_number"] for t in study.trials)
    assert numbers == list(range(len(trials)))  # every trial once in the Optuna study, resumed or not


def test_cli_search_writes_a_schedule_that_beats_the_baselines(tmp_path):
    out = tmp_path / "best.json"
    done = _cli("search", "--model", "gmm2d", "--nfe", "4", "--budget", "32", "--workers", "0", "--no-cache",
                "--out", out, timeout=300)
    assert done.returncode == 0, done.stderr
    from autotune.space.fileformat import load

    best = load(out)  # the default method of a single-objective search is s3
    assert best.nfe == 4 and best.metadata["method"] == "s3" and best.metadata["true_evaluations"] == 32
    assert best.metadata["budget_spent"] == 32
    assert "x better" in done.stdout
    assert "tail: s3-nfe4's p99" in " ".join(done.stdout.split())  # its p99 against the lowest named one's


def test_gradient_refinement_lowers_the_loss_keeps_a_valid_grid_and_shifts_model_times(gmm):
    from autotune.search.gradient import refine_times

    evaluator = Evaluator(gmm, "search", size=32)
    base = build("dpmsolver++2m", gmm.noise, 5)
    refined = refine_times(gmm, base, evaluator.eval_set, evaluator.reference(None, nfe=5), iterations=25,
                           lr=0.1)
    assert refined.losses[-1] < refined.losses[0]
    s = refined.schedule
    assert s.nfe == 5 and s.times[0] == base.times[0] and s.times[-1] == 0.0 and s.times != base.times
    assert [st.order for st in s.steps] == [st.order for st in base.steps]
    assert any(st.shift != 0 for st in s.steps) and all(st.shift == 0 for st in base.steps)

    def rms(schedule):  # the default loss: root mean square of the per-sample errors
        errors = decode_errors(evaluator.evaluate(schedule)[PER_SAMPLE]).astype(np.float64)
        return float(np.sqrt(np.mean(errors ** 2)))

    assert refined.losses[0] == pytest.approx(rms(base), rel=1e-4)  # the given schedule
    assert rms(s) == pytest.approx(min(refined.losses), rel=1e-4)  # the best iterate
    assert rms(s) < rms(base)
    only_times = refine_times(gmm, base, evaluator.eval_set, evaluator.reference(None, nfe=5), iterations=25,
                              lr=0.1, shifts=False, aggregate="mean")
    assert all(st.shift == 0 for st in only_times.schedule.steps)
    assert only_times.losses[0] == pytest.approx(evaluator.evaluate(base)["mse_ref"], rel=1e-4)  # the plain mean
    assert evaluator.evaluate(only_times.schedule)["mse_ref"] == pytest.approx(min(only_times.losses), rel=1e-4)
    with pytest.raises(ValueError, match="aggregate 'median'"):
        refine_times(gmm, base, evaluator.eval_set, evaluator.reference(None, nfe=5), aggregate="median")


def test_refinement_of_the_data_scales_alone_keeps_everything_else(gmm):
    """``move_grid=False, shifts=False, data_scales=True``: only the steps' data scales move (within the schedule's
    limits), the loss falls, and the best iterate is the schedule written."""
    from autotune.search.gradient import QuasiNewtonDescent, refine_times
    from autotune.space.schedule import MAX_DATA_SCALE

    evaluator = Evaluator(gmm, "search", size=32)
    base = build("dpmsolver++2m", gmm.noise, 5)
    fitted = refine_times(gmm, base, evaluator.eval_set, evaluator.reference(None, nfe=5), iterations=15, lr=0.1,
                          move_grid=False, shifts=False, data_scales=True)
    s = fitted.schedule
    assert min(fitted.losses) < fitted.losses[0]
    assert s.times == base.times and all(st.shift == 0 and st.ratio == 1 for st in s.steps)
    assert [dataclasses.replace(st, data_scale=1.0) for st in s.steps] == list(base.steps)
    assert sum(st.data_scale != 1.0 for st in s.steps) == 5
    assert all(1 / MAX_DATA_SCALE <= st.data_scale <= MAX_DATA_SCALE for st in s.steps)
    assert evaluator.evaluate(s)["mse_ref"] < evaluator.evaluate(base)["mse_ref"]
    by_l_bfgs = QuasiNewtonDescent(gmm, base, evaluator.eval_set, evaluator.reference(None, nfe=5), iterations=6,
                                   move_grid=False, shifts=False, data_scales=True).finish()
    assert min(by_l_bfgs.losses) < by_l_bfgs.losses[0] and by_l_bfgs.schedule.times == base.times
    assert [dataclasses.replace(st, data_scale=1.0) for st in by_l_bfgs.schedule.steps] == list(base.steps)


@pytest.fixture
def refinement_start(gmm):
    """What the gradient refinement tests start from: gmm's search set, UniPC bh2 order 2 at NFE 5, its reference."""
    evaluator = Evaluator(gmm, "search", size=32)
    return evaluator, build("unipc-bh2-o2", gmm.noise, 5), evaluator.reference(None, nfe=5)


def test_gradient_refinement_split_over_parts_of_the_noise_takes_the_same_steps(gmm, refinement_start):
    """The loss handed out in parts (as RayPool.gradient_split does over its workers) and summed is the loss on all
    of the noise: the same iterates, to the float32 rounding of other batch sizes."""
    from autotune.search.gradient import error_sum, refine_times

    evaluator, base, reference = refinement_start
    calls = []

    def halves(model, schedule, noise, labels, target, power):
        def errors(values):
            calls.append(power)
            parts = [error_sum(model, schedule, noise[p], labels, target[p], power, values)
                     for p in (slice(0, 13), slice(13, None))]
            return parts[0][0] + parts[1][0], {k: parts[0][1][k] + parts[1][1][k] for k in parts[0][1]}
        return errors

    for aggregate in ("rms", "mean"):
        whole = refine_times(gmm, base, evaluator.eval_set, reference, iterations=8, lr=0.1, ratios=True,
                             aggregate=aggregate)
        split = refine_times(gmm, base, evaluator.eval_set, reference, iterations=8, lr=0.1, ratios=True,
                             aggregate=aggregate, split=halves)
        assert split.losses == pytest.approx(whole.losses, rel=1e-5) and len(whole.losses) == 8
        assert split.schedule.times == pytest.approx(whole.schedule.times, rel=1e-5)
        assert [st.ratio for st in split.schedule.steps] == pytest.approx([st.ratio for st in whole.schedule.steps],
                                                                         rel=1e-5)
    assert calls == [2] * 8 + [1] * 8  # rms sums squared errors, mean the errors
    here = refine_times(gmm, base, evaluator.eval_set, reference, iterations=3, split=lambda *a: None)
    assert here.losses == pytest.approx(refine_times(gmm, base, evaluator.eval_set, reference, iterations=3).losses)


@pytest.mark.parametrize("spike", [100.0, math.nan])
def test_gradient_refinement_backs_off_from_a_spike_to_the_best_iterate(gmm, refinement_start, spike):
    """An iterate whose loss jumps over BACKOFF x the best so far (or is not finite) sends the parameters back to
    the best iterate and Adam goes on from there at half the step, with the best iterate's own loss and gradient
    (not computed again: the budget of 8 evaluations buys 8 distinct iterates); the refinement does not stop there
    and still returns the best iterate."""
    from autotune.search.gradient import BACKOFF, error_sum, refine_times

    evaluator, base, reference = refinement_start
    seen = []

    def spiking(model, schedule, noise, labels, target, power):
        def errors(values):
            total, grads = error_sum(model, schedule, noise, labels, target, power, values)
            seen.append({k: v.clone() for k, v in values.items() if v is not None})
            return (total * spike if len(seen) == 4 else total), grads
        return errors

    out = refine_times(gmm, base, evaluator.eval_set, reference, iterations=8, lr=0.1, split=spiking)
    assert len(seen) == 8 and len(out.losses) == (8 if math.isfinite(spike) else 7)
    first = out.losses[:3]
    assert spike != spike or out.losses[3] > BACKOFF * min(first)
    best = min(range(3), key=first.__getitem__)
    assert not any(all(torch.equal(later[k], seen[best][k]) for k in later) for later in seen[4:])  # never again
    # the iterate after the spike is one fresh Adam step of half the size from the best: each shift moves by
    # 0.1 / 2 (Adam's first step is the step size times the gradient's sign)
    moved = (seen[4]["shifts"] - seen[best]["shifts"]).abs()
    assert moved.max().item() == pytest.approx(0.05, rel=1e-3)
    assert min(out.losses) < min(first)


def test_gradient_refinement_can_fit_the_compensation_ratios_with_the_grid(gmm, refinement_start):
    from autotune.search.gradient import refine_times

    evaluator, base, reference = refinement_start
    fitted = refine_times(gmm, base, evaluator.eval_set, reference, iterations=20, lr=0.1, ratios=True)
    s = fitted.schedule
    # compensation needs dc_order + 1 earlier outputs: the first dc_order steps keep ratio 1, the rest move
    assert [st.ratio for st in s.steps[: base.dc_order]] == [1.0] * base.dc_order
    assert all(st.ratio != 1.0 for st in s.steps[base.dc_order:])
    assert evaluator.evaluate(s)["mse_ref"] < evaluator.evaluate(base)["mse_ref"]
    plain = refine_times(gmm, base, evaluator.eval_set, reference, iterations=20, lr=0.1)
    assert all(st.ratio == 1.0 for st in plain.schedule.steps)  # ratios move only when asked
    assert fitted.losses[0] == pytest.approx(plain.losses[0], rel=1e-9)  # both start from the given schedule
    nothing = refine_times(gmm, build("ddim", gmm.noise, 1), evaluator.eval_set, evaluator.reference(None, nfe=1),
                           shifts=False, ratios=True)
    assert nothing.losses == [] and nothing.schedule == build("ddim", gmm.noise, 1)  # one step onto 0: no freedom


def test_a_trial_row_round_trips_through_the_store(gmm, tmp_path):
    """Trials are values: what the store keeps for one is its row, and reading the row back gives the same trial
    (resumed searches rebuild their trials this way)."""
    from autotune.cache.store import open_store
    from autotune.search.trial import Trial
    from autotune.space.fileformat import dumps

    store = open_store(str(tmp_path / "c.sqlite"))
    s = build("ddim", gmm.noise, 3)
    trial = Trial(number=0, hash=s.hash(), value=0.25, objectives={"mse_ref": 0.25, "latency_ms": 3.0},
                  schedule=dumps(s), mse_ref=0.25, nfe=3, method="random", latency_ms=3.0, feasible=True)
    store.add_trial("sid", trial.number, trial.hash, trial.row())
    (row,) = store.trials("sid")
    back = Trial.from_row(row["trial_number"], row["schedule_hash"], row["metrics"])
    assert back == trial and "number" not in trial.row() and "extra" not in trial.row()
    assert "feasible" not in Trial(1, "h", 0.1, {"mse_ref": 0.1}, "{}").row()  # optional fields only when set


def test_gradient_refinement_gives_up_halfway_above_the_bar_and_returns_its_best(gmm, refinement_start):
    """``give_up_above``: a run whose best loss after half its iterations is over the bar stops there with its best
    iterate; under the bar (or with none) it runs every iteration, the same iterates."""
    from autotune.search.gradient import refine_times

    evaluator, base, reference = refinement_start
    full = refine_times(gmm, base, evaluator.eval_set, reference, iterations=8, lr=0.1)
    stopped = refine_times(gmm, base, evaluator.eval_set, reference, iterations=8, lr=0.1, give_up_above=1e-12)
    assert not full.gave_up and len(full.losses) == 8
    assert stopped.gave_up and stopped.losses == full.losses[:4]
    assert min(stopped.losses) < stopped.losses[0]  # it had moved: the best of its 4 iterates is returned
    assert evaluator.evaluate(stopped.schedule)["mse_ref"] < evaluator.evaluate(base)["mse_ref"]
    cleared = refine_times(gmm, base, evaluator.eval_set, reference, iterations=8, lr=0.1,
                           give_up_above=2 * min(full.losses[:4]))
    assert not cleared.gave_up and cleared.losses == full.losses
    single = refine_times(gmm, base, evaluator.eval_set, reference, iterations=1, lr=0.1, give_up_above=1e-12)
    assert not single.gave_up and single.losses == full.losses[:1]  # half of 1 step is none: nothing to judge by


def test_descents_run_in_parts_and_interleaved_take_the_iterates_they_take_alone(gmm, refinement_start):
    """Descent (the job's race) runs refine_times' descent in parts: two starts taken to halfway one after the
    other, then finished, take the iterates each takes alone; giving up returns the best of the first half."""
    from autotune.sampling.named import build
    from autotune.search.gradient import Descent, refine_times

    evaluator, base, reference = refinement_start
    other = build("dpmsolver++2m", gmm.noise, 5)
    alone = [refine_times(gmm, s, evaluator.eval_set, reference, iterations=6, lr=0.1, ratios=True)
             for s in (base, other)]
    runs = [Descent(gmm, s, evaluator.eval_set, reference, iterations=6, lr=0.1, ratios=True) for s in (base, other)]
    for run in runs:
        run.halfway()
        assert run.evaluations == 3 and run.result is None and len(run.so_far.losses) == 3
    assert runs[1].give_up().losses == alone[1].losses[:3]
    assert runs[1].best_loss == min(alone[1].losses[:3])
    done = runs[0].finish()
    assert done.losses == alone[0].losses and done.schedule == alone[0].schedule and not done.gave_up
    assert runs[0].best_loss == pytest.approx(min(done.losses)) and runs[0].above(0.0) is False  # finished
    assert runs[0].give_up() is done  # nothing left to give up: the result


def test_quasi_newton_descent_counts_each_evaluation_once_and_runs_in_parts_as_whole(gmm, refinement_start):
    """QuasiNewtonDescent (L-BFGS on refine_times' parameters and loss): every evaluation of the loss counts once
    and the budget holds exactly (a part that begins where the last one ended does not pay for that point again);
    run to halfway and then finished, or one evaluation at a time, it takes the iterates it takes in one go; it
    lowers the loss, the schedule returned is its best iterate; giving up at halfway returns the first half's best,
    marked."""
    from autotune.search.gradient import QuasiNewtonDescent, error_sum

    evaluator, base, reference = refinement_start
    calls = []

    def counted(model, schedule, noise, labels, target, power):
        def errors(values):
            calls.append(1)
            return error_sum(model, schedule, noise, labels, target, power, values)
        return errors

    def descent(iterations=10):
        return QuasiNewtonDescent(gmm, base, evaluator.eval_set, reference, iterations=iterations, ratios=True,
                                  split=counted)

    whole = descent()
    whole.run(10)
    assert whole.evaluations == len(calls) == len(whole.so_far.losses) == 10
    calls.clear()
    parts = descent()
    parts.halfway()
    assert parts.evaluations == len(calls) == 5 and parts.result is None
    done = parts.finish()
    assert parts.evaluations == len(calls) == 10 and done.losses == whole.so_far.losses
    assert done.schedule == whole.so_far.schedule and not done.gave_up
    assert min(done.losses) < done.losses[0] and parts.best_loss == min(done.losses)
    calls.clear()
    steps = descent()  # one evaluation a part: most parts end inside a line search, which the next takes again
    for n in range(1, 11):
        steps.run(n)
        assert steps.evaluations == len(calls) == n and steps.so_far.losses == whole.so_far.losses[:n]

    def rms(schedule):
        errors = decode_errors(evaluator.evaluate(schedule)[PER_SAMPLE]).astype(np.float64)
        return float(np.sqrt(np.mean(errors ** 2)))

    assert done.losses[0] == pytest.approx(rms(base), rel=1e-4) and rms(done.schedule) == pytest.approx(
        min(done.losses), rel=1e-4)
    stopped = descent()
    stopped.halfway()
    assert stopped.above(0.0) and not stopped.above(math.inf)
    given_up = stopped.give_up()
    assert given_up.gave_up and given_up.losses == whole.so_far.losses[:5]
    assert stopped.give_up() is given_up and stopped.finish() is given_up  # it has ended
    # go_on (POLISH): a descent taken on past its end, its history kept, takes the iterates of a longer one
    calls.clear()
    went_on = stopped.go_on(5)
    assert went_on.losses == whole.so_far.losses and not went_on.gave_up and len(calls) == 5
    assert went_on.schedule == whole.so_far.schedule
    short = descent(iterations=5)
    short.finish()
    assert short.go_on(3).losses == whole.so_far.losses[:8] and short.evaluations == 8
