"""The search loop and its evaluation pools: in-process, or Ray actors that hold the model.

The loop asks the strategy for a batch, scores it on a pool, tells the values back, records every trial
and the strategy's state in the store after every batch. Re-running the same search continues from the
saved state, and every schedule already scored is answered by the cache, so nothing is evaluated twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from autotune.evaluate.evaluator import Evaluator
from autotune.search.strategy import SearchError, Strategy
from autotune.space.fileformat import dumps
from autotune.space.schedule import Schedule


class Pool(Protocol):
    workers: int

    def map(self, schedules: list[Schedule]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class InProcessPool:
    """Scores candidates one after another in this process (``--workers 0``)."""

    workers = 0

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def map(self, schedules: list[Schedule]) -> list[dict[str, Any]]:
        return [self.evaluator.evaluate(s) for s in schedules]

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


def _build_evaluator(spec: EvaluatorSpec) -> Evaluator:
    from autotune.models.registry import load_model

    store = None
    if spec.cache is not None:
        from autotune.cache.store import open_store

        store = open_store(spec.cache)
    return Evaluator(load_model(spec.model), spec.kind, size=spec.size, seed=spec.seed, store=store,
                     ref_steps=spec.ref_steps)


class RayPool:
    """Ray actors, each holding the model and an Evaluator, scoring chunks of a batch in parallel.

    A worker that dies has its chunk resubmitted to a fresh actor (up to ``retries`` times).
    """

    def __init__(self, spec: EvaluatorSpec, workers: int, address: str | None = None,
                 references: dict[str, Any] | None = None, retries: int = 3) -> None:
        import os

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        try:
            import ray
        except ImportError:
            raise SearchError("Ray is not installed: pip install 'autotune-diffusion[search]', or use --workers 0")
        self.ray = ray
        if not ray.is_initialized():
            try:
                # address "local" starts a private Ray for this run even if another cluster runs on the machine
                ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                         ignore_reinit_error=True, **({} if address else {"num_cpus": max(workers, 1)}))
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"--address {address}: cannot join the Ray cluster" if address else "cannot start a local Ray"
                raise SearchError(f"{where} ({e})") from None
        self.spec = spec
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

            def score(self, docs: list[str]) -> list[dict[str, Any]]:
                from autotune.space.fileformat import loads

                torch.set_num_threads(self.threads)  # a reused worker keeps its first import's thread count
                return [self.evaluator.evaluate(loads(d)) for d in docs]

        self._actor_cls = EvalActor
        self.actors = [self._new_actor() for _ in range(workers)]
        self.restarts = 0

    def _new_actor(self):
        return self._actor_cls.remote(self.spec, self.references)

    def map(self, schedules: list[Schedule]) -> list[dict[str, Any]]:
        chunks = [list(range(i, len(schedules), self.workers)) for i in range(self.workers)]
        chunks = [c for c in chunks if c]
        results: dict[int, dict[str, Any]] = {}
        pending = {i: (self.actors[i].score.remote([dumps(schedules[j]) for j in c]), c, 0)
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
                pending[i] = (self.actors[i].score.remote([dumps(schedules[j]) for j in chunk]), chunk, tries + 1)
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
    best: Schedule
    best_value: float
    true_evaluations: int
    cache_hits: int
    seconds: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False


def search_id(**parts: Any) -> str:
    """A stable id for a search from everything that defines it (so a re-run finds its saved state)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_search(
    strategy: Strategy,
    pool: Pool,
    budget: int,
    *,
    objective: str = "mse_ref",
    batch_size: int = 8,
    store: Any = None,
    sid: str | None = None,
    callback: Callable[[Progress], None] | None = None,
) -> SearchResult:
    """Spend ``budget`` true evaluations (cache hits are free) and return the best schedule found."""
    if budget < 1:
        raise SearchError(f"--budget must be >= 1, got {budget}")
    start = time.perf_counter()
    true_evals = hits = 0
    trials: list[dict[str, Any]] = []
    best: tuple[float, Schedule] | None = None
    resumed = False
    if store is not None and sid is not None:
        saved = store.get_search_state(sid)
        if saved is not None:
            strategy.load_state(saved["strategy"])
            true_evals, hits, trials = saved["true_evaluations"], saved["cache_hits"], saved["trials"]
            resumed = True
    seen_best = [t for t in trials if math.isfinite(t["value"])]
    if seen_best:
        from autotune.space.fileformat import loads

        b = min(seen_best, key=lambda t: t["value"])
        best = (b["value"], loads(b["schedule"]))
    asks = 0
    while true_evals < budget:
        asks += 1
        if asks > 50 * budget:
            break  # the strategy keeps proposing schedules that are all cached: the space is exhausted
        batch = strategy.ask(min(batch_size, max(budget - true_evals, 1)))
        metrics = pool.map(batch)
        for s, m in zip(batch, metrics):
            value = float(m.get(objective, math.inf)) if not m.get("diverged") else math.inf
            strategy.tell(s, value)
            if m.get("cached"):
                hits += 1
            else:
                true_evals += 1
            trials.append({"number": len(trials), "hash": s.hash(), "value": value, "cached": bool(m.get("cached")),
                           "nfe": m.get("nfe"), "schedule": dumps(s)})
            if math.isfinite(value) and (best is None or value < best[0]):
                best = (value, s)
        if store is not None and sid is not None:
            store.put_search_state(sid, {"strategy": strategy.state(), "true_evaluations": true_evals,
                                         "cache_hits": hits, "trials": trials})
        if callback is not None:
            callback(Progress(true_evals, hits, best[0] if best else math.inf, budget,
                              time.perf_counter() - start))
    if best is None:
        raise SearchError("every candidate diverged; no schedule to return")
    return SearchResult(best[1], best[0], true_evals, hits, time.perf_counter() - start, trials, resumed)
