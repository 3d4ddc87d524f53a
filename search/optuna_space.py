"""`optuna-tpe`, `optuna-cmaes`, `optuna-random`, `optuna-nsga2`: the schedule space searched by Optuna's
samplers (ask/tell).

Every coordinate of the :class:`~autotune.space.encoding.ScheduleSpace` becomes one Optuna distribution
(:class:`OptunaSpace`); a trial's params form the space's vector, and ``space.decode`` turns any of them into a
valid schedule. The mapping, coordinate by coordinate:

==========  ==================================================================================================
``t[k]``    ``lambda[k]``: FloatDistribution over the log-SNR lambda = log(alpha_t / sigma_t), from
            lambda(t_start) to lambda(t_end), or lambda(noise.t_min) when t_end = 0 (lambda(0) is infinite).
            The samplers then spread the times the way step sizes matter (uniform in lambda is close to the
            named schedules' spacing). Consequence: interior times below ``t_min`` are not proposed (the
            network was not trained there; ``evolution`` clamps the same way). With ``time_scale="t"``
            (or a noise schedule whose lambda is not finite at those ends) the coordinate is ``t[k]`` itself,
            FloatDistribution(t_end, t_start).
``int``     IntDistribution(low, high).
``cat``     CategoricalDistribution over the indices 0..n-1 (TPE, random); IntDistribution(0, n-1) for
            CMA-ES, which only samples numeric params (it runs as CMA-ES with margin, built for integers).
``bool``    CategoricalDistribution((0, 1)); IntDistribution(0, 1) for CMA-ES.
==========  ==================================================================================================

The study is an in-memory study driven through ``study.ask(distributions)`` and ``study.tell``, minimising one
objective, or several (``context.objectives``; told as a tuple, every value already in minimisation form) for
the samplers that handle them (NSGA-II, TPE, random; ``multi_objective = True``). An NFE-range space's ``nfe``
coordinate is one more IntDistribution.

The seeds (``context.seeds``, e.g. the named baselines) that lie in the space are enqueued first with
``study.enqueue_trial`` (their encodings), so the first trials are the seeds and the proposal for such a trial
is the seed schedule itself (bit for bit, whatever the lambda round trip does). Seeds outside the space are
proposed verbatim before them and never reported to the study.

``tell(schedule, value)`` finds the oldest pending trial whose schedule has that hash (several trials may
decode to the same schedule). A schedule that was never asked but lies in the space is added to the study as
a completed trial (``study.add_trial``). A diverged schedule (``value`` inf or NaN) is told as
``DIVERGED_VALUE`` (1e30), a finite penalty rather than a FAIL state: TPE and CMA-ES only rank values, so the
penalty simply ranks the trial worst and the samplers learn to avoid the region (a FAIL trial would be
ignored by both). Finite values above the penalty are clipped to it.

Determinism and resume. Before every ``study.ask`` the sampler is replaced by a fresh one seeded from
``(context.seed, number of asks so far)``, so a sampler carries no random state between asks. ``state()`` is
plain JSON (no pickle): every trial's params, value (``None`` while pending, or diverged), schedule hash and
seed index, the seeds still waiting in the queue, and the ordered log of asks and tells. ``load_state``
rebuilds a fresh study:

* TPE and random sampling are functions of the trials alone, so the completed trials are re-added with
  ``study.add_trial(optuna.trial.create_trial(...))``, the pending ones as RUNNING trials (TPE's constant
  liar sees them), the waiting seeds re-enqueued, all in their original trial numbers.
* CMA-ES keeps its optimizer (mean, covariance, paths, rng) in the trials' system attributes as a pickle,
  which the saved state deliberately does not carry; instead the log is replayed (the same asks with the same
  seeds and the same tells), which rebuilds the optimizer exactly; each replayed ask is checked against the
  saved params. Should the replay disagree (another Optuna version), the trials are re-added as above and
  CMA-ES restarts from the best trial so far.

Either way a restored strategy asks the same next batch as the original. Optuna's logging is quietened to
WARNING (and its experimental warnings muted) only while the strategy calls into Optuna, never globally.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Any, Iterator

import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from autotune.sampling.noise import NoiseSchedule
from autotune.search.strategy import SearchContext, SearchError, register
from autotune.space.encoding import ScheduleSpace
from autotune.space.schedule import Schedule

DIVERGED_VALUE = 1e30  # what a diverged schedule (value inf) is told as: worse than any real objective value
STATE_VERSION = 1
TIME_SCALES = ("lambda", "t")

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna at WARNING verbosity, its experimental/user warnings muted; restored afterwards."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        optuna.logging.set_verbosity(previous)


def _derived_seed(seed: int, k: int) -> int:
    """A 32-bit sampler seed for the ``k``-th ask of a strategy seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(k)]).generate_state(1)[0])


# -- the space as Optuna distributions ---------------------------------------------------------------------------


class OptunaSpace:
    """A ScheduleSpace's coordinates as Optuna distributions, and the maps between params and schedules.

    Args:
        space: the schedule space.
        noise: the model's noise schedule (needed for ``time_scale="lambda"``).
        time_scale: "lambda" (times sampled in log-SNR) or "t" (the times themselves).
        categorical: cat and bool coordinates as CategoricalDistribution (True) or IntDistribution (False).
    """

    def __init__(self, space: ScheduleSpace, noise: NoiseSchedule | None = None, time_scale: str = "lambda",
                 categorical: bool = True) -> None:
        if time_scale not in TIME_SCALES:
            raise SearchError(f"time_scale must be one of {', '.join(TIME_SCALES)}, got {time_scale!r}")
        self.space = space
        self.noise = noise
        self.categorical = categorical
        self.lambda_range: tuple[float, float] | None = None
        if time_scale == "lambda":
            self.lambda_range = self._lambda_range()
            if self.lambda_range is None:
                time_scale = "t"  # lambda is not finite (or not increasing) over the space's interval
        self.time_scale = time_scale
        self.t_range = (space.t_end, space.t_start)
        if self.lambda_range is not None:  # the times lambda can reach: below t_min is left out when t_end = 0
            self.t_range = (max(space.t_end, float(self._t(np.array([self.lambda_range[1]]))[0])), space.t_start)
        self.param_names: tuple[str, ...] = tuple(
            f"lambda[{c.step}]" if c.family == "t" and self.time_scale == "lambda" else c.name for c in space.coords)
        self.distributions: dict[str, BaseDistribution] = {
            name: self._distribution(c, name) for name, c in zip(self.param_names, space.coords)}
        self._time_idx = np.array([i for i, c in enumerate(space.coords) if c.family == "t"], dtype=int)

    def _lambda_range(self) -> tuple[float, float] | None:
        if self.noise is None:
            return None
        end = self.space.t_end if self.space.t_end > 0 else float(self.noise.t_min)
        if not 0 < end < self.space.t_start:
            return None
        with torch.no_grad():
            lo, hi = (float(x) for x in self.noise.lambda_(torch.tensor([self.space.t_start, end],
                                                                        dtype=torch.float64)))
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            return None
        return lo, hi

    def _distribution(self, c: Any, name: str) -> BaseDistribution:
        if c.family == "t":
            lo, hi = self.lambda_range if self.time_scale == "lambda" else (c.low, c.high)
            return FloatDistribution(float(lo), float(hi))
        if c.kind == "real":
            return FloatDistribution(float(c.low), float(c.high))
        if c.kind == "int" or not self.categorical:
            return IntDistribution(int(c.low), int(c.high))
        return CategoricalDistribution(tuple(range(int(c.low), int(c.high) + 1)))  # cat, bool: indices

    # -- conversions ----------------------------------------------------------------------------------------

    def _t(self, lam: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.noise.t_of_lambda(torch.as_tensor(lam, dtype=torch.float64)).numpy().astype(np.float64)

    def _lambda(self, t: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.noise.lambda_(torch.as_tensor(t, dtype=torch.float64)).numpy().astype(np.float64)

    def to_vector(self, params: dict[str, Any]) -> np.ndarray:
        """The space's vector of a trial's params (times mapped back from lambda)."""
        vec = np.array([float(params[n]) for n in self.param_names], dtype=np.float64)
        if self.time_scale == "lambda" and self._time_idx.size:
            t = self._t(vec[self._time_idx])
            vec[self._time_idx] = np.clip(t, self.space.t_end, self.space.t_start)
        return vec

    def to_params(self, vec: np.ndarray) -> dict[str, Any]:
        """Params (inside the distributions) of one of the space's vectors (e.g. ``space.encode(s)``)."""
        vec = np.asarray(vec, dtype=np.float64).copy()
        if self.time_scale == "lambda" and self._time_idx.size:
            t = np.clip(vec[self._time_idx], *self.t_range)
            lo, hi = self.lambda_range
            vec[self._time_idx] = np.clip(self._lambda(t), lo, hi)
        params: dict[str, Any] = {}
        for name, x in zip(self.param_names, vec):
            d = self.distributions[name]
            if isinstance(d, FloatDistribution):
                params[name] = float(min(max(x, d.low), d.high))
            elif isinstance(d, IntDistribution):
                params[name] = int(min(max(math.floor(x + 0.5), d.low), d.high))
            else:
                params[name] = d.choices[int(min(max(math.floor(x + 0.5), 0), len(d.choices) - 1))]
        return params

    def decode(self, params: dict[str, Any]) -> Schedule:
        """The valid schedule a trial's params stand for."""
        return self.space.decode(self.to_vector(params))

    def encode(self, s: Schedule) -> dict[str, Any]:
        """A schedule of the space as params (raises ScheduleError outside the space)."""
        return self.to_params(self.space.encode(s))


# -- the strategies -----------------------------------------------------------------------------------------------


class _OptunaStrategy:
    """Ask/tell over an Optuna study; subclasses choose the sampler (see the module docstring)."""

    name = ""
    categorical = True  # cat/bool coordinates as CategoricalDistribution
    replay = False  # load_state replays the ask/tell log (sampler state that trials alone do not determine)
    multi_objective = False  # the sampler handles several objectives (told as a tuple, all minimised)
    varies_nfe = True  # an NFERangeSpace's "nfe" coordinate is one more IntDistribution

    def __init__(self, context: SearchContext, time_scale: str = "lambda") -> None:
        self.context = context
        self.n_objectives = len(context.objectives)
        self.map = OptunaSpace(context.space, context.noise, time_scale, self.categorical)
        space = context.space
        self.seed_params = {i: self.map.encode(s) for i, s in enumerate(context.seeds) if space.contains(s)}
        self.loose_seeds = [i for i in range(len(context.seeds)) if i not in self.seed_params]
        self._fresh()
        self._enqueue_seeds(sorted(self.seed_params))

    # -- the study ------------------------------------------------------------------------------------------

    def _fresh(self) -> None:
        with quiet_optuna():
            self.study = optuna.create_study(directions=["minimize"] * self.n_objectives,
                                             sampler=optuna.samplers.RandomSampler(seed=0))
        self.trials: dict[int, dict[str, Any]] = {}  # number -> params, value, state, hash, seed
        self.pending: dict[str, list[int]] = {}  # schedule hash -> numbers of asked, untold trials
        self.waiting: list[tuple[int, int]] = []  # (trial number, seed index) enqueued, not asked yet
        self.events: list[list[Any]] = []  # ["ask" | "tell" | "add", trial number], in order
        self.asks = 0
        self.loose_left = len(self.loose_seeds)

    def _next_number(self) -> int:
        trials = self.study.get_trials(deepcopy=False)
        return trials[-1].number + 1 if trials else 0

    def _enqueue_seeds(self, seeds: list[int]) -> None:
        with quiet_optuna():
            for i in seeds:
                number = self._next_number()
                self.study.enqueue_trial(self.seed_params[i])
                self.waiting.append((number, i))

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def _completed(self) -> list[dict[str, Any]]:
        return [r for r in self.trials.values() if r["state"] in ("complete", "diverged")]

    def _study_ask(self) -> Any:
        self.study.sampler = self._sampler(_derived_seed(self.context.seed, self.asks))
        self.asks += 1
        return self.study.ask(self.map.distributions)

    # -- ask / tell -----------------------------------------------------------------------------------------

    def ask(self, n: int) -> list[Schedule]:
        out: list[Schedule] = []
        while self.loose_left and len(out) < n:  # seeds outside the space: proposed verbatim, never learnt from
            out.append(self.context.seeds[self.loose_seeds[len(self.loose_seeds) - self.loose_left]])
            self.loose_left -= 1
        with quiet_optuna():
            while len(out) < n:
                out.append(self._ask_one())
        return out

    def _ask_one(self) -> Schedule:
        trial = self._study_ask()
        seed = None
        if self.waiting and self.waiting[0][0] == trial.number:
            seed = self.waiting.pop(0)[1]
        params = dict(trial.params)
        schedule = self.context.seeds[seed] if seed is not None else self.map.decode(params)
        h = schedule.hash()
        self.trials[trial.number] = {"params": params, "value": None, "state": "pending", "hash": h, "seed": seed}
        self.pending.setdefault(h, []).append(trial.number)
        self.events.append(["ask", trial.number])
        return schedule

    def tell(self, schedule: Schedule, value: float | tuple[float, ...]) -> None:
        values = [float(v) for v in value] if isinstance(value, (tuple, list)) else [float(value)]
        diverged = not all(math.isfinite(v) for v in values)
        told_values = [DIVERGED_VALUE if diverged else min(v, DIVERGED_VALUE) for v in values]
        told = told_values if self.n_objectives > 1 else told_values[0]
        value = values if self.n_objectives > 1 else values[0]
        h = schedule.hash()
        numbers = self.pending.get(h)
        with quiet_optuna():
            if numbers:
                number = numbers.pop(0)
                if not numbers:
                    del self.pending[h]
                self.study.tell(number, told)
                self.events.append(["tell", number])
            elif self.context.space.contains(schedule):  # never asked: learn from it all the same
                number = self._next_number()
                params = self.map.encode(schedule)
                self._add(params, told)
                self.trials[number] = {"params": params, "value": None, "state": "pending", "hash": h,
                                       "seed": None}
                self.events.append(["add", number])
            else:
                return  # a seed outside the space, or a stranger: nothing the study can represent
        record = self.trials[number]
        record["state"] = "diverged" if diverged else "complete"
        record["value"] = None if diverged else value

    def _add(self, params: dict[str, Any], value: float | list[float] | None) -> None:
        state = TrialState.RUNNING if value is None else TrialState.COMPLETE
        values = None if value is None else value if isinstance(value, list) else [value]
        self.study.add_trial(create_trial(state=state, values=values, params=params,
                                          distributions={k: self.map.distributions[k] for k in params}))

    # -- state ----------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "method": self.name,
            "time_scale": self.map.time_scale,
            "params": list(self.map.param_names),
            "asks": self.asks,
            "loose_left": self.loose_left,
            "trials": [{"number": n, **r} for n, r in sorted(self.trials.items())],
            "waiting": [list(w) for w in self.waiting],
            "events": [list(e) for e in self.events],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("method") != self.name:
            raise SearchError(f"saved search state is not a version-{STATE_VERSION} {self.name} state")
        if state.get("time_scale") != self.map.time_scale or list(state.get("params", [])) != list(
                self.map.param_names):
            raise SearchError("saved search state was made for another search space")
        records = {int(r["number"]): {"params": dict(r["params"]), "value": r["value"], "state": r["state"],
                                      "hash": r["hash"], "seed": r["seed"]} for r in state["trials"]}
        events = [[str(k), int(n)] for k, n in state["events"]]
        with quiet_optuna():
            if not (self.replay and self._replay(records, events)):
                self._rebuild(records, [(int(n), int(i)) for n, i in state["waiting"]])
        self.trials = records
        self.pending = {}
        for n, r in sorted(records.items()):
            if r["state"] == "pending":
                self.pending.setdefault(r["hash"], []).append(n)
        self.waiting = [(int(n), int(i)) for n, i in state["waiting"]]
        self.events = events
        self.asks = int(state["asks"])
        self.loose_left = int(state["loose_left"])

    def _told_value(self, record: dict[str, Any]) -> float | list[float]:
        if self.n_objectives > 1:
            if record["state"] == "diverged":
                return [DIVERGED_VALUE] * self.n_objectives
            return [min(float(v), DIVERGED_VALUE) for v in record["value"]]
        return DIVERGED_VALUE if record["state"] == "diverged" else min(float(record["value"]), DIVERGED_VALUE)

    def _rebuild(self, records: dict[int, dict[str, Any]], waiting: list[tuple[int, int]]) -> None:
        """A fresh study holding the saved trials (and the waiting seeds) under their original numbers."""
        self._fresh()
        seeds = dict(waiting)
        for number in sorted(set(records) | set(seeds)):
            if self._next_number() != number:
                raise SearchError(f"saved search state: trial numbers are not contiguous at {number}")
            if number in seeds:
                self.study.enqueue_trial(self.seed_params[seeds[number]])
            else:
                r = records[number]
                self._add(r["params"], None if r["state"] == "pending" else self._told_value(r))

    def _replay(self, records: dict[int, dict[str, Any]], events: list[list[Any]]) -> bool:
        """Repeat the saved asks and tells on a fresh study; False if an ask comes out differently."""
        self._fresh()
        self._enqueue_seeds(sorted(self.seed_params))
        for kind, number in events:
            r = records[number]
            if kind == "ask":
                trial = self._study_ask()
                if trial.number != number or dict(trial.params) != r["params"]:
                    _log.warning("%s: replaying the saved search diverged at trial %d; re-adding the trials "
                                 "instead (the optimizer restarts)", self.name, number)
                    return False
                self.trials[number] = {**r, "value": None, "state": "pending"}
            elif kind == "tell":
                self.study.tell(number, self._told_value(r))
                self.trials[number] = dict(r)
            else:
                self._add(r["params"], self._told_value(r))
                self.trials[number] = dict(r)
        return True


@register("optuna-tpe")
class OptunaTPE(_OptunaStrategy):
    """Multivariate TPE (constant liar for batches); the first ``n_startup`` trials (seeds included) random."""

    name = "optuna-tpe"
    multi_objective = True

    def __init__(self, context: SearchContext, time_scale: str = "lambda", n_startup: int = 10) -> None:
        self.n_startup = n_startup
        super().__init__(context, time_scale)

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup, multivariate=True,
                                          constant_liar=True)


@register("optuna-random")
class OptunaRandom(_OptunaStrategy):
    """Optuna's RandomSampler over the same distributions (uniform in lambda for the times)."""

    name = "optuna-random"
    multi_objective = True

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=seed)


@register("optuna-nsga2")
class OptunaNSGA2(_OptunaStrategy):
    """NSGA-II (Deb et al., 2002) through Optuna's NSGAIISampler: generations of ``population`` trials.

    Its generation bookkeeping lives in the study's system attributes, which re-added trials would not carry,
    so a restored strategy replays the saved ask/tell log (as CMA-ES does). With one objective it is a plain
    genetic algorithm.
    """

    name = "optuna-nsga2"
    multi_objective = True
    replay = True

    def __init__(self, context: SearchContext, time_scale: str = "lambda", population: int = 16) -> None:
        self.population = population
        super().__init__(context, time_scale)

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIISampler(population_size=self.population, seed=seed)


class OptunaCmaEs(_OptunaStrategy):
    """CMA-ES with margin over every coordinate (categoricals as integers), started at the best trial so far.

    It starts once the in-space seeds have all been told (until then trials are random); its mean starts at
    the best completed trial (the best seed, usually), its step size at ``sigma0`` of each coordinate's range.
    """

    name = "optuna-cmaes"
    categorical = False
    replay = True

    def __init__(self, context: SearchContext, time_scale: str = "lambda", sigma0: float | None = None,
                 popsize: int | None = None) -> None:
        self.sigma0 = sigma0
        self.popsize = popsize
        super().__init__(context, time_scale)

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        done = self._completed()
        x0 = None
        if done:
            best = min(done, key=self._told_value)
            x0 = dict(best["params"])
        return optuna.samplers.CmaEsSampler(
            x0=x0, sigma0=self.sigma0, seed=seed, n_startup_trials=max(1, len(self.seed_params)),
            independent_sampler=optuna.samplers.RandomSampler(seed=seed), warn_independent_sampling=False,
            with_margin=True, popsize=self.popsize)


def _cmaes_available() -> bool:
    try:
        import cmaes  # noqa: F401
    except ImportError:
        return False
    return True


if _cmaes_available():  # Optuna's CmaEsSampler needs the `cmaes` package (pip install cmaes)
    register("optuna-cmaes")(OptunaCmaEs)
