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
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import torch

from autotune.evaluate.evaluator import Evaluator
from autotune.evaluate.ids import PER_SAMPLE
from autotune.evaluate.metrics import Screen, decode_errors, encode_errors
from autotune.search.latency import LATENCY, LatencySpec, measure_latency
from autotune.search.pareto import direction, pareto_front
from autotune.search.strategy import SearchError, Strategy
from autotune.search.trial import Trial
from autotune.space.fileformat import dumps, loads
from autotune.space.schedule import Schedule

if TYPE_CHECKING:
    from autotune.search.gradient import ErrorSum


class Pool(Protocol):
    workers: int

    def map(self, schedules: list[Schedule], latency: LatencySpec | None = None,
            screen: Screen | None = None) -> list[dict[str, Any]]:
        """Score the schedules (and time them with ``latency``, or the pool's own spec; ``screen``: candidates may
        stop early, evaluate/metrics.py's Screen)."""

    def close(self) -> None: ...


def _score(evaluator: Evaluator, schedule: Schedule, latency: LatencySpec | None,
           screen: Screen | None = None) -> dict[str, Any]:
    """The evaluator's metrics, plus ``latency_ms`` measured here when asked for (never cached: per machine)."""
    metrics = evaluator.evaluate(schedule, screen)
    if latency is not None and not metrics.get("diverged"):
        metrics["latency_ms"] = measure_latency(evaluator.model, schedule, evaluator.eval_set, latency)
    return metrics


class InProcessPool:
    """Scores candidates one after another in this process (``--workers 0``); ``latency``: also time them."""

    workers = 0

    def __init__(self, evaluator: Evaluator, latency: LatencySpec | None = None) -> None:
        self.evaluator = evaluator
        self.latency = latency

    def map(self, schedules: list[Schedule], latency: LatencySpec | None = None,
            screen: Screen | None = None) -> list[dict[str, Any]]:
        return [_score(self.evaluator, s, latency or self.latency, screen) for s in schedules]

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
    ref_steps: int | None  # None: by the NFE of each schedule scored (the Evaluator's default)
    threads: int = 1
    ratios: str | None = None  # "fit" or "cpr:FILE": candidates scored with DC ratios (search/dc_fit.py)
    prompts: tuple[str, ...] = ()  # a text-to-image model's evaluation prompts


def _build_evaluator(spec: EvaluatorSpec) -> Evaluator:
    from autotune.models.registry import load_model

    store = None
    if spec.cache is not None:
        from autotune.cache.store import open_store

        store = open_store(spec.cache)
    evaluator = Evaluator(load_model(spec.model), spec.kind, size=spec.size, seed=spec.seed, store=store,
                          ref_steps=spec.ref_steps, prompts=spec.prompts)
    if spec.ratios is not None:
        from autotune.search.dc_fit import attach_ratio_source

        attach_ratio_source(evaluator, spec.ratios)
    return evaluator


SPLIT_MIN = 64  # RayPool.sample_split: fewer samples a slice are not worth the transfer
FIRST_CANDIDATE_TIMEOUT_S = 600.0  # before any candidate has been timed (the first may also warm the worker up)
MIN_CANDIDATE_TIMEOUT_S = 60.0  # never less, however fast candidates have been (a busy machine has slow moments)
CANDIDATE_TIMEOUT_FACTOR = 20.0  # the default limit: this many times the slowest candidate measured so far
STARTUP_TIMEOUT_S = 300.0  # no worker at all after this long: the cluster cannot serve the search
WAIT_NOTICE_S = 10.0  # still no worker after this long: say what the search is waiting for


def candidate_timeout(configured: float | None, slowest: float | None) -> float:
    """Seconds one candidate may take on a worker before the worker counts as stalled: ``configured`` when
    given; else CANDIDATE_TIMEOUT_FACTOR times the slowest candidate measured so far (``slowest``), at least
    MIN_CANDIDATE_TIMEOUT_S; FIRST_CANDIDATE_TIMEOUT_S while nothing has been measured."""
    if configured is not None:
        return configured
    if slowest is None:
        return FIRST_CANDIDATE_TIMEOUT_S
    return max(MIN_CANDIDATE_TIMEOUT_S, CANDIDATE_TIMEOUT_FACTOR * slowest)


@dataclass
class _Worker:
    """One actor: asked for at ``since``; ``pid`` is set once it has started (model loaded, ready to score)."""

    actor: Any
    since: float
    pid: int | None = None


class RayPool:
    """Ray actors, each holding the model and an Evaluator, scoring a batch one candidate at a time each.

    The pool starts on the workers the cluster gives it: it waits for the first (saying so after
    WAIT_NOTICE_S; a SearchError after ``startup_timeout_s``), briefly for the rest, then scores on those that
    started while the others join as the cluster frees CPUs for them. A worker that dies, or that gives no
    result within :func:`candidate_timeout` (``timeout_s``: seconds per candidate, None to derive it from the
    measured evaluation times) is killed and replaced, and its candidate retried on another worker, up to
    ``retries`` times per candidate. ``notify`` receives one line for each thing the user should know (the
    pool itself never prints).
    """

    def __init__(self, spec: EvaluatorSpec, workers: int, address: str | None = None,
                 references: dict[str, Any] | None = None, retries: int = 3,
                 latency: LatencySpec | None = None, *, timeout_s: float | None = None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S, notify: Callable[[str], None] | None = None) -> None:
        import os

        if workers < 1:
            raise SearchError(f"a Ray pool needs at least 1 worker, got {workers} (--workers 0 scores in-process)")
        if timeout_s is not None and timeout_s <= 0:
            raise SearchError(f"the timeout per candidate must be > 0 seconds, got {timeout_s:g}")

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
                # address "local" starts a private Ray for this run even if another cluster runs on the machine.
                # Its workers run at this process's priority: Ray's default niceness 15 starved them whenever
                # anything else ran (the README's digits search loop, three busy processes beside it: 25 min 20 s,
                # 45 s on an idle machine), while the driver, at 0, only waits for them. worker_niceness is an
                # increment on the niceness the workers inherit from this process: 0 keeps them at ours (measured:
                # a driver under `nice -n 5` given os.nice(0) put its workers at 10). POSIX only, as os.nice.
                niceness = {"_system_config": {"worker_niceness": 0}} if hasattr(os, "nice") else {}
                ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                         ignore_reinit_error=True, **({} if address else {"num_cpus": max(workers, 1), **niceness}))
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"--address {address}: cannot join the Ray cluster" if address else "cannot start a local Ray"
                raise SearchError(f"{where} ({e})") from None
            finally:
                ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        self.spec = spec
        self.latency = latency
        self.workers = workers
        self.retries = retries
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.notify = notify or (lambda _line: None)
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

            def score(self, docs: list[str], latency: LatencySpec | None, screen: Screen | None = None
                      ) -> list[dict[str, Any]]:
                torch.set_num_threads(self.threads)  # a reused worker keeps its first import's thread count
                return [_score(self.evaluator, loads(d), latency, screen) for d in docs]

            def fingerprint(self) -> str:
                return self.evaluator.fingerprint

            def sample(self, doc: str, noise: torch.Tensor, cond: Any, start: torch.Tensor | None,
                       options: dict[str, bool]) -> Any:
                from autotune.sampling.executor import sample_in_chunks

                torch.set_num_threads(self.threads)
                return sample_in_chunks(self.evaluator.model, loads(doc), noise, cond, start=start, **options)

            def error_sum(self, doc: str, data: tuple[torch.Tensor, Any, torch.Tensor], power: int,
                          values: dict[str, torch.Tensor | None]) -> tuple[float, dict[str, torch.Tensor]]:
                from autotune.search.gradient import error_sum

                torch.set_num_threads(self.threads)
                noise, labels, target = data
                return error_sum(self.evaluator.model, loads(doc), noise, labels, target, power, values)

        self._actor_cls = EvalActor
        self._ready: list[_Worker] = []  # started: scoring, or idle between batches
        self._starting: dict[Any, _Worker] = {}  # the ref of its pid() call -> the worker
        self._slowest: float | None = None  # seconds of the slowest candidate measured so far
        self._start_failures = 0
        self.restarts = 0
        for _ in range(workers):
            self._start_worker()
        try:
            self._await_first_workers()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------ workers

    def _start_worker(self) -> None:
        actor = self._actor_cls.remote(self.spec, self.references)
        self._starting[actor.pid.remote()] = _Worker(actor, time.monotonic())

    def _cpus(self) -> str:
        """How many CPUs the cluster has free, of how many (what a worker waits for)."""
        free = self.ray.available_resources().get("CPU", 0.0)
        total = self.ray.cluster_resources().get("CPU", 0.0)
        return f"the cluster has {free:g} of {total:g} CPUs free"

    def _started(self, ref: Any) -> _Worker | None:
        """Take a finished pid() call of a starting worker: the worker, now ready; None when it failed to start
        (a replacement is asked for; SearchError after ``retries`` failures in a row)."""
        w = self._starting.pop(ref)
        try:
            w.pid = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self._start_failures += 1
            if self._start_failures > self.retries:
                last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise SearchError(f"Ray workers failed to start {self._start_failures} times in a row ({last})") \
                    from None
            self._start_worker()
            return None
        self._start_failures = 0
        self._ready.append(w)
        return w

    def _wait_for_a_worker(self, since: float) -> None:
        """Block until a starting worker is ready (or failed): a line after WAIT_NOTICE_S, a SearchError after
        ``startup_timeout_s`` counted from ``since``."""
        noticed = False
        while True:
            waited = time.monotonic() - since
            if waited >= self.startup_timeout_s:
                raise SearchError(f"no Ray worker started within {self.startup_timeout_s:g} s ({self._cpus()}, a "
                                  "worker needs 1; other searches may hold them): retry later, ask fewer --workers, "
                                  "or use --workers 0")
            until = self.startup_timeout_s if noticed else min(WAIT_NOTICE_S, self.startup_timeout_s)
            done, _ = self.ray.wait(list(self._starting), num_returns=1, timeout=max(0.0, until - waited))
            if done:
                self._started(done[0])
                return
            if not noticed and time.monotonic() - since >= WAIT_NOTICE_S:
                noticed = True
                self.notify(f"waiting up to {self.startup_timeout_s:g} s for a Ray worker: {self._cpus()} "
                            "(a worker needs 1)")

    def _await_first_workers(self) -> None:
        """Wait for the first worker, then as long again (at least 5 s) for the others; say when some are still
        waiting for the cluster (they join the search when they start)."""
        t0 = time.monotonic()
        while not self._ready:
            self._wait_for_a_worker(t0)
        deadline = time.monotonic() + max(5.0, time.monotonic() - t0)
        while self._starting:
            done, _ = self.ray.wait(list(self._starting), num_returns=1,
                                    timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                break
            self._started(done[0])
        if self._starting:
            self.notify(f"{len(self._ready)} of {self.workers} Ray workers started; the search runs on them, "
                        f"waiting for CPUs for the other {len(self._starting)} ({self._cpus()}), which join as "
                        "they start")

    def _drop(self, w: _Worker) -> None:
        """Kill a worker that died or stalled and ask for a replacement."""
        self.restarts += 1
        self._ready.remove(w)
        self.ray.kill(w.actor, no_restart=True)
        self._start_worker()

    # ---------------------------------------------------------------------------------------- map

    def map(self, schedules: list[Schedule], latency: LatencySpec | None = None,
            screen: Screen | None = None) -> list[dict[str, Any]]:
        timing = latency or self.latency
        todo = list(range(len(schedules)))  # candidates not yet handed out (retried ones go first)
        tries = [0] * len(schedules)
        results: dict[int, dict[str, Any]] = {}
        busy: dict[Any, tuple[_Worker, int, float]] = {}  # ref of a score() call -> (worker, candidate, when sent)
        idle = list(self._ready)
        no_worker_since: float | None = None

        def retry(j: int, why: str) -> None:
            tries[j] += 1
            if tries[j] > self.retries:
                raise SearchError(f"candidate {j + 1} of the batch: {why} ({tries[j]} times); giving up")
            todo.insert(0, j)

        while len(results) < len(schedules):
            while todo and idle:
                w, j = idle.pop(), todo.pop(0)
                busy[w.actor.score.remote([dumps(schedules[j])], timing, screen)] = (w, j, time.monotonic())
            if not busy:  # every worker died or stalled and their replacements have not started yet
                no_worker_since = no_worker_since or time.monotonic()
                self._wait_for_a_worker(no_worker_since)
                idle = list(self._ready)
                continue
            no_worker_since = None
            limit = candidate_timeout(self.timeout_s, self._slowest)
            first_deadline = min(sent for _, _, sent in busy.values()) + limit
            done, _ = self.ray.wait(list(busy) + list(self._starting), num_returns=1,
                                    timeout=max(0.0, first_deadline - time.monotonic()))
            now = time.monotonic()
            if done and done[0] in self._starting:  # a worker joined (a late start, or a replacement)
                w = self._started(done[0])
                if w is not None:
                    idle.append(w)
            elif done:
                w, j, sent = busy.pop(done[0])
                try:
                    results[j] = self.ray.get(done[0])[0]
                except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError):
                    self._drop(w)
                    retry(j, "its Ray worker died")
                    self.notify(f"Ray worker pid {w.pid} died; its candidate is retried on another worker")
                    continue
                self._slowest = max(self._slowest or 0.0, now - sent)
                idle.append(w)
            for ref, (w, j, sent) in list(busy.items()):
                if now - sent >= limit:  # alive but silent (stopped, deadlocked, swapping): kill and retry
                    del busy[ref]
                    self._drop(w)
                    retry(j, f"its Ray worker gave no result within {limit:g} s")
                    self.notify(f"Ray worker pid {w.pid} gave no result within {limit:g} s for one candidate; "
                                "killed it, the candidate is retried on another worker")
        return [results[j] for j in range(len(schedules))]

    def model_fingerprint(self) -> str | None:
        """The fingerprint of the model the workers hold (None: no worker has started)."""
        if not self._ready:
            return None
        return self.ray.get(self._ready[0].actor.fingerprint.remote())

    def _slices(self, size: int) -> list[slice]:
        """``size`` samples in one slice per ready worker, none under SPLIT_MIN (one slice: not worth splitting)."""
        count = max(1, min(len(self._ready), size // SPLIT_MIN))
        edges = [round(i * size / count) for i in range(count + 1)]
        return [slice(edges[i], edges[i + 1]) for i in range(count)]

    def _gather(self, calls: list[tuple[slice, Callable[[_Worker], Any]]], here: Callable[[slice], Any],
                what: str, arrived: Callable[[Any], None] | None = None) -> list[Any]:
        """Each slice's result, in order: ``call(worker)`` (an actor method call) on a ready worker, or
        ``here(slice)`` when there are fewer ready workers than slices, or when its worker died or gave nothing
        within FIRST_CANDIDATE_TIMEOUT_S (replaced, said through ``notify``). ``arrived`` hears each result."""
        results: list[Any] = [None] * len(calls)
        pending = {call(w): (i, w) for i, ((_, call), w) in enumerate(zip(calls, list(self._ready)))}
        local = list(range(len(pending), len(calls)))  # no ready worker for these
        deadline = time.monotonic() + FIRST_CANDIDATE_TIMEOUT_S
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:  # stalled: their slices run here, the workers are replaced
                for ref, (i, w) in list(pending.items()):
                    del pending[ref]
                    self._drop(w)
                    self.notify(f"Ray worker pid {w.pid} gave no {what} within {FIRST_CANDIDATE_TIMEOUT_S:g} s; "
                                "computing it here")
                    local.append(i)
                break
            i, w = pending.pop(done[0])
            try:
                results[i] = self.ray.get(done[0])
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError):
                self._drop(w)
                self.notify(f"Ray worker pid {w.pid} died; computing its {what} here")
                local.append(i)
                continue
            if arrived is not None:
                arrived(results[i])
        for i in local:
            results[i] = here(calls[i][0])
            if arrived is not None:
                arrived(results[i])
        return results

    def sample_split(self, model: Any, schedule: Schedule, noise: torch.Tensor, cond: Any = None, *,
                     start: torch.Tensor | None = None, generator: Any = None, callback: Callable | None = None,
                     **options: Any) -> Any:
        """``sample_in_chunks``' work split into one slice per worker, the results joined (an Evaluator's
        ``sampler``: the held-out sets' references and scores run on the workers the search leaves idle). The
        workers' model stands in for ``model``: attach this only to an Evaluator of the same model
        (:meth:`model_fingerprint`). Run here instead: a stochastic schedule (its draws span the whole batch),
        fewer than two workers or SPLIT_MIN samples a slice, options other than keep_states / check_finite, and a
        slice whose worker died or gave nothing within FIRST_CANDIDATE_TIMEOUT_S (said through ``notify``).
        ``callback`` hears each slice's steps when the slice comes back (with its final samples)."""
        from autotune.sampling.executor import join_results, sample_in_chunks

        def here(part: slice, hears: Callable | None = None) -> Any:
            return sample_in_chunks(model, schedule, noise[part], None if cond is None else cond[part],
                                    start=None if start is None else start[part], generator=generator,
                                    callback=hears, **options)

        parts = self._slices(noise.shape[0])
        if (generator is not None or schedule.stochastic or len(parts) < 2
                or set(options) - {"keep_states", "check_finite"}):
            return here(slice(None), callback)
        doc = dumps(schedule)

        def on(part: slice) -> Callable[[_Worker], Any]:
            return lambda w: w.actor.sample.remote(doc, noise[part], None if cond is None else cond[part],
                                                   None if start is None else start[part], options)

        def arrived(result: Any) -> None:
            for k in range(len(schedule.steps)):
                callback(k, result.sample)

        return join_results(self._gather([(p, on(p)) for p in parts], here, "slice",
                                         arrived if callback is not None else None))

    def gradient_split(self, model: Any, schedule: Schedule, noise: torch.Tensor, labels: Any,
                       target: torch.Tensor, power: int) -> ErrorSum | None:
        """The refinement's loss (search/gradient.py's ``ErrorSum``) summed over one slice of the noises per
        worker (data-parallel: each worker runs the differentiable executor on its slice, the driver adds the
        sums and gradients up); None (compute it here) with fewer than two workers or SPLIT_MIN samples a slice.
        The slices travel to the object store once; the workers' model stands in for ``model``, as in
        :meth:`sample_split`."""
        from autotune.search.gradient import error_sum

        parts = self._slices(noise.shape[0])
        if len(parts) < 2:
            return None
        doc = dumps(schedule)
        data = [self.ray.put((noise[p], None if labels is None else labels[p], target[p])) for p in parts]

        def errors(values: dict[str, torch.Tensor | None]) -> tuple[float, dict[str, torch.Tensor]]:
            def here(part: slice) -> Any:
                return error_sum(model, schedule, noise[part], None if labels is None else labels[part],
                                 target[part], power, values)

            def on(i: int) -> Callable[[_Worker], Any]:
                return lambda w: w.actor.error_sum.remote(doc, data[i], power, values)

            results = self._gather([(p, on(i)) for i, p in enumerate(parts)], here, "gradient")
            return (math.fsum(total for total, _ in results),
                    {k: sum(grads[k] for _, grads in results) for k in results[0][1]})
        return errors

    def worker_pids(self) -> list[int]:
        """Process ids of the workers that have started."""
        return [w.pid for w in self._ready]

    def close(self) -> None:
        for w in self._ready + list(self._starting.values()):
            self.ray.kill(w.actor, no_restart=True)
        self._ready, self._starting = [], {}


@dataclass
class Progress:
    true_evaluations: int
    cache_hits: int
    best_value: float
    budget: int
    elapsed: float
    screened: int = 0  # of the true evaluations, those the screen stopped early
    spent: float = 0.0  # the budget used: true_evaluations, less what partial scores (s3-mf) saved


# Multi-fidelity scoring in the search loop (successive halving's first rung, Optuna's pruners): a candidate first
# samples SCREEN_SAMPLES of the search set's noises and stops there when its mean error on them is more than
# SCREEN_FACTOR times the best trial's on the same noises; the strategy is told the paired estimate (its partial
# mean x best mean / best partial mean). On the README's digits NFE 5 search (s3, 96 evaluations) 43 candidates
# were over 3x the best so far and 58 over 2x: at 3x they cost a quarter of an evaluation each.
SCREEN_SAMPLES = 32
SCREEN_FACTOR = 3.0


@dataclass(frozen=True)
class Screening:
    """The search loop's screen: ``samples`` noises first, stop at ``factor`` x the best trial's mean on them."""

    samples: int = SCREEN_SAMPLES
    factor: float = SCREEN_FACTOR

    def __post_init__(self) -> None:
        if self.samples < 1 or not self.factor > 1.0:
            raise ValueError(f"Screening: expected samples >= 1 and a factor > 1, got {self}")

    def screen(self, best_value: float, best_errors: Any) -> Screen | None:
        """The screen for the next batch, from the best trial's whole-set mean and its first errors (None: none
        yet, or a best too good to scale by)."""
        if best_errors is None or not math.isfinite(best_value):
            return None
        partial = float(best_errors[: self.samples].mean())
        if not partial > 0.0 or best_value <= 0.0:
            return None
        return Screen(self.samples, self.factor * partial, scale=best_value / partial)


def partial_samples(strategy: Strategy) -> int | None:
    """The noises the strategy wants its last-asked batch scored on (None: the whole set; strategy.py's
    ``batch_samples``)."""
    ask = getattr(strategy, "batch_samples", None)
    return None if ask is None else ask()


def partial_screen(samples: int, best_value: float | None, best_errors: Any) -> Screen:
    """A screen that stops every candidate after ``samples`` noises (a strategy's low-fidelity score): the value told
    is the paired estimate of the whole-set mean (scaled by the best trial's whole-set mean over its mean on the same
    noises), or the partial mean itself before there is a best to scale by."""
    scale = 1.0
    if best_errors is not None and len(best_errors) >= samples and best_value is not None \
            and math.isfinite(best_value) and best_value > 0:
        head = float(best_errors[:samples].mean())
        scale = best_value / head if head > 0 else 1.0
    return Screen(samples, limit=PARTIAL_LIMIT, scale=scale)


PARTIAL_LIMIT = 1e-300  # a screen limit every finite positive error mean exceeds: the candidate always stops


@dataclass
class SearchResult:
    """The best schedule by the first objective (among the feasible ones, with ``limits``), the counts, every
    trial (:class:`~autotune.search.trial.Trial`) and, for several objectives, the Pareto front (trials, one
    per schedule)."""

    best: Schedule
    best_value: float
    true_evaluations: int
    cache_hits: int
    seconds: float
    trials: list[Trial] = field(default_factory=list)
    resumed: bool = False
    front: list[Trial] = field(default_factory=list)
    best_trial: Trial | None = None
    screened: int = 0  # true evaluations the screen stopped early (each sampled only the screen's first noises)
    spent: float = 0.0  # the budget used: true_evaluations, less what partial scores (s3-mf) saved


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


def _feasible(objectives: Mapping[str, float], limits: Mapping[str, float]) -> bool:
    return all(objectives.get(k, math.inf) <= v for k, v in limits.items())


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
    latency: LatencySpec | None = None,
    screening: Screening | None = None,
    set_size: int | None = None,
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
        recorder: a StudyRecorder (or anything with ``record(trial, schedule)``), called for every trial; when the
            search resumes, its ``record_missing`` (if it has one) is offered the saved trials.
        latency: time every candidate with this spec (stage 2), whatever the pool was built with.
        screening: stop hopeless candidates early (:class:`Screening`; a plain ``mse_ref`` search only). A
            screened candidate counts as a true evaluation; its trial says ``screened``.
        set_size: the search set's size; needed by a strategy that asks for partial scores (``batch_samples``):
            such a batch is scored on its first noises only and each costs that share of an evaluation (its
            trial's ``cost``), so the budget counts whole-set evaluations. A trial scored in part is never the best.
    """
    if budget < 1:
        raise SearchError(f"--budget must be >= 1, got {budget}")
    objectives = tuple(objectives)
    limits = dict(limits or {})
    if screening is not None and (objectives != ("mse_ref",) or limits or latency is not None):
        raise ValueError("screening applies to a search of mse_ref alone, without limits or latency")
    if getattr(strategy, "partial_scores", False) and (objectives != ("mse_ref",) or limits or latency is not None
                                                        or not set_size):
        raise SearchError(f"--method {strategy.name} scores candidates on part of the search set: it searches "
                          "mse_ref alone, without limits or latency")
    start = time.perf_counter()
    true_evals = hits = screened = 0
    spent = 0.0  # the budget used: 1 a candidate, or its share of the set when the strategy asked a partial score
    elapsed0 = 0.0
    trials: list[Trial] = []
    resumed = False
    best_errors = None  # the best trial's per-sample errors on the screen's noises
    if store is not None and sid is not None:
        saved = store.get_search_state(sid)
        if saved is not None:
            strategy.load_state(saved["strategy"])
            true_evals, hits, screened = saved["true_evaluations"], saved["cache_hits"], saved.get("screened", 0)
            spent = float(saved.get("spent", true_evals))
            trials = _saved_trials(store, sid, saved)
            elapsed0 = float(saved.get("seconds", 0.0))
            if saved.get("screen_errors"):
                best_errors = decode_errors(saved["screen_errors"])
            resumed = True
            if recorder is not None and hasattr(recorder, "record_missing"):  # a stop may have come before they were
                recorder.record_missing(trials)
    best = _best(trials, limits)

    def record(s: Schedule, m: dict[str, Any], cost: float | None) -> None:
        nonlocal best, best_errors
        objs = objective_values(m, objectives)
        value = objs[objectives[0]]
        trial = Trial(number=len(trials), hash=s.hash(), value=value, objectives=objs,
                      mse_ref=m.get("mse_ref", math.inf), nfe=m.get("nfe", s.nfe), cached=bool(m.get("cached")),
                      diverged=bool(m.get("diverged")), method=strategy.name,
                      elapsed=elapsed0 + time.perf_counter() - start,
                      # with fitted / CPR ratios (``--ratios``) the schedule scored is the candidate with its ratios
                      schedule=m.get("evaluated_schedule") or dumps(s), latency_ms=m.get(LATENCY),
                      feasible=_feasible(objs, limits) if limits else None, screened=m.get("screened"), cost=cost)
        trials.append(trial)
        if store is not None and sid is not None:
            store.add_trial(sid, trial.number, trial.hash, trial.row())
        if recorder is not None:
            recorder.record(trial, s)
        best = _better(best, trial, limits)
        if best is trial and not trial.screened and PER_SAMPLE in m and (screening is not None or set_size):
            best_errors = decode_errors(m[PER_SAMPLE])  # whole: a partial score may want more than the screen's

    asks = 0
    while spent < budget:
        asks += 1
        if asks > 50 * budget:
            break  # the strategy keeps proposing schedules that are all cached: the space is exhausted
        batch = strategy.ask(min(batch_size, max(math.ceil(budget - spent), 1)))
        partial = partial_samples(strategy)
        if partial is not None and not 1 <= partial < (set_size or 0):
            raise SearchError(f"--method {strategy.name} scores candidates on {partial} noises first; the search set "
                              f"has {set_size}: use a larger --set-size or another method")
        if partial is not None:
            screen = partial_screen(partial, best.value if best else None, best_errors)
        else:
            screen = screening.screen(best.value, best_errors) if screening is not None and best else None
        if latency is not None:
            metrics = pool.map(batch, latency)
        else:  # a pool without screening (a bench's own) is only ever asked without a screen
            metrics = pool.map(batch, screen=screen) if screen is not None else pool.map(batch)
        for s, m in zip(batch, metrics):
            # a partial score costs its share; a cached answer (a schedule scored in full before) costs nothing
            cost = partial / set_size if partial is not None and m.get("screened") and not m.get("cached") else None
            record(s, m, cost)
            told = _minimised(trials[-1].objectives)
            strategy.tell(s, told if len(objectives) > 1 else told[0])
            if m.get("cached"):
                hits += 1
            else:
                true_evals += 1
                spent += 1.0 if cost is None else cost
                screened += bool(m.get("screened")) and cost is None
        if store is not None and sid is not None:
            store.put_search_state(sid, {"version": STATE_VERSION, "strategy": strategy.state(),
                                         "true_evaluations": true_evals, "cache_hits": hits, "trials": len(trials),
                                         "seconds": elapsed0 + time.perf_counter() - start, "screened": screened,
                                         "spent": spent,
                                         "screen_errors": None if best_errors is None else encode_errors(best_errors)})
        if callback is not None:
            callback(Progress(true_evals, hits, best.value if best else math.inf, budget,
                              time.perf_counter() - start, screened, spent))
    if best is None:
        raise SearchError("every candidate diverged" + (" or broke a limit" if limits else "")
                          + "; no schedule to return")
    front = _front(trials, objectives) if len(objectives) > 1 else []
    return SearchResult(loads(best.schedule), best.value, true_evals, hits,
                        elapsed0 + time.perf_counter() - start, trials, resumed, front, best, screened, spent)


def _saved_trials(store: Any, sid: str, saved: dict[str, Any]) -> list[Trial]:
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
        metrics = dict(r["metrics"])
        metrics.setdefault("objectives", {"value": metrics["value"]})  # rows written before objectives were kept
        out.append(Trial.from_row(r["trial_number"], r["schedule_hash"], metrics))
    return out


def _key(trial: Trial) -> float:
    """The first objective of a trial, to minimise."""
    name, value = next(iter(trial.objectives.items()))
    return _minimised({name: value})[0]


def _better(best: Trial | None, trial: Trial, limits: Mapping[str, float]) -> Trial | None:
    """The better of the two; a trial scored in part (a strategy's partial score) is an estimate, never the best."""
    if trial.cost is not None or not math.isfinite(_key(trial)) or (limits and not _feasible(trial.objectives,
                                                                                             limits)):
        return best
    return trial if best is None or _key(trial) < _key(best) else best


def _best(trials: list[Trial], limits: Mapping[str, float]) -> Trial | None:
    best = None
    for t in trials:
        best = _better(best, t, limits)
    return best


def _front(trials: list[Trial], objectives: tuple[str, ...]) -> list[Trial]:
    """The non-dominated finite trials, one per schedule, ordered by the first objective."""
    unique: dict[str, Trial] = {}
    for t in trials:
        if all(math.isfinite(v) for v in t.objectives.values()):
            unique.setdefault(t.hash, t)
    pool = list(unique.values())
    front = [pool[i] for i in pareto_front([dict(t.objectives) for t in pool], objectives)]
    return sorted(front, key=_key)
