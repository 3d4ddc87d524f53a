"""The search loop and its evaluation pools: in-process, or Ray actors that hold the model.

The loop asks the strategy for a batch, scores it on a pool, tells the objective values back, records every
candidate as a trial in the store (``store.add_trial``: the metrics, objectives and schedule JSON) and, after
every batch, the strategy's state and counters (``store.put_search_state``; no trials in it, so a batch costs
the same I/O however long the search has run). Re-running the same search reads the state and the trials
back and continues; every schedule already scored is answered by the cache, so nothing is evaluated twice.
Trials recorded after the last saved state (a batch cut short by a kill) are dropped and redone from the
cache. With a :class:`~autotune.search.optuna_record.StudyRecorder` every trial also lands in an Optuna study.

Objectives are metric names the evaluator returns (``mse_ref``, ``traj_err``, a model's data metrics such as
``fd``), ``nfe``, or ``latency_ms`` (measured on the evaluating worker, see :mod:`autotune.search.latency`).
One objective: the strategy is told a float; several: a tuple, every one in minimisation form (objectives
where higher is better negated); the result's ``front`` is the Pareto front of the trials.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from autotune.evaluate.evaluator import Evaluator
from autotune.search.latency import LATENCY, LatencySpec, measure_latency
from autotune.search.pareto import direction, pareto_front
from autotune.search.strategy import SearchError, Strategy
from autotune.space.fileformat import dumps, loads
from autotune.space.schedule import Schedule


class Pool(Protocol):
    workers: int

    def map(self, schedules: list[Schedule]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def _score(evaluator: Evaluator, schedule: Schedule, latency: LatencySpec | None) -> dict[str, Any]:
    """The evaluator's metrics, plus ``latency_ms`` measured here when asked for (never cached: per machine)."""
    metrics = evaluator.evaluate(schedule)
    if latency is not None and not metrics.get("diverged"):
        metrics["latency_ms"] = measure_latency(evaluator.model, schedule, evaluator.eval_set, latency)
    return metrics


class InProcessPool:
    """Scores candidates one after another in this process (``--workers 0``); ``latency``: also time them."""

    workers = 0

    def __init__(self, evaluator: Evaluator, latency: LatencySpec | None = None) -> None:
        self.evaluator = evaluator
        self.latency = latency

    def map(self, schedules: list[Schedule]) -> list[dict[str, Any]]:
        return [_score(self.evaluator, s, self.latency) for s in schedules]

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class EvaluatorSpec:
    """Everything a worker needs to build the same Evaluator as the driver (all plain data)."""

    model: str
    kind: str
    size: int
    seed: int
    cache: str | None
    ref_steps: int
    threads: int = 1
    ratios: str | None = None  # "fit" or "cpr:FILE": candidates scored with DC ratios (search/dc_fit.py)


def _build_evaluator(spec: EvaluatorSpec) -> Evaluator:
    from autotune.models.registry import load_model

    store = None
    if spec.cache is not None:
        from autotune.cache.store import open_store

        store = open_store(spec.cache)
    evaluator = Evaluator(load_model(spec.model), spec.kind, size=spec.size, seed=spec.seed, store=store,
                          ref_steps=spec.ref_steps)
    if spec.ratios is not None:
        from autotune.search.dc_fit import attach_ratio_source

        attach_ratio_source(evaluator, spec.ratios)
    return evaluator


class RayPool:
    """Ray actors, each holding the model and an Evaluator, scoring chunks of a batch in parallel.

    A worker that dies has its chunk resubmitted to a fresh actor (up to ``retries`` times).
    """

    def __init__(self, spec: EvaluatorSpec, workers: int, address: str | None = None,
                 references: dict[str, Any] | None = None, retries: int = 3,
                 latency: LatencySpec | None = None) -> None:
        import os

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        try:
            import ray
        except ImportError:
            raise SearchError("Ray is not installed: pip install 'autotune-diffusion[search]', or use --workers 0")
        self.ray = ray
        if not ray.is_initialized():
            # A private Ray runs without auth, so it must listen on loopback only. Ray binds its servers to the
            # node IP, which is 127.0.0.1 only with its cluster mode off (ray_constants.ENABLE_RAY_CLUSTER, from
            # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import); ray.init has no public option for it, and rewrites
            # _node_ip_address="127.0.0.1" to the outward address. Off while our Ray starts, then restored so a
            # later --address join is unaffected (tests/test_security.py lists the sockets it opens).
            from ray._private import ray_constants

            cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
            ray_constants.ENABLE_RAY_CLUSTER = bool(address) and cluster_mode
            try:
                # address "local" starts a private Ray for this run even if another cluster runs on the machine
                ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                         ignore_reinit_error=True, **({} if address else {"num_cpus": max(workers, 1)}))
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"--address {address}: cannot join the Ray cluster" if address else "cannot start a local Ray"
                raise SearchError(f"{where} ({e})") from None
            finally:
                ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        self.spec = spec
        self.latency = latency
        self.workers = workers
        self.retries = retries
        self.references = ray.put(references or {})

        @ray.remote(num_cpus=1, max_restarts=0)
        class EvalActor:
            def __init__(self, spec: EvaluatorSpec, references: dict[str, Any]) -> None:
                self.threads = spec.threads
                torch.set_num_threads(spec.threads)
                self.evaluator = _build_evaluator(spec)
                self.evaluator.references.update(references)

            def pid(self) -> int:
                return os.getpid()

            def score(self, docs: list[str], latency: LatencySpec | None) -> list[dict[str, Any]]:
                torch.set_num_threads(self.threads)  # a reused worker keeps its first import's thread count
                return [_score(self.evaluator, loads(d), latency) for d in docs]

        self._actor_cls = EvalActor
        self.actors = [self._new_actor() for _ in range(workers)]
        self.restarts = 0

    def _new_actor(self):
        return self._actor_cls.remote(self.spec, self.references)

    def map(self, schedules: list[Schedule]) -> list[dict[str, Any]]:
        chunks = [list(range(i, len(schedules), self.workers)) for i in range(self.workers)]
        chunks = [c for c in chunks if c]
        results: dict[int, dict[str, Any]] = {}
        pending = {i: (self.actors[i].score.remote([dumps(schedules[j]) for j in c], self.latency), c, 0)
                   for i, c in enumerate(chunks)}
        while pending:
            refs = {ref: i for i, (ref, _, _) in pending.items()}
            done, _ = self.ray.wait(list(refs), num_returns=1)
            i = refs[done[0]]
            ref, chunk, tries = pending.pop(i)
            try:
                for j, m in zip(chunk, self.ray.get(ref)):
                    results[j] = m
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError):
                if tries >= self.retries:
                    raise SearchError(f"a Ray worker died {tries + 1} times on the same candidates") from None
                self.restarts += 1
                self.actors[i] = self._new_actor()
                pending[i] = (self.actors[i].score.remote([dumps(schedules[j]) for j in chunk], self.latency),
                              chunk, tries + 1)
        return [results[j] for j in range(len(schedules))]

    def worker_pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


@dataclass
class Progress:
    true_evaluations: int
    cache_hits: int
    best_value: float
    budget: int
    elapsed: float


@dataclass
class SearchResult:
    """The best schedule by the first objective (among the feasible ones, with ``limits``), the counts, every
    trial (dicts: number, hash, value, objectives, cached, nfe, schedule, ...) and, for several objectives,
    the Pareto front (trials, one per schedule)."""

    best: Schedule
    best_value: float
    true_evaluations: int
    cache_hits: int
    seconds: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False
    front: list[dict[str, Any]] = field(default_factory=list)
    best_trial: dict[str, Any] = field(default_factory=dict)


def search_id(**parts: Any) -> str:
    """A stable id for a search from everything that defines it (so a re-run finds its saved state)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


STATE_VERSION = 2  # 1 kept the trial list inside the state; 2 keeps a count (the trials are rows of their own)


def objective_values(metrics: dict[str, Any], objectives: tuple[str, ...]) -> dict[str, float]:
    """The objectives of one scored candidate (all inf when it diverged)."""
    if metrics.get("diverged"):
        return {o: math.inf for o in objectives}
    out = {}
    for o in objectives:
        if o not in metrics:
            known = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            hint = " (the pool times candidates only when given a LatencySpec)" if o == LATENCY else ""
            raise SearchError(f"objective {o!r}: the evaluation returned no such metric (one of "
                              f"{', '.join(known)}){hint}")
        out[o] = float(metrics[o])
    return out


def _minimised(objectives: dict[str, float]) -> tuple[float, ...]:
    """The objectives as values to minimise (higher-is-better ones negated; non-finite as +inf)."""
    return tuple(math.inf if not math.isfinite(v) else (-v if direction(o) == "maximize" else v)
                 for o, v in objectives.items())


def _feasible(trial: dict[str, Any], limits: Mapping[str, float]) -> bool:
    return all(trial["objectives"].get(k, math.inf) <= v for k, v in limits.items())


def run_search(
    strategy: Strategy,
    pool: Pool,
    budget: int,
    *,
    objectives: Sequence[str] = ("mse_ref",),
    limits: Mapping[str, float] | None = None,
    batch_size: int = 8,
    store: Any = None,
    sid: str | None = None,
    callback: Callable[[Progress], None] | None = None,
    recorder: Any = None,
) -> SearchResult:
    """Spend ``budget`` true evaluations (cache hits are free) and return the best schedule found.

    Args:
        strategy: an ask/tell strategy built for these objectives.
        pool: scores candidates (InProcessPool or RayPool; with latency measurement for ``latency_ms``).
        budget: true evaluations to spend.
        objectives: names of the objectives; the first one picks ``best``.
        limits: upper bounds on objectives (e.g. ``{"latency_ms": 12.0}``): ``best`` is the best feasible trial.
        batch_size: candidates asked per batch.
        store, sid: the cache and the search's id, for recording trials and resuming.
        callback: called with a :class:`Progress` after every batch.
        recorder: a StudyRecorder (or anything with ``record(trial, schedule)``), called for every trial.
    """
    if budget < 1:
        raise SearchError(f"--budget must be >= 1, got {budget}")
    objectives = tuple(objectives)
    limits = dict(limits or {})
    start = time.perf_counter()
    true_evals = hits = 0
    elapsed0 = 0.0
    trials: list[dict[str, Any]] = []
    resumed = False
    if store is not None and sid is not None:
        saved = store.get_search_state(sid)
        if saved is not None:
            strategy.load_state(saved["strategy"])
            true_evals, hits = saved["true_evaluations"], saved["cache_hits"]
            trials = _saved_trials(store, sid, saved)
            elapsed0 = float(saved.get("seconds", 0.0))
            resumed = True
    best = _best(trials, limits)

    def record(s: Schedule, m: dict[str, Any]) -> None:
        nonlocal best
        objs = objective_values(m, objectives)
        value = objs[objectives[0]]
        trial = {"number": len(trials), "hash": s.hash(), "value": value, "objectives": objs,
                 "mse_ref": m.get("mse_ref", math.inf), "nfe": m.get("nfe", s.nfe), "cached": bool(m.get("cached")),
                 "diverged": bool(m.get("diverged")), "method": strategy.name,
                 "elapsed": elapsed0 + time.perf_counter() - start,
                 # with fitted / CPR ratios (``--ratios``) the schedule scored is the candidate with its ratios
                 "schedule": m.get("evaluated_schedule") or dumps(s)}
        if LATENCY in m:
            trial[LATENCY] = m[LATENCY]
        if limits:
            trial["feasible"] = _feasible(trial, limits)
        trials.append(trial)
        if store is not None and sid is not None:
            store.add_trial(sid, trial["number"], trial["hash"], {k: v for k, v in trial.items()
                                                                   if k not in ("number", "hash")})
        if recorder is not None:
            recorder.record(trial, s)
        best = _better(best, trial, limits)

    asks = 0
    while true_evals < budget:
        asks += 1
        if asks > 50 * budget:
            break  # the strategy keeps proposing schedules that are all cached: the space is exhausted
        batch = strategy.ask(min(batch_size, max(budget - true_evals, 1)))
        metrics = pool.map(batch)
        for s, m in zip(batch, metrics):
            record(s, m)
            objs = trials[-1]["objectives"]
            told = _minimised(objs)
            strategy.tell(s, told if len(objectives) > 1 else told[0])
            if m.get("cached"):
                hits += 1
            else:
                true_evals += 1
        if store is not None and sid is not None:
            store.put_search_state(sid, {"version": STATE_VERSION, "strategy": strategy.state(),
                                         "true_evaluations": true_evals, "cache_hits": hits, "trials": len(trials),
                                         "seconds": elapsed0 + time.perf_counter() - start})
        if callback is not None:
            callback(Progress(true_evals, hits, best["value"] if best else math.inf, budget,
                              time.perf_counter() - start))
    if best is None:
        raise SearchError("every candidate diverged" + (" or broke a limit" if limits else "")
                          + "; no schedule to return")
    front = _front(trials, objectives) if len(objectives) > 1 else []
    return SearchResult(loads(best["schedule"]), best["value"], true_evals, hits,
                        elapsed0 + time.perf_counter() - start, trials, resumed, front, best)


def _saved_trials(store: Any, sid: str, saved: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials the saved state covers, read back from the store (later ones, from a cut batch, dropped)."""
    count = saved.get("trials", 0)
    if isinstance(count, list):  # a version-1 state: its trials move into the store's trial rows
        for t in count:
            store.add_trial(sid, t["number"], t["hash"], {k: v for k, v in t.items() if k not in ("number", "hash")})
        count = len(count)
    store.delete_trials(sid, count)
    rows = store.trials(sid)
    if [r["trial_number"] for r in rows] != list(range(count)):
        raise SearchError(f"search {sid}: the saved state covers {count} trials, the cache holds "
                          f"{len(rows)}; clear it with `autotune cache clear search_states` or change --seed")
    out = []
    for r in rows:
        t = {"number": r["trial_number"], "hash": r["schedule_hash"], **r["metrics"]}
        t.setdefault("objectives", {"value": t["value"]})
        out.append(t)
    return out


def _key(trial: dict[str, Any]) -> float:
    """The first objective of a trial, to minimise."""
    name, value = next(iter(trial["objectives"].items()))
    return _minimised({name: value})[0]


def _better(best: dict[str, Any] | None, trial: dict[str, Any], limits: Mapping[str, float]) -> dict[str, Any] | None:
    if not math.isfinite(_key(trial)) or (limits and not _feasible(trial, limits)):
        return best
    return trial if best is None or _key(trial) < _key(best) else best


def _best(trials: list[dict[str, Any]], limits: Mapping[str, float]) -> dict[str, Any] | None:
    best = None
    for t in trials:
        best = _better(best, t, limits)
    return best


def _front(trials: list[dict[str, Any]], objectives: tuple[str, ...]) -> list[dict[str, Any]]:
    """The non-dominated finite trials, one per schedule, ordered by the first objective."""
    unique: dict[str, dict[str, Any]] = {}
    for t in trials:
        if all(math.isfinite(v) for v in t["objectives"].values()):
            unique.setdefault(t["hash"], t)
    pool = list(unique.values())
    front = [pool[i] for i in pareto_front([t["objectives"] for t in pool], objectives)]
    return sorted(front, key=_key)
