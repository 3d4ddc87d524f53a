"""Fault injection: concurrent first use of a new SQLite cache, identical searches at once, a stalled or
missing Ray worker, and a corrupted cache page. Every test is bounded (subprocess and thread timeouts) and
asserts what the user sees: no crash, exact trial counts, one line saying what happened."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import typer
from typer.testing import CliRunner

from autotune.cache.store import EvalKey, open_store
from autotune.cache_cli import cache_app

# ------------------------------------------------------------------------- several processes at once

# Each child imports everything, says it is ready, waits for the go file, then opens the cache and the study
# at the same moment as the others (the race is in creating the schema of a new file).
_CHILD = r"""
import sys, time
from pathlib import Path

mode, cache, name, n, ready, go = sys.argv[1:7]
import torch
torch.set_num_threads(1)
from autotune.cache.store import open_store
from autotune.models.registry import load_model
from autotune.sampling.named import build
from autotune.search.optuna_record import StudyRecorder
from autotune.search.trial import Trial
from autotune.space.encoding import ScheduleSpace
from autotune.space.fileformat import dumps

model = load_model("gmm2d", torch.float64)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)
store = open_store(cache)
if mode == "recorder":  # a search's recorder on its own study, n trials
    space = ScheduleSpace(4, model.noise.T, 0.0, ratio_range=None)
    rec = StudyRecorder(store.url, name, space, ["mse_ref"])
    s = build("ddim", model.noise, 4)
    for i in range(int(n)):
        rec.record(Trial(i, s.hash(), 0.1 * i, {"mse_ref": 0.1 * i}, dumps(s), nfe=4, method="m"), s)
else:  # a whole search (same id in every child started with the same name), trials to the store and the study
    from autotune.evaluate.evaluator import Evaluator
    from autotune.search.runner import InProcessPool, run_search
    from autotune.search.strategy import SearchContext, make_strategy
    from autotune.sampling.named import NAMED

    space = ScheduleSpace(4, model.noise.T, 0.0, ratio_range=None)
    seeds = tuple(build(k, model.noise, 4) for k in NAMED)
    strategy = make_strategy("evolution", SearchContext(space, model.noise, seeds, 0))
    rec = StudyRecorder(store.url, name, space, ["mse_ref"])
    result = run_search(strategy, InProcessPool(Evaluator(model, "search", size=16, store=store)), int(n),
                        batch_size=4, store=store, sid=name, recorder=rec)
    print("trials", len(result.trials))
"""


def _run_together(tmp_path: Path, jobs: list[tuple[str, str, int]], cache: Path, timeout: float = 240):
    """Start one child per (mode, name, n), release them at once, and return their CompletedProcess-like
    (returncode, output) pairs; a child still running at the timeout is killed and counts as a failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    go = tmp_path / "go"
    procs, readies = [], []
    for k, (mode, name, n) in enumerate(jobs):
        ready = tmp_path / f"ready{k}"
        readies.append(ready)
        procs.append(subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(cache), name, str(n), str(ready),
                                       str(go)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env))
    deadline = time.monotonic() + timeout
    while not all(r.exists() for r in readies) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    go.touch()
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            text += "\n[killed at the test's timeout]"
        out.append((p.returncode, text))
    return out


def _study_numbers(cache: Path, name: str) -> list[int]:
    study = optuna.load_study(study_name=f"autotune-{name}", storage=f"sqlite:///{cache}")
    return sorted(t.user_attrs["trial_number"] for t in study.get_trials(deepcopy=False))


def test_three_processes_at_once_on_a_new_sqlite_cache(tmp_path):
    """Two copies of one search (same id) and a third process recording its own study start on a new cache file
    at the same moment: none crashes while creating the cache's and Optuna's tables, and each study holds each
    trial once (the twins' trial rows in the store are the reference), not one copy per process."""
    cache = tmp_path / "new.sqlite"
    results = _run_together(tmp_path, [("search", "twin", 12), ("search", "twin", 12), ("recorder", "solo", 10)],
                            cache)
    for rc, text in results:
        assert rc == 0, text[-3000:]
    assert _study_numbers(cache, "solo") == list(range(10))
    numbers = _study_numbers(cache, "twin")
    with open_store(cache) as store:
        rows = [r["trial_number"] for r in store.trials("twin")]
    assert len(rows) >= 12
    assert numbers == rows  # each trial number once, and every trial the store holds is in the study


# --------------------------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_two_cpus():
    """A private Ray runtime with 2 CPUs (so a pool of 3 cannot get all its workers), and the spec of a
    gmm2d evaluator with its reference."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.registry import load_model
    from autotune.search.runner import EvaluatorSpec

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    evaluator = Evaluator(load_model("gmm2d"), "search", size=16)
    refs = {evaluator.reference_version(None): evaluator.reference(None)}
    spec = EvaluatorSpec("gmm2d", "search", 16, 0, None, evaluator.ref_steps)
    yield spec, refs
    ray.shutdown()


def _bounded(fn, seconds: float):
    """fn() in a thread; its result, or a test failure if it has not returned after ``seconds`` (a hang)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"still running after {seconds:.0f} s: the pool hangs")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _schedules():
    from autotune.models.registry import load_model
    from autotune.sampling.named import NAMED, build

    noise = load_model("gmm2d").noise
    return [build(n, noise, k) for n in NAMED for k in (4, 5)]


def test_a_stalled_ray_worker_is_killed_and_its_candidate_retried(ray_two_cpus):
    from autotune.search.runner import RayPool

    spec, refs = ray_two_cpus
    said: list[str] = []
    pool = RayPool(spec, 2, references=refs, timeout_s=8.0, notify=said.append)
    stalled = None
    try:
        schedules = _schedules()
        pool.map(schedules)  # warm: both workers have scored (the stall below is the only slow thing)
        # the pid read after the warm map: on a loaded machine that map may itself time out and replace a worker
        stalled, said[:] = pool.worker_pids()[0], []
        os.kill(stalled, signal.SIGSTOP)  # alive but silent: no crash for Ray to notice
        results = _bounded(lambda: pool.map(schedules), 120)
        assert [r["nfe"] for r in results] == [s.nfe for s in schedules]
        assert pool.restarts >= 1 and stalled not in pool.worker_pids()
        told = [m for m in said if "no result" in m]
        assert len(told) == 1 and str(stalled) in told[0] and "retried" in told[0] and "\n" not in told[0], said
    finally:
        if stalled is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stalled, signal.SIGCONT)  # whatever happened, never leave a stopped process behind
        pool.close()


def test_the_default_candidate_timeout_follows_the_measured_evaluation_time():
    from autotune.search.runner import (CANDIDATE_TIMEOUT_FACTOR, FIRST_CANDIDATE_TIMEOUT_S, MIN_CANDIDATE_TIMEOUT_S,
                                        candidate_timeout)

    assert candidate_timeout(None, None) == FIRST_CANDIDATE_TIMEOUT_S  # nothing measured yet: generous
    assert candidate_timeout(None, 0.02) == MIN_CANDIDATE_TIMEOUT_S  # fast candidates: the floor
    slow = MIN_CANDIDATE_TIMEOUT_S  # a slowest candidate whose multiple is above the floor
    assert candidate_timeout(None, slow) == CANDIDATE_TIMEOUT_FACTOR * slow > slow
    assert candidate_timeout(7.5, slow) == 7.5  # configured: as given


def test_a_pool_that_gets_no_worker_stops_with_one_line(ray_two_cpus):
    """While one pool holds both CPUs, another gets no worker at all: it says what it waits for, then stops with
    one line instead of waiting forever."""
    from autotune.search.runner import RayPool
    from autotune.search.strategy import SearchError

    spec, refs = ray_two_cpus
    pool = RayPool(spec, 2, references=refs)
    try:
        assert len(set(pool.worker_pids())) == 2
        with pytest.raises(SearchError) as e:
            _bounded(lambda: RayPool(spec, 1, references=refs, startup_timeout_s=3.0), 60)
        msg = str(e.value)
        assert "no Ray worker started within 3 s" in msg and "0 of 2 CPUs free" in msg and "\n" not in msg, msg
        schedules = _schedules()
        assert [r["nfe"] for r in pool.map(schedules)] == [s.nfe for s in schedules]  # the first pool is unhurt
    finally:
        pool.close()


def test_a_search_starts_on_the_workers_the_cluster_can_give_and_says_so(ray_two_cpus, tmp_path):
    """`autotune search --workers 3` on a 2-CPU Ray starts on 2 (the third waits for a CPU that never frees) and
    says so on stderr, in one line."""
    from autotune.cli import app

    args = ["search", "--model", "gmm2d", "--nfe", "4", "--budget", "8", "--batch", "4", "--workers", "3",
            "--validate", "0", "--no-cache", "--out", str(tmp_path / "s.json")]
    r = _bounded(lambda: CliRunner().invoke(app, args), 180)
    assert r.exit_code == 0, r.output
    told = [line for line in r.stderr.splitlines() if "2 of 3 Ray workers started" in line]
    assert len(told) == 1 and "waiting" in told[0], r.stderr
    assert "true evaluations" in r.stdout


# ------------------------------------------------------------------------------------- corrupted page


def _cli():
    app = typer.Typer()
    app.add_typer(cache_app, name="cache")

    @app.callback()
    def _root() -> None:  # keeps `cache` a sub-command
        pass

    return app


def _corrupt_a_middle_page(path: Path, offset: int, length: int) -> None:
    """Overwrite ``length`` bytes at ``offset`` of the page in the middle of the file (a b-tree page of the
    evaluations table) with garbage."""
    with sqlite3.connect(path) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    with open(path, "r+b") as f:
        f.seek((pages // 2) * page_size + offset)
        f.write(bytes([0xA5]) * length)


@pytest.mark.parametrize("offset, length", [(8, 16), (0, 4096)], ids=["cell pointers", "whole page"])
def test_cache_check_reports_a_corrupted_page(tmp_path, offset, length):
    cache = tmp_path / "c.sqlite"
    with open_store(cache) as store:
        store.put_evaluations((EvalKey("fp", "set", f"h{i:05d}", "m1"), {"i": i, "pad": "x" * 200}, None)
                              for i in range(2000))
    app, run = _cli(), CliRunner()
    r = run.invoke(app, ["cache", "check", "--cache", str(cache)])
    assert r.exit_code == 0 and r.stdout.strip() == f"{cache}: OK", r.output

    _corrupt_a_middle_page(cache, offset, length)
    r = run.invoke(app, ["cache", "stats", "--cache", str(cache)])
    assert r.exit_code == 0, r.output  # the damage is served until a read reaches it: hence `cache check`
    for args in (["cache", "check"], ["cache", "check", "--quick"]):
        r = run.invoke(app, [*args, "--cache", str(cache)])
        assert r.exit_code == 1, r.output
        line = r.stdout.strip()
        assert line.startswith(f"{cache}: broken: ") and "\n" not in line, r.output
        if offset:  # damage SQLite can place: the line names the page
            assert "page" in line, line
    # reading the damaged rows through the store is one line too, never a traceback, and says what to run
    r = run.invoke(app, ["cache", "export", str(tmp_path / "e.jsonl"), "--cache", str(cache)])
    assert r.exit_code == 2 and r.stderr.strip().startswith("error:") and "malformed" in r.stderr, r.output
    assert "autotune cache check" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output


def test_cache_check_never_creates_a_cache(tmp_path):
    r = CliRunner().invoke(_cli(), ["cache", "check", "--cache", str(tmp_path / "none.sqlite")])
    assert r.exit_code == 2 and "no cache" in r.stderr, r.output
    assert not (tmp_path / "none.sqlite").exists()


def test_a_damaged_database_under_the_study_recorder_is_one_line(tmp_path):
    from autotune.cache.store import CacheError
    from autotune.search.optuna_record import StudyRecorder

    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 400)
    with pytest.raises(CacheError) as e:
        StudyRecorder(f"sqlite:///{junk}", "s", None, ["mse_ref"])
    msg = str(e.value)
    assert "junk.sqlite" in msg and "not a database" in msg and "\n" not in msg, msg


@pytest.mark.xdist_group("postgres")  # the server of test_cache_postgres.py: its worker
def test_postgres_check_and_two_recorders_of_one_search(gmm, postgres_url):
    """On PostgreSQL: `check` reads every table through; two recorders of the same search (the advisory-lock
    path) add each trial once."""
    import uuid

    from autotune.sampling.named import build
    from autotune.search.optuna_record import StudyRecorder
    from autotune.space.fileformat import dumps
    from search_helpers import search_context

    with open_store(postgres_url) as store:
        store.put_evaluation(EvalKey("fp", "set", "h", "m1"), {"x": 1.0})
        assert store.check() == [] and store.check(quick=True) == []
    from autotune.search.trial import Trial

    space, s = search_context(gmm).space, build("ddim", gmm.noise, 4)
    sid = f"pg-{uuid.uuid4().hex[:8]}"
    a, b = (StudyRecorder(postgres_url, sid, space, ["mse_ref"]) for _ in range(2))
    for n in range(6):
        for rec in (a, b):
            rec.record(Trial(n, s.hash(), 0.5, {"mse_ref": 0.5}, dumps(s), nfe=4, method="m"), s)
    assert sorted(t.user_attrs["trial_number"] for t in a.study.get_trials(deepcopy=False)) == list(range(6))
