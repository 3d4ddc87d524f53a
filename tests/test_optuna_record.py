"""Every search is an Optuna study in the cache's database: trials, values, params, attributes, resume."""

import dataclasses
import math

import optuna
import pytest

from autotune.cache.store import open_store
from autotune.evaluate.evaluator import Evaluator
from autotune.sampling.named import build
from autotune.search.optuna_record import StudyRecorder, storage_for, study_name
from autotune.search.runner import InProcessPool, run_search, search_id
from autotune.search.strategy import make_strategy
from autotune.search.trial import Trial
from autotune.space.fileformat import dumps
from search_helpers import search_context


@pytest.mark.parametrize("method", ["random", "evolution"])
def test_a_search_is_an_optuna_study_in_the_cache(gmm, tmp_path, method):
    store = open_store(str(tmp_path / "cache.sqlite"))
    sid = search_id(test="study", method=method)
    ctx = search_context(gmm)
    recorder = StudyRecorder(store.url, sid, ctx.space, ["mse_ref"], {"model": "gmm2d"})
    result = run_search(make_strategy(method, ctx), InProcessPool(Evaluator(gmm, "search", size=16, store=store)),
                        12, batch_size=4, store=store, sid=sid, recorder=recorder)
    study = optuna.load_study(study_name=study_name(sid), storage=f"sqlite:///{tmp_path / 'cache.sqlite'}")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == len(result.trials) == len(store.trials(sid))
    for t, trial in zip(sorted(done, key=lambda t: t.user_attrs["trial_number"]), result.trials):
        assert t.values == [trial.value]
        assert t.user_attrs["schedule_hash"] == trial.hash and t.user_attrs["method"] == method
        assert t.user_attrs["nfe"] == 4 and t.user_attrs["schedule"] == trial.schedule
        assert ctx.space.decode(_vector(ctx.space, t.params)).hash() == trial.hash  # params = the schedule
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE]
    assert study.user_attrs["model"] == "gmm2d" and study.user_attrs["objectives"] == ["mse_ref"]
    assert store.stats()["rows"]["search_trials"] == len(result.trials)  # the cache's own tables are intact


def _vector(space, params):
    """The space's vector from a trial's params (choices by name, skips as booleans)."""
    out = []
    for c in space.coords:
        v = params[c.name]
        out.append(space.choices(c.family).index(v) if c.kind == "cat" else float(v))
    return out


def test_params_are_the_schedule_coordinates(gmm):
    ctx = search_context(gmm)
    s = build("unipc-bh2-o2", gmm.noise, 4)
    rec = StudyRecorder(None, "p", ctx.space, ["mse_ref", "nfe", "class_acc"])
    rec.record(Trial(number=0, hash=s.hash(), value=0.1, objectives={"mse_ref": 0.1, "nfe": 4, "class_acc": 0.5},
                     nfe=4, method="m", schedule=dumps(s)), s)
    t = rec.study.trials[0]
    assert [t.params[f"t[{k}]"] for k in range(3)] == list(s.times[1:4])
    assert t.params["solver[0]"] == s.steps[0].solver and t.params["corrector[1]"] == s.steps[1].corrector
    assert t.values == [0.1, 4.0, 0.5]
    assert [d.name for d in rec.study.directions] == ["MINIMIZE", "MINIMIZE", "MAXIMIZE"]


def test_recording_is_idempotent_and_diverged_trials_fail(gmm, tmp_path):
    store = open_store(str(tmp_path / "c.sqlite"))
    ctx = search_context(gmm)
    s = build("ddim", gmm.noise, 4)
    trial = Trial(number=0, hash=s.hash(), value=math.inf, objectives={"mse_ref": math.inf}, nfe=4, method="m",
                  schedule=dumps(s))
    StudyRecorder(store.url, "idem", ctx.space, ["mse_ref"]).record(trial, s)
    again = StudyRecorder(store.url, "idem", ctx.space, ["mse_ref"])  # a resumed search reopens the study
    again.record(trial, s)
    again.record(dataclasses.replace(trial, number=1, value=0.5, objectives={"mse_ref": 0.5}), s)
    trials = again.study.trials
    assert [t.user_attrs["trial_number"] for t in trials] == [0, 1]
    assert trials[0].state == optuna.trial.TrialState.FAIL and trials[1].values == [0.5]


def test_no_cache_means_in_memory_storage():
    assert isinstance(storage_for(None), optuna.storages.InMemoryStorage)
    assert isinstance(storage_for("sqlite://"), optuna.storages.InMemoryStorage)


def test_the_study_connections_are_set_as_the_cache_store_sets_its_own(tmp_path):
    """Optuna's SQLite connections to the cache's file: WAL, synchronous NORMAL (1), the store's busy timeout."""
    url = f"sqlite:///{tmp_path / 'cache.sqlite'}"
    open_store(url)
    storage = storage_for(url)
    with storage.engine.connect() as conn:
        settings = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "synchronous",
                                                                             "busy_timeout")]
    assert settings[:2] == ["wal", 1] and settings[2] > 0


def test_a_trial_stopped_early_is_pruned_with_its_estimate_as_intermediate_value(gmm):
    """Pruned, as Optuna's pruners leave a trial, without params (Optuna's param plots read completed trials only;
    its schedule attribute holds them); a completed trial keeps its params."""
    ctx = search_context(gmm)
    s = build("unipc-bh2-o2", gmm.noise, 4)
    rec = StudyRecorder(None, "pruned", ctx.space, ["mse_ref"])
    rec.record(Trial(number=0, hash=s.hash(), value=0.3, objectives={"mse_ref": 0.3}, nfe=4, method="s3-mf",
                     schedule=dumps(s), screened=4, cost=4 / 128), s)
    rec.record(Trial(number=1, hash=s.hash(), value=0.2, objectives={"mse_ref": 0.2}, nfe=4, method="s3-mf",
                     schedule=dumps(s)), s)
    pruned, done = rec.study.trials
    assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.intermediate_values == {4: 0.3}
    assert pruned.values is None and pruned.params == {} and pruned.user_attrs["schedule"] == dumps(s)
    assert done.state == optuna.trial.TrialState.COMPLETE and done.values == [0.2] and len(done.params) > 0


def test_a_resumed_search_records_the_trials_a_stopped_one_had_not(gmm, tmp_path):
    """A search whose trials did not reach its study (stopped between the two writes, or run without a recorder:
    here only its first trial was recorded) is resumed: the saved trials land in the study, once each, then the new
    ones."""
    store = open_store(str(tmp_path / "cache.sqlite"))
    sid = search_id(test="resume-record")
    ctx = search_context(gmm)
    pool = InProcessPool(Evaluator(gmm, "search", size=16, store=store))
    first = run_search(make_strategy("random", ctx), pool, 6, batch_size=3, store=store, sid=sid)
    recorder = StudyRecorder(store.url, sid, ctx.space, ["mse_ref"])
    recorder.record(first.trials[0], build("ddim", gmm.noise, 4))  # one of them was recorded before the stop
    result = run_search(make_strategy("random", ctx), pool, 9, batch_size=3, store=store, sid=sid,
                        recorder=recorder)
    assert result.resumed
    numbers = [t.user_attrs["trial_number"] for t in recorder.study.get_trials(deepcopy=False)]
    assert sorted(numbers) == list(range(len(result.trials))) and len(result.trials) > len(first.trials)
    hashes = {t.user_attrs["trial_number"]: t.user_attrs["schedule_hash"] for t in recorder.study.trials}
    assert [hashes[n] for n in range(len(result.trials))] == [t.hash for t in result.trials]
