"""Warm starts (search/warm.py): a schedule moved onto another step count keeps its log-SNR shape and decisions,
the store's best plain schedule of each neighbouring NFE is found, and a search job starts from it."""

import dataclasses

import numpy as np
import pytest

from autotune.cache.store import open_store
from autotune.sampling.named import build
from autotune.search.job import JobConfig, run_search_job
from autotune.search.warm import positions, regrid, warm_starts
from autotune.space.encoding import ScheduleSpace
from autotune.space.schedule import Step


def space_of(model, n, **options):
    return ScheduleSpace(n, model.noise.T, 0.0, ratio_range=None, **options)


def test_regrid_onto_the_same_step_count_is_the_identity(gmm):
    for name in ("unipc-bh2-o3", "dpmsolver++2m"):
        s = build(name, gmm.noise, 5)
        moved = regrid(s, space_of(gmm, 5), gmm.noise)
        assert moved.hash() == s.hash()
        assert moved.metadata["warm_start"] == {"nfe": 5, "hash": s.hash()}


def test_regrid_interpolates_log_snr_positions_and_takes_the_nearest_steps_decisions(gmm):
    noise = gmm.noise
    steps = [Step(t, order=o, solver="unip-bh2" if k % 2 else "dpm", corrector="bh2" if k == 2 else "none",
                  corrector_order=2 if k == 2 else 0)
             for k, (t, o) in enumerate(zip([0.8, 0.5, 0.3, 0.1, 0.0], [1, 2, 3, 3, 1]))]
    s = dataclasses.replace(build("dpmsolver++2m", noise, 5), steps=tuple(steps))
    space = space_of(gmm, 9)
    moved = regrid(s, space, noise)
    assert space.contains(moved) and moved.nfe == 9 and moved.steps[-1].t == 0.0
    times = [st.t for st in moved.steps]
    assert all(a > b for a, b in zip([moved.t_start] + times, times))
    end = float(noise.t_min)
    u_src = np.concatenate([[0.0], positions(noise, s.t_start, [0.8, 0.5, 0.3, 0.1], end), [1.0]])
    expected = np.interp(np.arange(1, 9) / 9, np.arange(6) / 5, u_src)
    assert positions(noise, s.t_start, times[:-1], end) == pytest.approx(expected, abs=1e-9)
    # step k of 9 takes the decisions of source step round(k * 4 / 8); the decoder caps early orders
    for k, st in enumerate(moved.steps):
        src = steps[round(k * 4 / 8)]
        assert (st.solver, st.corrector) == (src.solver, src.corrector)
        assert st.order == min(src.order, k + 1)


def test_regrid_refuses_another_start(gmm):
    s = build("dpmsolver++2m", gmm.noise, 5)
    other = ScheduleSpace(5, gmm.noise.T / 2, 0.0, ratio_range=None)
    assert regrid(s, other, gmm.noise) is None


SET_SIZE = 64  # given: gmm2d samples cheaply enough for the job's larger default set (search/set_sizes.py)


def _search(tmp_path, nfe, store, **options):
    config = JobConfig(model="gmm2d", nfe=str(nfe), budget=16, set_size=SET_SIZE, refine=0, validate=0,
                       score_report=False, out=tmp_path / f"nfe{nfe}.json", **options)
    return run_search_job(config, store)


def test_a_search_starts_from_the_best_schedule_a_neighbouring_nfe_found(tmp_path, gmm):
    store = open_store(str(tmp_path / "cache.sqlite"))
    first = _search(tmp_path, 4, store)
    model = first.model
    from autotune.evaluate.evaluator import Evaluator

    ev = Evaluator(model, "search", size=SET_SIZE, seed=0)
    named = [build(n, model.noise, 5).hash() for n in ("unipc-bh2-o2",)]
    warm = warm_starts(store, ev.fingerprint, ev.eval_set.id, space_of(model, 5), model.noise, None, exclude=named)
    assert len(warm) == 1 and warm[0].metadata["warm_start"]["nfe"] == 4
    # the best plain schedule of NFE 4 on the search set, moved onto 5 steps
    best4 = min((t for t in first.search.trials if t.nfe == 4 and t.screened is None), key=lambda t: t.value)
    assert warm[0].metadata["warm_start"]["hash"] == best4.hash
    assert warm[0].hash() == regrid(best4.schedule_value(), space_of(model, 5), model.noise).hash()
    # too far (NFE 7), another guidance, no store: no warm start
    assert warm_starts(store, ev.fingerprint, ev.eval_set.id, space_of(model, 7), model.noise, None) == ()
    assert warm_starts(store, ev.fingerprint, ev.eval_set.id, space_of(model, 5, guidance=2.0), model.noise,
                       2.0) == ()
    assert warm_starts(None, ev.fingerprint, ev.eval_set.id, space_of(model, 5), model.noise, None) == ()

    warmed = _search(tmp_path, 5, store, warm_start=True)
    assert warm[0].hash() in {t.hash for t in warmed.search.trials}  # scored as a seed
    cold = _search(tmp_path, 5, store)  # the default: no warm start
    assert cold.search_id != warmed.search_id and not cold.search.resumed
    assert warm[0].hash() not in {t.hash for t in cold.search.trials}
    again = _search(tmp_path, 5, store, warm_start=True)  # the same warm starts: the same search, resumed
    assert again.search_id == warmed.search_id and again.search.resumed


def test_a_warm_start_asked_where_none_applies_says_so(tmp_path):
    from autotune.search.job import JobHooks, prepare_search

    lines = []
    store = open_store(str(tmp_path / "cache.sqlite"))
    config = JobConfig(model="gmm2d", nfe="4-5", method="evolution", budget=4, set_size=SET_SIZE, refine=0,
                       validate=0, score_report=False, warm_start=True)
    setup = prepare_search(config, store, hooks=JobHooks(notify=lines.append))
    assert lines == ["warm start: not used (only a search at one NFE from pure noise takes one)"]
    plain = prepare_search(dataclasses.replace(config, warm_start=False), store)
    assert setup.search_id == plain.search_id
