"""Stage 2 of AutoDiffusion (Li et al., 2023): per-step skip masks under a latency budget.

With the time grid and the solver decisions of a stage-1 schedule fixed, evolve which prunable units
(``Denoiser.units``, see :func:`autotune.sampling.denoiser.prunable_units`) each step skips, to minimise
mse_ref subject to measured latency <= ``limit_ms`` (the runner measures ``latency_ms`` on the evaluating
worker; the CLI sets the limit to a fraction of the unpruned schedule's latency). A mask is one bit per
(step, unit); a schedule carries it as ``Step.skip``. Constraint handling is Deb's feasibility rule: every
feasible mask ranks above every infeasible one; feasible masks rank by mse_ref, infeasible ones by how far
they exceed the limit. Each generation: binary tournament, uniform crossover of the bits, bit-flip
mutation (at least one bit), elitist survival; a mask already asked for is not asked again.

The strategy is told ``(mse_ref, latency_ms)`` (run it with ``objectives=("mse_ref", "latency_ms")`` and
``limits={"latency_ms": limit_ms}``, so the runner's best is the best feasible mask).

With ``reusable`` units (``Denoiser.units.reusable``: skippable units and reuse-only ones such as a UNet's deep
branch) the gene of each (step, unit) has three states: compute, reuse (the unit's output cached at the last call
that computed it: ``Step.reuse``) or skip (only for skippable units). The first generation holds DeepCache's
uniform patterns (every reuse-only unit at intervals 2, 3, 5; at 10 steps or more, intervals 2 and 3 also with the
last two steps computed; on a guided model, the guidance direction and a deep unit reused at the same steps, at
intervals 2 and 3) beside random genomes; breeding is the same (binary tournament, uniform crossover, at least one
gene set to another allowed state), and every genome is repaired into a valid schedule: a reuse needs an earlier
step that computed the unit, counted conservatively (a step that reuses any reuse-only unit is taken as not
computing the blocks inside it). Without ``reusable`` the search is the skip-only one above, draw for draw.

With more than one of ``reuse_orders`` (default: all of ``Schedule.reuse_order``'s, the copy and the forecasts of
order 1 and 2) the genome ends with one more gene, the schedule's reuse order, bred and mutated like the others; the
DeepCache seeds carry the first-order forecast (on digits it lowered DeepCache's copy error at every interval and NFE
measured), random genomes draw the order uniformly, and once the seeds are asked, the ORDER_TRIALS best genomes told
so far are asked again at each other order, since which order serves depends on the model and the pattern more than
on anything a random flip of one gene among hundreds would find: at NFE 20 (guidance 2, 128 report noises) the same
pattern (guidance direction and deep0 reused two steps of three, the last two computed) is at 1.55x the unpruned
mse_ref with order 1 and 1.17x with order 2 on digits, where on digits-dit (rest1, the same shape) order 2 is worse
(2.33x against 2.12x).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from autotune.search.strategy import SearchError, rng_from_state, rng_state, schedule_from_json, schedule_to_json
from autotune.sampling.reuse import without_masks
from autotune.space.schedule import GUIDANCE_UNIT, REUSE_ORDERS, Schedule

POPULATION = 12
DENSITIES = (0.1, 0.25, 0.4, 0.6)  # share of skipped bits in the initial random masks
INITIAL = 8  # random masks before breeding starts
REUSE_DENSITIES = (0.3, 0.5, 0.7)  # share of reused genes in the initial random genomes (3-state search)
SKIP_DENSITIES = (0.0, 0.05, 0.1)  # share of skipped genes there
DEEPCACHE_INTERVALS = (2, 3, 5)
# Seeds that also compute the last FULL_TAIL steps, for schedules of FULL_TAIL_FROM steps or more: a reused output's
# error in the final steps reaches the sample with no later step to correct it. On digits-dit at NFE 20 the budget-64
# search's winner was DeepCache N=2 (forecast) with the last two steps computed: 1.70x faster at 1.19x the
# unpruned mse_ref on the report set, where N=2 itself was at 2.18x.
FULL_TAIL, FULL_TAIL_FROM = 2, 10
# On a guided model, seeds that also reuse the guidance direction with each of the first COMBINED_UNITS deep units
# at the same steps (intervals 2 and 3, the tail computed on long schedules). On digits (guidance 2, NFE 20, 128
# report noises) the guidance direction and deep0 forecast together every other step, the last step computed, ran
# 1.51-1.54x faster than unpruned at 1.03x its mse_ref, where neither alone reached 1.45x; budget-24 and budget-64
# searches seeded with one unit at a time found deep0 alone (2.28x).
COMBINED_UNITS = 2
COMPUTE, REUSE, SKIP = 0, 1, 2
SEED_ORDER = 1  # the reuse order the DeepCache-shaped seeds carry (when among the search's orders)
ORDER_TRIALS = 2  # after the seeds, this many best genomes are asked again at each other reuse order
# Masks chosen on a held-out set: the best feasible ones by search-set mse_ref, re-scored on validation. On digits
# (guidance 2, NFE 20, 64 search noises) the search's two best bred masks were 1.19-1.20x the unpruned mse_ref on
# the search set and 1.30-1.42x on 256 report noises, where DeepCache-shaped seeds held (1.03 -> 1.04, 1.08 -> 1.09).
STAGE2_FINALISTS = 5
# Before the choice, the CONFIRMED best masks timed at most BORDER over the limit are timed again, CONFIRM_ROUNDS times
# each against the unpruned schedule, and only those whose median share of its time is within the limit are
# finalists. One timing decides feasibility badly near the limit: on digits (guidance 2, NFE 20) the same pattern's
# share of the unpruned time ranged 0.60-0.67 over six back-to-back pairs of 3 runs, and the guidance + deep0
# seed (0.62-0.65 in interleaved timing, 1.04x the unpruned mse_ref on report noises) was timed over the 0.66 limit
# in the bench's searches, which then chose masks at 1.30-1.59x (docs/RESULTS.md: it still is, re-timing or not).
BORDER = 0.05
CONFIRM_ROUNDS = 5
CONFIRMED = 2 * STAGE2_FINALISTS


class SkipMaskSearch:
    """Ask/tell evolution of the skip masks of ``base`` (grid and solvers fixed); see the module docstring.

    Args:
        base: the stage-1 schedule (its own skip masks are dropped).
        units: the model's prunable units.
        limit_ms: the latency budget in milliseconds.
        seed: rng seed.
    """

    name = "skip-mask"
    multi_objective = True

    def __init__(self, base: Schedule, units: tuple[str, ...], limit_ms: float, seed: int = 0,
                 population: int = POPULATION, reusable: tuple[str, ...] = (),
                 reuse_orders: tuple[int, ...] = REUSE_ORDERS) -> None:
        if not units and not reusable:
            raise SearchError("stage 2 needs a model with prunable units (this model has none)")
        if not reuse_orders or any(o not in REUSE_ORDERS for o in reuse_orders):
            raise SearchError(f"stage 2: reuse orders must be among {REUSE_ORDERS}, got {reuse_orders!r}")
        self.reuse_orders = tuple(sorted(set(reuse_orders)))
        self.base = without_masks(base)
        self.skippable = tuple(units)
        self.reusable = tuple(reusable)
        self.reuse_only = tuple(u for u in self.reusable if u not in self.skippable)
        self.units = self.skippable + self.reuse_only if self.reusable else self.skippable
        self.limit = float(limit_ms)
        self.bits = [(k, u) for k in range(len(self.base.steps)) for u in self.units]
        self.order_gene = bool(self.reusable) and len(self.reuse_orders) > 1  # one more gene: the reuse order
        self.seed_order = SEED_ORDER if SEED_ORDER in self.reuse_orders else self.reuse_orders[-1]
        n_steps = len(self.base.steps)
        self.seeds = [self._deepcache(unit, n) for unit in self.reuse_only for n in DEEPCACHE_INTERVALS
                      if n < n_steps]
        tail = FULL_TAIL if n_steps >= FULL_TAIL_FROM else 0
        if tail:  # the same patterns computing the last steps (an error there is not corrected)
            self.seeds += [self._deepcache(unit, n, full_tail=tail) for unit in self.reuse_only
                           for n in DEEPCACHE_INTERVALS[:2]]
        deep = [u for u in self.reuse_only if u != GUIDANCE_UNIT]
        if GUIDANCE_UNIT in self.reuse_only:  # both reuses at once: the conditional half alone, without its deep part
            self.seeds += [self._deepcache((GUIDANCE_UNIT, unit), n, full_tail=tail) for unit in deep[:COMBINED_UNITS]
                           for n in DEEPCACHE_INTERVALS[:2]]
        self.population_size = population
        self.rng = np.random.default_rng(seed)
        self.population: list[tuple[Schedule, tuple[float, float]]] = []
        self.asked: set[str] = set()
        self.initial_left = INITIAL
        self.reorders_left = ORDER_TRIALS * (len(self.reuse_orders) - 1) if self.order_gene else 0

    # -- masks <-> schedules ----------------------------------------------------------------------------------

    def schedule(self, mask: np.ndarray) -> Schedule:
        skips: list[list[str]] = [[] for _ in self.base.steps]
        for on, (k, u) in zip(mask, self.bits):
            if on:
                skips[k].append(u)
        steps = tuple(dataclasses.replace(st, skip=tuple(sk)) for st, sk in zip(self.base.steps, skips))
        return dataclasses.replace(self.base, steps=steps)

    def mask(self, s: Schedule) -> np.ndarray:
        if self.reusable:
            genes = [SKIP if u in s.steps[k].skip else REUSE if u in s.steps[k].reuse else COMPUTE
                     for k, u in self.bits]
            return np.array(genes + ([s.reuse_order] if self.order_gene else []), dtype=np.int8)
        return np.array([u in s.steps[k].skip for k, u in self.bits], dtype=bool)

    # -- 3-state genomes (compute / reuse / skip) ---------------------------------------------------------------

    def _allowed(self, k: int, u: str) -> tuple[int, ...]:
        states = [COMPUTE]
        if k > 0 and u in self.reusable:
            states.append(REUSE)
        if u in self.skippable:
            states.append(SKIP)
        return tuple(states)

    def _deepcache(self, units: str | tuple[str, ...], interval: int, full_tail: int = 0) -> np.ndarray:
        """DeepCache's uniform pattern reusing ``units`` (one name or several) between full calls."""
        units = (units,) if isinstance(units, str) else units
        last = len(self.base.steps) - full_tail  # steps from here on compute everything
        genes = [REUSE if u in units and k % interval and k < last else COMPUTE for k, u in self.bits]
        return np.array(genes + ([self.seed_order] if self.order_gene else []), dtype=np.int8)

    def _reordered(self) -> np.ndarray | None:
        """The next not yet asked genome among the ORDER_TRIALS fittest told ones at another reuse order (None when
        there is none; each one returned counts against ``reorders_left``)."""
        for s, _ in self.population[:ORDER_TRIALS]:
            for order in self.reuse_orders:
                variant = dataclasses.replace(s, reuse_order=order)
                if variant.reuse_order == order and variant.hash() not in self.asked:
                    self.reorders_left -= 1
                    return self.mask(variant)
        return None

    def _allowed_at(self, i: int) -> tuple[int, ...]:
        """The states gene ``i`` may take (the trailing order gene: the reuse orders)."""
        return self.reuse_orders if i == len(self.bits) else self._allowed(*self.bits[i])

    def _repair(self, genome: np.ndarray) -> np.ndarray:
        """Each gene in an allowed state; a reuse with no earlier step computing the unit becomes a compute."""
        genome = genome.copy()
        computed: set[str] = set()
        n_units = len(self.units)
        for k in range(len(self.base.steps)):
            row = genome[k * n_units:(k + 1) * n_units]
            for i, u in enumerate(self.units):
                if row[i] not in self._allowed(k, u) or (row[i] == REUSE and u not in computed):
                    row[i] = COMPUTE
            inner_unknown = any(row[i] == REUSE for i, u in enumerate(self.units) if u in self.reuse_only)
            # a step reusing the guidance direction runs the conditional half alone and caches nothing
            half = any(row[i] == REUSE for i, u in enumerate(self.units) if u == GUIDANCE_UNIT)
            for i, u in enumerate(self.units):
                if row[i] == COMPUTE and not half and (u in self.reuse_only or not inner_unknown):
                    computed.add(u)
        if self.order_gene and genome[-1] not in self.reuse_orders:
            genome[-1] = self.reuse_orders[-1]
        return genome

    def schedule_of(self, genome: np.ndarray) -> Schedule:
        if not self.reusable:
            return self.schedule(genome)
        skips: list[list[str]] = [[] for _ in self.base.steps]
        reuses: list[list[str]] = [[] for _ in self.base.steps]
        for g, (k, u) in zip(genome, self.bits):
            if g == SKIP:
                skips[k].append(u)
            elif g == REUSE:
                reuses[k].append(u)
        steps = tuple(dataclasses.replace(st, skip=tuple(sk), reuse=tuple(re))
                      for st, sk, re in zip(self.base.steps, skips, reuses))
        order = int(genome[-1]) if self.order_gene else self.reuse_orders[-1]
        return dataclasses.replace(self.base, steps=steps, reuse_order=order)

    def _candidate3(self) -> np.ndarray:
        n = len(self.bits)
        if self.seeds:
            return self._repair(self.seeds.pop(0))
        if self.reorders_left > 0 and self.population:
            genome = self._reordered()
            if genome is not None:
                return genome
        if self.initial_left > 0 or len(self.population) < 2:
            self.initial_left = max(self.initial_left - 1, 0)
            p_reuse = REUSE_DENSITIES[int(self.rng.integers(len(REUSE_DENSITIES)))]
            p_skip = SKIP_DENSITIES[int(self.rng.integers(len(SKIP_DENSITIES)))]
            r = self.rng.random(n)
            genome = np.where(r < p_reuse, REUSE, np.where(r < p_reuse + p_skip, SKIP, COMPUTE)).astype(np.int8)
            if self.order_gene:
                genome = np.append(genome, self.reuse_orders[int(self.rng.integers(len(self.reuse_orders)))])
            return self._repair(genome.astype(np.int8))
        a, b = self._tournament(), self._tournament()
        n = len(a)
        child = np.where(self.rng.random(n) < 0.5, a, b).astype(np.int8)
        flips = self.rng.random(n) < 1.0 / n
        flips[int(self.rng.integers(n))] = True
        for i in np.flatnonzero(flips):
            others = [st for st in self._allowed_at(int(i)) if st != child[i]]
            if others:
                child[i] = others[int(self.rng.integers(len(others)))]
        return self._repair(child)

    def _fitness(self, values: tuple[float, float]) -> tuple[int, float]:
        """Deb's rule: (0, mse_ref) when within the limit, else (1, excess latency)."""
        mse, latency = values
        return (0, mse) if latency <= self.limit else (1, latency - self.limit)

    # -- ask / tell -------------------------------------------------------------------------------------------

    def ask(self, n: int) -> list[Schedule]:
        out: list[Schedule] = []
        while len(out) < n:
            for _ in range(50):  # a fresh mask; a tiny mask space may run out, then the cache answers repeats
                s = self.schedule_of(self._candidate3()) if self.reusable else self.schedule(self._candidate())
                if s.hash() not in self.asked:
                    break
            self.asked.add(s.hash())
            out.append(s)
        return out

    def _candidate(self) -> np.ndarray:
        if self.initial_left > 0 or len(self.population) < 2:
            self.initial_left = max(self.initial_left - 1, 0)
            density = DENSITIES[int(self.rng.integers(len(DENSITIES)))]
            return self.rng.random(len(self.bits)) < density
        a, b = self._tournament(), self._tournament()
        child = np.where(self.rng.random(len(self.bits)) < 0.5, a, b)
        flips = self.rng.random(len(self.bits)) < 1.0 / len(self.bits)
        flips[int(self.rng.integers(len(self.bits)))] = True
        return child ^ flips

    def _tournament(self) -> np.ndarray:
        i, j = self.rng.choice(len(self.population), size=2, replace=False)
        return self.mask(self.population[min(i, j)][0])  # the population is kept sorted: lower index is fitter

    def tell(self, schedule: Schedule, value: Any) -> None:
        values = tuple(float(v) for v in value)
        if len(values) != 2:
            raise SearchError("stage 2 is told (mse_ref, latency_ms)")
        if not all(math.isfinite(v) for v in values) or any(s.hash() == schedule.hash() for s, _ in self.population):
            return
        self.population.append((schedule, values))
        self.population.sort(key=lambda sv: self._fitness(sv[1]))
        del self.population[self.population_size:]

    # -- state ------------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), "limit": self.limit, "initial_left": self.initial_left,
                "asked": sorted(self.asked), **({"seeds_left": len(self.seeds)} if self.reusable else {}),
                **({"reorders_left": self.reorders_left} if self.order_gene else {}),
                "population": [[schedule_to_json(s), list(v)] for s, v in self.population]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng = rng_from_state(state["rng"])
        self.limit = float(state["limit"])
        self.initial_left = int(state["initial_left"])
        if self.reusable:
            self.seeds = self.seeds[len(self.seeds) - int(state.get("seeds_left", 0)):]
        if self.order_gene:  # a state saved before the order trials existed has had its chance to ask them
            self.reorders_left = int(state.get("reorders_left", 0))
        self.asked = set(state["asked"])
        self.population = [(schedule_from_json(d), (float(v[0]), float(v[1]))) for d, v in state["population"]]


@dataclasses.dataclass(frozen=True)
class Stage2:
    """What stage 2 found: the runner's result (None when no mask met the limit), the latency figures, and the
    schedule chosen (``best``, its trial ``best_trial``) among the finalists (masks timed again within the limit,
    ``retimed``): the lowest search-set mse_ref, or with a validation set the best there (``validation``: each
    finalist's trial hash -> its validation mse_ref)."""

    result: Any  # SearchResult | None
    search_id: str
    limit_ms: float
    unpruned_ms: float
    fraction: float
    reason: str = ""  # why no mask was found
    best: Any = None  # Schedule | None
    best_trial: Any = None  # Trial | None
    validation: dict = dataclasses.field(default_factory=dict)
    retimed: dict = dataclasses.field(default_factory=dict)  # trial hash -> latency share of unpruned, timed again


def stage2_candidates(result: Any, limit_ms: float, most: int = CONFIRMED) -> list[Any]:
    """The ``most`` trials of lowest search-set mse_ref timed within BORDER over ``limit_ms``, one per schedule
    (screened ones left out: their figure is an estimate)."""
    out, seen = [], set()
    for t in sorted(result.trials, key=lambda t: t.value):
        ok = t.latency_ms is not None and t.latency_ms <= limit_ms * (1 + BORDER)
        if ok and not t.diverged and not t.screened and math.isfinite(t.value) and t.hash not in seen:
            seen.add(t.hash)
            out.append(t)
    return out[:most]


def retimed_shares(pool: Any, unpruned: Schedule, trials: list[Any], latency: Any,
                   rounds: int = CONFIRM_ROUNDS) -> dict[str, float]:
    """Each trial's latency as a share of the unpruned schedule's, timed again: ``rounds`` pool calls of the unpruned
    schedule followed by every trial's, one run each (the search's timings warmed the model), the median over rounds
    of the trial's time over that round's unpruned time (so a slow phase of the machine slows both sides of a
    ratio). It costs about as much as timing a few more candidates."""
    from autotune.search.latency import LATENCY

    schedules = [unpruned] + [t.schedule_value() for t in trials]
    shares: dict[str, list[float]] = {t.hash: [] for t in trials}
    once = dataclasses.replace(latency, repeats=1, warmup=0)  # each round pairs single runs, adjacent in time
    for _ in range(rounds):
        rows = pool.map(schedules, once)
        for t, row in zip(trials, rows[1:]):
            shares[t.hash].append(row[LATENCY] / rows[0][LATENCY])
    return {h: float(np.median(v)) for h, v in shares.items()}


def run_stage2(base: Schedule, units: tuple[str, ...], pool: Any, budget: int, *, fraction: float, seed: int = 0,
               batch_size: int = 8, store: Any = None, parent_id: str = "", study_url: str | None = None,
               study_attrs: dict[str, Any] | None = None, latency: Any = None,
               reusable: tuple[str, ...] = (), reuse_orders: tuple[int, ...] = REUSE_ORDERS,
               callback: Any = None, validation: Any = None, progress: Any = None) -> Stage2:
    """Stage 2 on ``base``: skip masks minimising mse_ref with latency <= ``fraction`` x the unpruned latency;
    with ``reusable`` units, compute / reuse / skip per (step, unit), and the reuse order among ``reuse_orders`` (the
    study records all three).

    The pool measures latency (on its workers) for this stage's calls; the unpruned schedule is measured first, and a
    resumed stage (same parent search, base, budget, fraction and seed) keeps the limit it started with.
    ``latency``: a LatencySpec (default: 8 samples, median of 5 runs after 1 warm-up). ``callback``: hears
    run_search's :class:`~autotune.search.runner.Progress` after every batch.

    The finalists are the STAGE2_FINALISTS best masks (search-set mse_ref) whose latency, timed again against the
    unpruned schedule's (``retimed_shares``), is within the limit; ``validation``: an Evaluator of a held-out set
    where they are scored and the best is chosen (search/validate.py's rule, as for stage 1's finalists;
    ``progress`` hears of each); without it, the first of them.
    """
    from autotune.search.latency import LATENCY, LatencySpec
    from autotune.search.optuna_record import StudyRecorder
    from autotune.search.runner import run_search, search_id
    from autotune.search.strategy import SearchError
    from autotune.space.encoding import ScheduleSpace

    if not 0 < fraction:
        raise SearchError(f"--latency-budget must be > 0, got {fraction}")
    latency = latency or LatencySpec()  # the pool times every candidate of this stage (passed per call)
    unpruned = without_masks(base)
    sid = search_id(parent=parent_id, stage=2, base=unpruned.hash(), budget=budget, fraction=fraction, seed=seed,
                    **({"reusable": list(reusable)} if reusable else {}),
                    **({"reuse_orders": list(reuse_orders)} if reusable and tuple(reuse_orders) != (0,) else {}))
    saved = store.get_search_state(sid) if store is not None else None
    unpruned_ms = float(pool.map([unpruned], latency)[0][LATENCY])
    limit = float(saved["strategy"]["limit"]) if saved else fraction * unpruned_ms
    strategy = SkipMaskSearch(unpruned, tuple(units), limit, seed, reusable=tuple(reusable),
                              reuse_orders=tuple(reuse_orders))
    names = ("mse_ref", LATENCY)
    # the study's params: the skip and reuse masks and the reuse order
    space = ScheduleSpace.for_schedule(unpruned, units=tuple(units), reusable=tuple(reusable),
                                       max_reuse_order=max(reuse_orders) if reusable else 0)
    recorder = StudyRecorder(study_url, sid, space, names, {**(study_attrs or {}), "stage": 2})
    try:
        result = run_search(strategy, pool, budget, objectives=names, limits={LATENCY: limit},
                            batch_size=batch_size, store=store, sid=sid, recorder=recorder, latency=latency,
                            callback=callback)
    except SearchError as e:
        return Stage2(None, sid, limit, unpruned_ms, fraction, str(e))
    candidates = stage2_candidates(result, limit)
    shares = retimed_shares(pool, unpruned, candidates, latency)
    finalists = [t for t in candidates if shares[t.hash] <= fraction][:STAGE2_FINALISTS]
    if not finalists:  # none held the limit when timed again: the search's own best (it did when it was timed)
        return Stage2(result, sid, limit, unpruned_ms, fraction, best=result.best, best_trial=result.best_trial,
                      retimed=shares)
    best_trial, scores = finalists[0], {}
    if validation is not None and len(finalists) > 1:
        from autotune.search.validate import pick_on_validation

        chosen, scored = pick_on_validation(validation, [(t.hash, t.schedule_value()) for t in finalists],
                                            progress=progress)
        scores = {f.label: f.validation["mse_ref"] for f in scored}
        best_trial = next(t for t in finalists if t.hash == chosen.label)
    best = result.best if best_trial.hash == result.best.hash() else best_trial.schedule_value()
    return Stage2(result, sid, limit, unpruned_ms, fraction, best=best, best_trial=best_trial, validation=scores,
                  retimed=shares)
