"""A whole search job as one call: stage 1, refinement, validation, stage 2, the schedule file, the Pareto file
and the report set's figures, from a :class:`JobConfig` to a :class:`JobOutcome`.

`autotune search` parses its options into a JobConfig, calls :func:`run_search_job` and prints the outcome;
the benches call the same function, so what they measure is what the command runs. Nothing here prints:
long steps open ``hooks.step(description)`` and send it progress events (``evaluate/progress.py``), the
search loop's batches go to ``hooks.search_progress`` and warnings to ``hooks.notify``; the default hooks
are silent.

torch, the models and the strategies are imported inside the functions, inside the "loading" step: importing
this module for its config must not cost the seconds they take.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Optional

from autotune.errors import AutotuneError, InputError
from autotune.evaluate.progress import ProgressFn
from autotune.sampling.capabilities import check_guidance_applies
from autotune.space.schedule import reusable_for

if TYPE_CHECKING:  # torch-heavy: imported where they are used
    from autotune.evaluate.evaluator import Evaluator
    from autotune.sampling.denoiser import Denoiser
    from autotune.sampling.noise import NoiseSchedule
    from autotune.search.runner import Pool, Progress, SearchResult
    from autotune.search.set_sizes import SetSizes
    from autotune.search.skip_stage import Stage2
    from autotune.search.strategy import Strategy
    from autotune.search.validate import Finalist
    from autotune.space.schedule import Schedule

# s3 is the default single-objective method: on held-out noise it beat evolution on gmm64 (12 runs, 2.81x vs
# 1.88x the best named schedule's mean) and on digits NFE 5 (2.10x vs 1.49x); bench/generalise.py. It is
# single-objective, so a Pareto search (several objectives) defaults to evolution.
DEFAULT_METHOD = "s3"
# Gradient steps on the search's winner (its time grid, each step's model-time shift and, where compensation applies,
# its DC-Solver ratio: search/gradient.py) before validation, where the refined schedule is one more finalist; the
# loss is tail-aware (the root mean square of the per-sample errors) on the whole search set. The ratios joined on
# 2026-12-02 (gradient.py has the figures: digits-flow's report mean 6.90e-4 -> 5.92e-4, digits' p99 -30 %).
# Before them, measured at NFE 5 on 1024 report noises: digits mean 4.07e-3 -> 2.92e-3
# and p99 2.04e-2 -> 1.53e-2 (75 s on 2 cores); the plain mean on the first 64 noises (the default until then, 35 s)
# gave 3.13e-3 and a p99 of 2.68e-2, worse than unipc-bh1-o3's 2.79e-2 (gradient.py has the table). Steps: the rms
# loss on digits went 4.71e-3 -> 2.80e-3 in 40 steps and 2.77e-3 in 60 (1.3 s a step on 2 cores); 40 keep the
# README's search near its 5 minutes (30 steps of the mean loss got digits only to 3.13e-3 on validation).
DEFAULT_REFINE = 40
REFINE_SAMPLES = 0  # all of the search set: fewer noises fit the mean and leave the tail worse (gradient.py)
# REFINE_SET: a cheap model's refinement fits a search-kind set of its own, larger than the search set
# (search/set_sizes.py: CHEAP_SIZES["refine"]), because what limits its tail is how many of the rare mode switches
# the loss sees; the search loop keeps its smaller set.
DEFAULT_PARETO_METHOD = "evolution"


@dataclass(frozen=True)
class JobConfig:
    """Everything that defines a search job (the options of `autotune search`, as values).

    ``nfe`` is a count ("5") or a range ("4-10"), kept as given: a range's text is part of the search id.
    ``out`` None: nothing is written (the outcome still holds the schedule). ``prompts`` are the prompt texts
    themselves. Sizes of 0 mean the set's default. A bad value raises one InputError line on construction,
    before any model is loaded.
    """

    model: str
    out: Optional[Path] = None
    nfe: str = "5"
    method: Optional[str] = None  # None: DEFAULT_METHOD, or DEFAULT_PARETO_METHOD with several objectives
    # true evaluations of stage 1; was 120 before the refinement: on the README's search (digits NFE 5, seed 0) the
    # best trial came at evaluation 72, and the refinement moves it further than the last 24 evaluations did
    budget: int = 96
    seed: int = 0
    objectives: tuple[str, ...] = ("mse_ref",)
    workers: int = 0  # Ray workers; 0 scores in this process
    address: Optional[str] = None  # a Ray cluster to join instead of a local Ray
    candidate_timeout: float = 0.0  # Ray: seconds before a worker counts as stalled (0: measured)
    guidance: Optional[float] = None
    batch: int = 8
    set_size: int = 0  # search-set noises (0: 128, more for a cheap model: search/set_sizes.py)
    refine: Optional[int] = None  # gradient steps on the winner's grid, shifts, ratios (None: refine_steps decides)
    stage2_budget: int = 0  # true evaluations for the skip-mask stage (0: off)
    latency_budget: float = 0.8  # stage 2's latency limit, a fraction of the unpruned schedule's
    # held-out samples the finalists are chosen on (0: keep the search-set best; None: 512, more for a cheap model)
    validate: Optional[int] = None
    ratios: Optional[str] = None  # "fit" or "cpr:FILE"
    prompts: tuple[str, ...] = ()
    strength: Optional[float] = None  # img2img: the schedule a pipeline runs at this strength
    report_size: int = 0
    score_report: bool = True  # score the best and its named peers on the report set (the closing table)
    solvers: tuple[str, ...] = ()  # the solvers a step may choose (empty: the space's default, SEARCH_SOLVERS)
    reuse: bool = False  # stage 2 may also reuse cached unit outputs (DeepCache), not only skip units
    screen: bool = True  # stage 1 stops hopeless candidates early (search/runner.py's Screening; mse_ref alone)
    # also seed stage 1 with the cache's best schedules at neighbouring NFE (search/warm.py); off by default: measured
    # mixed (digits NFE 5 -> 6 3.94x vs 2.76x the best named; gmm64 worse in 7 of 10 seeds x NFE 4/6, digits-flow
    # NFE 5 -> 6 1.39x vs 3.19x): the refinement's landing depends on stage 1's end more than the start helps
    warm_start: bool = False
    # also refine the best named schedule whose first call is USF's analytic first step (analytic_first_start), a
    # validation finalist; off: every schedule the job can write replays in a diffusers pipeline (AutotuneScheduler)
    analytic_first: bool = True
    # where every schedule of the search ends: "zero" (onto the data, t = 0) or "sigma_min" (the model's t_min, as
    # diffusers' final_sigmas_type="sigma_min" does; SIGMA_MIN_NAMED)
    final: str = "zero"

    def __post_init__(self) -> None:
        object.__setattr__(self, "nfe", str(self.nfe))  # an int is a count too
        object.__setattr__(self, "objectives", tuple(self.objectives))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise InputError(f"objectives: expected distinct metric names, got {list(self.objectives)}")
        if self.budget < 1 or self.batch < 1 or self.workers < 0:
            raise InputError(f"budget {self.budget}, batch {self.batch}, workers {self.workers}: expected a budget "
                             "and batch of at least 1 and workers of at least 0")
        if not 0.0 < self.latency_budget < float("inf"):  # NaN fails this too
            raise InputError(f"--latency-budget {self.latency_budget}: expected a positive fraction like 0.8")
        if self.final not in ("zero", "sigma_min"):  # named.FINALS, spelled out: that module imports torch
            raise InputError(f"--final {self.final!r}: expected zero (onto the data) or sigma_min (the model's t_min)")
        if self.strength is not None:
            _check_strength(self.strength, self.nfe, self.refine, self.ratios)
            if self.final != "zero":
                raise InputError("--final sigma_min with --strength: an image-to-image search ends at t = 0")
        self.nfe_range  # a bad count or range fails here, not after the model has loaded
        object.__setattr__(self, "solvers", tuple(self.solvers))
        _check_solvers(self.solvers)

    @property
    def nfe_range(self) -> tuple[int, int]:
        from autotune.search.nfe_space import parse_nfe
        from autotune.space.fileformat import MAX_NFE

        low, high = parse_nfe(self.nfe)
        if high > MAX_NFE:
            raise InputError(f"--nfe {self.nfe}: at most {MAX_NFE} model evaluations")
        return low, high

    @property
    def validating(self) -> bool:
        return self.validate != 0

    @property
    def search_method(self) -> str:
        return self.method or (DEFAULT_METHOD if len(self.objectives) == 1 else DEFAULT_PARETO_METHOD)

    @property
    def refine_steps(self) -> int:
        """Gradient steps on the winner: as given, else DEFAULT_REFINE for a plain mse_ref search from noise on a
        model without prompts (a latent text-to-image backward pass over the search set is a memory question the
        user should answer), else none."""
        if self.refine is not None:
            return self.refine
        return DEFAULT_REFINE if self.single_mse and self.strength is None and not self.prompts else 0

    @property
    def screening(self) -> Optional[Any]:
        """Stage 1's screen (search/runner.py's Screening), or None: only for a plain mse_ref search scored without
        DC-Solver ratios (the evaluator never screens those)."""
        if not (self.screen and self.single_mse and self.ratios is None):
            return None
        from autotune.search.runner import Screening

        return Screening()

    @property
    def single_mse(self) -> bool:
        """Refinement and validation choose by mse_ref, so they apply only to a plain mse_ref search."""
        return self.objectives == ("mse_ref",)


def _check_strength(strength: float, nfe: str, refine: int, ratios: Optional[str]) -> None:
    """A strength goes with one NFE, and not with the options that solve from pure noise (refine, ratios)."""
    if not 0.0 < strength < 1.0:  # NaN fails this too
        raise InputError(f"--strength {strength}: expected a fraction in (0, 1), like 0.6 (1 is a full run)")
    if not nfe.strip().isdigit():
        raise InputError(f"--strength: give one --nfe (got {nfe!r})")
    if refine or ratios is not None:  # an explicit --refine; the default does not refine an img2img search
        raise InputError("--strength: --refine and --ratios solve from pure noise; they do not apply to img2img")


# ------------------------------------------------------------------------------------------------- hooks
@contextlib.contextmanager
def quiet_step(description: str) -> Iterator[Optional[ProgressFn]]:
    """A step nobody watches: its events go nowhere."""
    yield None


@contextlib.contextmanager
def quiet_search(description: str, budget: int) -> Iterator[Optional[Callable[[Progress], None]]]:
    yield None


def _ignore(line: str) -> None:
    """Warnings nobody reads."""


@dataclass(frozen=True)
class JobHooks:
    """How a running job shows what it does; the defaults show nothing.

    ``step(description)``: a context around each long step (loading, references, refinement, validation,
    stage 2, the report set), yielding the ProgressFn its events go to (``progress_cli.step`` has this shape).
    ``search_progress(description, budget)``: a context around the search loop, yielding the callback that
    hears the runner's ``Progress`` after every batch (true evaluations and the best value so far).
    ``notify(line)``: a line for the user's attention (a Ray worker replaced, a CPR used off its grid).
    """

    step: Callable[[str], ContextManager[Optional[ProgressFn]]] = quiet_step
    search_progress: Callable[[str, int], ContextManager[Optional[Callable[[Progress], None]]]] = quiet_search
    notify: Callable[[str], None] = _ignore


QUIET = JobHooks()


@contextlib.contextmanager
def _step(hooks: JobHooks, description: str) -> Iterator[Optional[ProgressFn]]:
    """``hooks.step(description)`` on as many torch threads as the CPUs other processes leave free
    (evaluate/cpus.py: why)."""
    from autotune.evaluate.cpus import fit_threads_to_free_cpus

    fit_threads_to_free_cpus()
    with hooks.step(description) as progress:
        yield progress


# ----------------------------------------------------------------------------------------------- outcome
@dataclass(frozen=True)
class Scored:
    """One schedule with its figures on the report set."""

    name: str
    schedule: Schedule
    metrics: dict[str, Any]


@dataclass(frozen=True)
class RefinementNote:
    """Search-set mse_ref of stage 1's best before and after the gradient refinement of its time grid."""

    before: float
    after: float
    gave_up_after: int = 0  # the steps it ran when it gave up (RACE: another start's loss was far lower); 0: all
    quasi_newton: bool = False  # refined by L-BFGS, not Adam (QUASI_NEWTON)


@dataclass(frozen=True)
class ValidationNote:
    """The finalists scored on the validation set, the one chosen, and each one's search-set mse_ref."""

    set_id: str
    chosen: Finalist
    scored: list[Finalist]
    search_values: list[float]


@dataclass(frozen=True)
class JobOutcome:
    """What a job found and wrote.

    ``best`` is the schedule written to ``schedule_path`` (with its metadata); ``best_value`` its search-set
    value of the first objective. ``search`` is stage 1's SearchResult (trials, counts, Pareto front, resumed).
    ``ours`` and ``peers`` are the report set's rows (empty without ``score_report``).
    """

    config: JobConfig
    best: Schedule
    best_value: float
    search: SearchResult
    search_id: str
    eval_set: str
    study_url: Optional[str]  # the cache's URL, where the Optuna study lives; None without a store
    schedule_path: Optional[Path] = None
    pareto_path: Optional[Path] = None
    refinement: Optional[RefinementNote] = None
    validation: Optional[ValidationNote] = None
    stage2: Optional[Stage2] = None
    report_set: str = ""
    ours: list[Scored] = field(default_factory=list)  # the best (and, after stage 2, the unpruned one)
    peers: list[Scored] = field(default_factory=list)  # the named schedules at the best's NFE
    report_evaluator: Optional[Evaluator] = None  # report images sample through it
    # the distribution metrics of the report set's reference solution (the model's own samples): a few-step
    # schedule can score "better" than them (digits: class accuracy 0.99 at 5 steps, 0.970 converged)
    reference_metrics: dict[str, float] = field(default_factory=dict)
    model: Optional[Denoiser] = None  # as loaded
    seconds: float = 0.0  # wall time of the whole job
    t_min_search: Optional[SearchResult] = None  # the second search, ending at t_min, where it ran (T_MIN_SEARCH)

    @property
    def method(self) -> str:
        return self.config.search_method

    @property
    def searches(self) -> list[SearchResult]:
        """Stage 1's search, and the search ending at t_min where it ran (the schedule's metadata records each)."""
        return [self.search] + ([self.t_min_search] if self.t_min_search else [])

    @property
    def true_evaluations(self) -> int:
        """The searches' true evaluations (cache hits excluded)."""
        return sum(s.true_evaluations for s in self.searches)

    @property
    def budget_spent(self) -> float:
        """The searches' whole-set evaluations spent (a partial score counts its share)."""
        return sum(s.spent for s in self.searches)

    @property
    def search_seconds(self) -> float:
        """The search loops' wall time."""
        return sum(s.seconds for s in self.searches)

    def trial_records(self, store: Any = None) -> list[dict[str, Any]]:
        """Stage 1's trials as the store keeps them (trial_number, schedule_hash, metrics), for the report."""
        if store is not None:
            return store.trials(self.search_id)
        return [{"trial_number": t.number, "schedule_hash": t.hash, "metrics": t.row()} for t in self.search.trials]


# -------------------------------------------------------------------------------------------------- setup
@dataclass
class SearchSetup:
    """A job made ready to search: the model, the search set's evaluator with its reference solved, the
    strategy in its space, the search id, and the named schedules it competes with."""

    config: JobConfig
    model: Denoiser
    store: Any  # cache.store.Store or None
    evaluator: Evaluator
    strategy: Strategy
    space: Any  # ScheduleSpace or NFERangeSpace
    search_id: str
    t_start: float
    named_peers: tuple[Schedule, ...]
    sizes: SetSizes  # the search and validation sets' (search/set_sizes.py)
    references: dict[str, Any] = field(default_factory=dict)  # version -> Reference, shipped to Ray workers

    @property
    def study_url(self) -> Optional[str]:
        return self.store.url if self.store is not None else None

    @property
    def study_attrs(self) -> dict[str, Any]:
        c = self.config
        return {"model": c.model, "method": c.search_method, "nfe": c.nfe, "seed": c.seed, "budget": c.budget}


_HEAVY_MODULES = ("torch", "autotune.evaluate.evaluator", "autotune.search.runner", "autotune.search.strategy")


def load_checked_model(config: JobConfig, model: Optional[Denoiser] = None, hooks: JobHooks = QUIET) -> Denoiser:
    """``config.model`` loaded (unless given), refused when the job's options do not apply to it."""
    with hooks.step(f"loading {config.model}"):  # importing torch and the search modules is much of this wait
        for module in _HEAVY_MODULES:  # their import's wait belongs to this step, not to the first candidate's
            importlib.import_module(module)
        from autotune.models.registry import load_model

        # the driver keeps every core: it solves the search, validation and report references itself, and
        # waits idle while the Ray workers (one thread each) score candidates
        m = model if model is not None else load_model(config.model)
    check_guidance_applies(m, config.guidance, config.model)
    if config.stage2_budget and not m.units:
        raise AutotuneError(f"--stage2-budget: {config.model} has no prunable units to skip")
    if config.reuse and not config.stage2_budget:
        raise AutotuneError("--reuse: it applies to stage 2; give --stage2-budget too")
    if config.reuse and not reusable_for(m.units, config.guidance):
        raise AutotuneError(f"--reuse: {config.model} has no units whose output can be reused"
                            + (" (without guidance)" if config.guidance is None else ""))
    return m


def prepare_search(config: JobConfig, store: Any = None, *, model: Optional[Denoiser] = None,
                   hooks: JobHooks = QUIET) -> SearchSetup:
    """Load and check the model, build the search set's evaluator, the space and the strategy, and solve the
    search set's reference (once, here: the workers get it shipped)."""
    m = load_checked_model(config, model, hooks)
    from autotune.evaluate.evaluator import Evaluator

    low, high = config.nfe_range
    t_start, named_peers = named_peers_for(m.noise, low, high, config.strength, config.guidance, config.final)
    sizes = _set_sizes(config, m, [s for s in named_peers if s.nfe == high], hooks)
    evaluator = Evaluator(m, "search", size=sizes.search, seed=config.seed, store=store, prompts=config.prompts)
    if config.ratios is not None:
        _attach_ratios(evaluator, config, low, high, hooks)
    space, strategy, warm = _strategy(config, m.noise, t_start, named_peers, evaluator, store)
    if config.warm_start and (low != high or config.strength is not None):
        hooks.notify("warm start: not used (only a search at one NFE from pure noise takes one)")
    if warm:
        nfes = ", ".join(str(s.metadata["warm_start"]["nfe"]) for s in warm)
        hooks.notify(f"warm start: this model's best at NFE {nfes} (cache), regridded to NFE {high}")
    sid = _search_id(config, evaluator, space, warm)
    setup = SearchSetup(config, m, store, evaluator, strategy, space, sid, t_start, named_peers, sizes)
    # one NFE of each reference the candidates are scored against (evaluate/ids.py: ref_steps_for)
    ref_nfes = {evaluator.steps_for(n): n for n in range(low, high + 1)}
    with _step(hooks, f"reference solution, {evaluator.eval_set.size} samples") as progress:
        evaluator.progress = progress
        g = config.guidance
        for n in ref_nfes.values():
            setup.references[evaluator.reference_version(g, nfe=n)] = evaluator.reference(g, nfe=n)
            if config.strength is not None:  # img2img: solved from the images (the full reference's samples) at t_start
                setup.references[evaluator.reference_version(g, t_start, n)] = evaluator.reference(g, t_start, n)
    evaluator.progress = None
    return setup


def _search_id(config: JobConfig, evaluator: Evaluator, space: Any, warm: tuple[Schedule, ...]) -> str:
    """The id of the search ``config`` runs in ``space`` from the ``warm`` starts: its trials' key in the store."""
    from autotune.evaluate.ids import DEFAULT_REF_STEPS
    from autotune.search.runner import search_id

    low, high = config.nfe_range
    extra: dict[str, Any] = {} if config.single_mse else {"objectives": config.objectives}  # ids kept as they were
    if warm:  # other starts, another search (without them, the ids are those of before warm starts existed)
        extra["warm"] = [s.hash() for s in warm]
    if config.ratios is not None:
        extra["ratios"] = config.ratios
    screening = config.screening
    if screening is not None:  # a screened search tells its strategy other values: its own id
        extra["screen"] = [screening.samples, screening.factor]
    ref_steps = {evaluator.steps_for(n) for n in range(low, high + 1)}
    if ref_steps != {DEFAULT_REF_STEPS}:  # trials scored against another reference than before it existed
        extra["ref_steps"] = sorted(ref_steps)
    return search_id(model=evaluator.fingerprint, nfe=low if low == high else config.nfe,
                     method=config.search_method, budget=config.budget, seed=config.seed, guidance=config.guidance,
                     eval_set=evaluator.eval_set.id, batch=config.batch, space=repr(space), **extra)


def _attach_ratios(evaluator: Evaluator, config: JobConfig, low: int, high: int, hooks: JobHooks) -> None:
    from autotune.search.dc_fit import attach_ratio_source

    attach_ratio_source(evaluator, config.ratios)  # a bad spec or CPR file fails here, before any evaluation
    cpr = getattr(evaluator.ratio_source, "cpr", None)
    if cpr is not None:  # a CPR of another model fails here too, and a grid it was not fitted on is said
        cpr.check_model(evaluator.fingerprint)
        for n in range(low, high + 1):
            for note in cpr.outside_grid(n, config.guidance):
                hooks.notify(f"warning: {note}")


def _set_sizes(config: JobConfig, model: Denoiser, probes: list[Schedule], hooks: JobHooks) -> SetSizes:
    """The search and validation sets' sizes: as given, else by the cost of a probe run (search/set_sizes.py). No
    probe for prompts or img2img (latent pipelines: never cheap), nor when both sizes were given."""
    from autotune.evaluate.sets import eval_set_for
    from autotune.search.set_sizes import PROBE_NOISES, choose_sizes, probe

    left = config.set_size == 0 or (config.validate is None and config.single_mse)
    seconds = None
    if left and probes and not config.prompts and config.strength is None:
        seconds = probe(model, probes[0], eval_set_for(model, "search", PROBE_NOISES, seed=config.seed))
    sizes = choose_sizes(seconds, config.budget, config.set_size, config.validate)
    if sizes.cheap:
        hooks.notify(f"a cheap model ({probes[0].name} on {PROBE_NOISES} noises: {1e3 * sizes.probe_seconds:.1f} ms): "
                     f"{sizes.search} search noises, {sizes.validation} for validation"
                     + (f", {sizes.refine} for the refinement" if sizes.refine else ""))
    return sizes


def named_peers_for(noise: NoiseSchedule, low: int, high: int, strength: Optional[float], guidance: Optional[float],
                    final: str = "zero"):
    """(the time the search starts at, the named schedules it competes with at each NFE in low..high: each where its
    name says it ends, and the NAMED ones where ``final`` says too, the search's seeds)."""
    from autotune.sampling.named import NAMED, SIGMA_MIN_NAMED, build, img2img_peers, names_for

    if strength is None:
        peers = [build(n, noise, k) for k in range(low, high + 1) for n in names_for(noise)]
        if final != "zero":  # (bh1's are there already, by their -smin names)
            peers += [build(n, noise, k, final) for k in range(low, high + 1) for n in NAMED
                      if f"{n}-smin" not in SIGMA_MIN_NAMED]
        t_start = float(noise.T)
    else:
        t_start, peers = img2img_peers(noise, low, strength)
    return t_start, tuple(dataclasses.replace(s, guidance=guidance) for s in peers)


def _check_solvers(solvers: tuple[str, ...]) -> None:
    from autotune.space.encoding import SPACE_SOLVERS

    bad = [s for s in solvers if s not in SPACE_SOLVERS]
    if bad or len(set(solvers)) != len(solvers):
        why = f"{bad[0]!r} is not one a search step can choose" if bad else "a solver is listed twice"
        raise InputError(f"--solvers {','.join(solvers)}: {why} (one of {', '.join(SPACE_SOLVERS)}; two-call, "
                         "stochastic and first-step-only solvers are not in the fixed-NFE search space)")


def _strategy(config: JobConfig, noise: NoiseSchedule, t_start: float, named_peers: tuple[Schedule, ...],
              evaluator: Any, store: Any):
    """The space and the strategy, seeded with the named schedules and, from the store, the warm starts."""
    from autotune.search.nfe_space import NFERangeSpace
    from autotune.search.strategy import SearchContext, make_strategy
    from autotune.search.warm import warm_starts
    from autotune.space.encoding import ScheduleSpace

    low, high = config.nfe_range
    t_end = 0.0 if config.final == "zero" else float(noise.t_min)
    seeds = tuple(s for s in named_peers if s.t_start == t_start and s.times[-1] == t_end)  # those in its space
    chosen = {"solvers": config.solvers} if config.solvers else {}
    space = ScheduleSpace(high, t_start, t_end, ratio_range=None, guidance=config.guidance, **chosen)
    warm: tuple[Schedule, ...] = ()
    if low != high:
        space = NFERangeSpace(space, low, high)
    elif config.warm_start and config.strength is None:
        warm = warm_starts(store, evaluator.fingerprint, evaluator.eval_set.id, space, noise, config.guidance,
                           exclude=[s.hash() for s in seeds])
    strategy = make_strategy(config.search_method,
                             SearchContext(space, noise, seeds + warm, config.seed, config.objectives))
    if getattr(strategy, "partial_scores", False) and config.ratios is not None:  # the evaluator scores those whole
        raise InputError(f"--method {config.search_method} scores candidates on part of the search set first, "
                         "which a search with --ratios cannot (each candidate's ratios are fitted on all of it)")
    return space, strategy, warm


def open_pool(setup: SearchSetup, hooks: JobHooks = QUIET) -> Pool:
    """The pool that scores candidates: in this process, or Ray workers holding the model."""
    from autotune.search.latency import LATENCY, LatencySpec
    from autotune.search.runner import EvaluatorSpec, InProcessPool, RayPool

    c = setup.config
    latency = LatencySpec() if LATENCY in c.objectives else None
    if c.workers == 0:
        return InProcessPool(setup.evaluator, latency)
    spec = EvaluatorSpec(c.model, "search", setup.sizes.search, c.seed, setup.study_url, setup.evaluator.ref_steps,
                         ratios=c.ratios, prompts=c.prompts)
    with hooks.step(f"starting Ray ({c.workers} workers)" if c.address is None else f"joining Ray at {c.address}"):
        return RayPool(spec, c.workers, c.address, references=setup.references, latency=latency,
                       timeout_s=c.candidate_timeout or None, notify=hooks.notify)


def run_stage1(setup: SearchSetup, pool: Pool, hooks: JobHooks = QUIET, where: str = "") -> SearchResult:
    """The search loop over the strategy (resumed from the store when this search was cut short), every
    trial recorded in the store and in its Optuna study; the runner's SearchResult. ``where`` follows the NFE
    on its bar."""
    from autotune.search.optuna_record import StudyRecorder
    from autotune.search.runner import run_search

    c = setup.config
    recorder = StudyRecorder(setup.study_url, setup.search_id, setup.space, c.objectives, setup.study_attrs)
    with hooks.search_progress(f"{c.search_method} NFE {c.nfe}{where}", c.budget) as on_batch:
        return run_search(setup.strategy, pool, c.budget, objectives=c.objectives, batch_size=c.batch,
                          store=setup.store, sid=setup.search_id, recorder=recorder, callback=on_batch,
                          screening=c.screening, set_size=setup.evaluator.eval_set.size)


# ---------------------------------------------------------------------------------------------- the job
REFINED_LABEL = "refined"  # stage 1's best refined, as validation names it


def refinement_suffix(gave_up_after: int, quasi_newton: bool = False) -> str:
    """What a refinement adds to its label and line: that it went on by L-BFGS (QUASI_NEWTON), that it gave up
    after ``gave_up_after`` steps (GIVE_UP; 0: it did not)."""
    words = (["L-BFGS"] if quasi_newton else []) + ([f"gave up after {gave_up_after} steps"] if gave_up_after else [])
    return f" ({', '.join(words)})" if words else ""


@dataclass
class _Winner:
    """The schedule the job will write, as the stages after the search replace it."""

    schedule: Schedule
    value: float
    refined: Optional[Schedule] = None
    refined_label: str = REFINED_LABEL  # its finalist's label, as _refine named it (POLISH finds it by that label)
    refinement: Optional[RefinementNote] = None
    # the refinement of a second start (a named schedule as good as stage 1's best), a validation finalist
    also_refined: list[tuple[str, Schedule]] = field(default_factory=list)
    validation: Optional[ValidationNote] = None
    validation_meta: Optional[dict[str, Any]] = None
    stage2: Optional[Stage2] = None
    refine_set: Optional[str] = None  # the id of the set the refinements fitted (REFINE_SET)
    # POLISH: by a refined finalist's label, what takes it on by L-BFGS (it returns None where L-BFGS found
    # no lower loss); only the finalists whose descent met a stiff direction have one
    polish: dict[str, Callable[[], Optional[Schedule]]] = field(default_factory=dict)
    # SCALE_FIT: what fits validation's choice's data scales on the refinement set (None: no refinement ran)
    fit_scales: Optional[Callable[[Schedule], Optional[Schedule]]] = None
    t_min_search: Optional[tuple[str, SearchResult]] = None  # T_MIN_SEARCH: its search id and result, where it ran


def run_search_job(config: JobConfig, store: Any = None, *, model: Optional[Denoiser] = None,
                   hooks: JobHooks = QUIET) -> JobOutcome:
    """Run the whole job: search, refine, validate, stage 2; write the schedule (and the Pareto front); score
    the best and its named peers on the report set. ``store`` None keeps evaluations in memory (no resume);
    ``model`` is a Denoiser already loaded for ``config.model``."""
    started = time.perf_counter()
    setup = prepare_search(config, store, model=model, hooks=hooks)
    pool = open_pool(setup, hooks)
    try:
        result = run_stage1(setup, pool, hooks)
        winner = _Winner(result.best, result.best_value)
        if config.refine_steps and not result.best.stochastic:
            _refine(setup, result, winner, hooks, pool)
        if config.validating and config.single_mse:
            _validate(setup, result, winner, hooks, pool)
        if config.stage2_budget:
            _stage2(setup, pool, winner, hooks)
        best = _with_metadata(setup, result, winner)
        written = _write_files(config, best, result)
        report = _score_report(setup, result, best, winner.stage2, hooks, pool) if config.score_report else {}
    finally:
        pool.close()
    return JobOutcome(config, best, winner.value, result, setup.search_id, setup.evaluator.eval_set.id,
                      setup.study_url, refinement=winner.refinement, validation=winner.validation,
                      stage2=winner.stage2, model=setup.model, seconds=time.perf_counter() - started,
                      t_min_search=winner.t_min_search[1] if winner.t_min_search else None, **written, **report)


# Where the refinement's descent ends depends on where it starts (search/gradient.py's docstring: on digits-flow NFE 5
# seed 1, stage 1's best refined to 1.03e-3 on the report set, the best named schedule, 4 % worse on the search set,
# to 6.6e-4). When the search has not moved clear of the named schedules (the best named one within this factor of
# stage 1's best on the search set), that named schedule is refined too and validation chooses between the two. A
# search that found much better (digits NFE 5: stage 1 ~1.6x below the best named) pays nothing for it.
SECOND_START_SLACK = 1.15


def second_start(evaluator: Evaluator, best: Schedule, best_value: float, named: list[Schedule]
                 ) -> Optional[Schedule]:
    """The named schedule of ``best``'s NFE with the lowest search-set mean (already scored: the search's seeds),
    when it is not ``best`` and within SECOND_START_SLACK of ``best_value``; else None."""
    values = [(evaluator.evaluate(s)["mse_ref"], i) for i, s in enumerate(named)
              if s.nfe == best.nfe and s.t_start == best.t_start and s.times[-1] == best.times[-1]
              and s.hash() != best.hash()]
    values = [(v, i) for v, i in values if math.isfinite(v)]
    if not values or not math.isfinite(best_value):
        return None
    value, i = min(values)
    return named[i] if value <= SECOND_START_SLACK * best_value else None


# USF's analytic first step (sampling/solvers/afs.py) spends no model call at T, where the state is almost pure noise,
# so a schedule of N calls gets N + 1 steps. Named schedules with it, scratch runs on 256 report noises (2026-12-04):
# digits NFE 4 unipc-bh2-o2 1.72e-2 -> 6.93e-3, NFE 5 7.49e-3 -> 5.06e-3; refined 40 steps from there, digits NFE 5
# reached 1.06e-3 (from unipc-bh2-o2 itself 5.92e-3; the default search's winner ~2.2e-3). On the v-prediction
# rgb32-v, whose data is not centred, it is worse unrefined (NFE 5 unipc-bh1-o3 1.02e-2 -> 1.61e-2). Stage 1's
# fixed-step space has no such step, so the job refines the best of these as one more finalist and validation
# chooses, on every model: where the estimate is poor, the finalist loses there.
# USF's estimate x0 = 0 is the data's mean only for centred data, and a step's data_mean can hold the mean instead
# (E[x0 | x_T] when alpha_T is ~0). Measured and not used here (2026-12-04, 256 report noises): rgb32-v NFE 5
# unipc-bh1-o2+afs unrefined 1.38e-2 -> 9.01e-3 with the reference samples' channel mean (-0.16 / -0.12 / -0.22; the
# plain unipc-bh1-o3 1.04e-2), but refined 40 steps it ends at 5.98e-3 where the x0 = 0 start reaches 4.83e-3;
# digits (mean -0.40) unrefined within +-3 % either way. The refinement moves the later steps around the estimate,
# and the start that scores best unrefined is not the one that refines best, so the job keeps USF's x0 = 0.
# Where the schedule ends: the space ends every schedule at t = 0, where diffusers' UniPC bh1 (the bench's peer:
# DIFFUSERS_PEERS) stops at t_min; where sigma_min is large that peer is the best few-step one: T_MIN_STARTS.
AFS_NAMED = ("unipc-bh1-o2", "unipc-bh1-o3", "unipc-bh2-o2", "unipc-bh2-o3", "dpmsolver++2m", "dpmsolver++3m")


def analytic_first_start(evaluator: Evaluator, noise: NoiseSchedule, best: Schedule, final: str = "zero"
                         ) -> Optional[Schedule]:
    """The AFS_NAMED schedule at ``best``'s NFE with an analytic first step (``with_analytic_first``) of the lowest
    search-set mean, when ``best`` starts from pure noise at T with at least two calls and one scores finite; else
    None."""
    from autotune.sampling.named import with_analytic_first

    if best.nfe < 2 or best.final_denoise or best.t_start != float(noise.T):
        return None
    return _lowest(evaluator, [dataclasses.replace(with_analytic_first(name, noise, best.nfe, final),
                                                   guidance=best.guidance) for name in AFS_NAMED])[1]


def _lowest(evaluator: Evaluator, schedules: list[Schedule]) -> tuple[float, Optional[Schedule]]:
    """The lowest finite search-set mean among ``schedules`` and its schedule (inf, None when none is finite)."""
    values = [(evaluator.evaluate(s)["mse_ref"], i) for i, s in enumerate(schedules)]
    values = [(v, i) for v, i in values if math.isfinite(v)]
    return (min(values)[0], schedules[min(values)[1]]) if values else (math.inf, None)


# T_MIN_STARTS: stopping at t_min (diffusers' final_sigmas_type="sigma_min") leaves noise of sigma_min in the sample
# but spares the last, infinite log-SNR step onto t = 0, and where sigma_min is large the named schedules ending there
# score well below their t = 0 versions. Search-set means, the best AFS_NAMED schedule ending at t_min over the best
# named one ending at 0 (scratch, 2026-12-06; over the best AFS_NAMED one, as the job compares, it can only be lower):
# SD 1.x's schedule (sigma_min 0.029) 0.66 on rgb32-eps-sd NFE 4, 0.61-0.71 on a 64-d mixture (gmm64's data, exact
# denoiser), 0.91 on the 2-d ring; gmm64 (sigma_min 0.0105) 0.84-0.93 at NFE 4-10; the digits family (digits 0.01,
# guided 2, the DiT and flow models 0.001) 0.94-1.02. Refined from there, such a start carries that gain or not. The
# default job with these starts vs without (1024 report noises; mean / p99, each over the best named schedule's; the
# starts where the ratio is below T_MIN_MARGIN): the 64-d mixture with SD 1.x's schedule NFE 4 0.255 / 0.271 -> 0.156
# / 0.069 (the AFS start ending at t_min chosen), NFE 5 0.127 / 1.33 -> 0.168 / 0.177 (the named one: the tail the
# search ending at 0 missed), NFE 8 0.301 / 0.180 -> 0.221 / 0.517; gmm64 NFE 10 0.293 / 1.02 -> 0.140 / 0.101, NFE 5,
# 6, 8 the same schedule as without (the starts refined, not chosen; +9 / +19 / +16 s of job on a loaded machine);
# rgb32-eps-sd NFE 4 (bench/search.py) 0.57 of the best peer as before: the named start ending at t_min had the lowest
# validation mean (3.36e-3 vs 3.44e-3) but a worse tail, and validation's rule chose the refinement without shifts; a
# whole search ending at t_min reached 0.37 there (JobConfig.final "sigma_min"; docs/RESULTS.md, session 40: stage 1
# there finds what a refinement from the named schedules does not). But on gmm64 a whole search ending at t_min gave
# NFE 5 0.167 and NFE 6 0.135 where the default gives 0.138 / 0.107 (NFE 10 the same 0.140), so where the rule fires
# it adds starts; it does not move the space. The margin keeps the digits family out, where a named schedule ending at
# t_min gains a few per cent at most: not what a refinement from there would need to win, and two more starts would
# lengthen the README's search.
T_MIN_MARGIN = 0.9


def t_min_starts(evaluator: Evaluator, noise: NoiseSchedule, best: Schedule, analytic_first: bool = True
                 ) -> list[Schedule]:
    """The AFS_NAMED schedule at ``best``'s NFE built to end at the model's t_min of the lowest search-set mean, and
    the lowest with an analytic first step (unless ``analytic_first`` is False), when the first is below
    T_MIN_MARGIN x the lowest of them built to end at 0; else none (and none where ``best`` does not start from pure
    noise at T and end at 0 with two calls or more, or t_min is 0)."""
    from autotune.sampling.named import build

    if best.nfe < 2 or best.final_denoise or best.t_start != float(noise.T):
        return []
    if best.times[-1] != 0.0 or noise.t_min <= 0:  # it ends elsewhere already, or the model has no t_min
        return []

    def named(final: str) -> list[Schedule]:
        return [dataclasses.replace(build(n, noise, best.nfe, final), guidance=best.guidance) for n in AFS_NAMED]

    at_zero, _ = _lowest(evaluator, named("zero"))
    at_t_min, start = _lowest(evaluator, named("sigma_min"))
    if start is None or not at_t_min < T_MIN_MARGIN * at_zero:
        return []
    afs = analytic_first_start(evaluator, noise, best, "sigma_min") if analytic_first else None
    return [start] + ([afs] if afs is not None else [])


# T_MIN_SEARCH: where T_MIN_STARTS fire, a whole search ending at t_min found what a refinement from the named
# schedules ending there did not: rgb32-eps-sd NFE 4 (bench/search.py) 0.37 of the best peer's mean with
# `--final sigma_min` (stage 1, its refinements and the AFS start all ending at t_min), 0.57 with the default job and
# its two starts ending at t_min. But no space wins everywhere: on gmm64 a whole search ending at t_min gave NFE 5 0.167
# and NFE 6 0.135 where the default gives 0.138 / 0.107. So where the rule fires the job runs a second stage 1 with
# the same budget in the space ending at t_min (its own search id: resumed as the first is), refines its best as one
# more start, and validation chooses. Measured (session 43): rgb32-eps-sd NFE 4 (bench/search.py, the default job)
# 0.57 -> 0.37 [0.35, 0.38] of uni1-o2's mean, p99 0.41 (validation chose this start: 2.24e-3 where the next
# finalist had 3.36e-3), 2601 s of job (1575 s before; one thread, the other core busy); gmm64 NFE 5, 6, 8, 10 (the
# job with and without it, scratch, 1024 report noises) the same schedule written, +19 to +28 s of job.
T_MIN_SEARCH = True
T_MIN_SEARCH_LABEL = "refined from the search ending at t_min"


def t_min_setup(setup: SearchSetup) -> SearchSetup:
    """``setup``'s search moved into the space ending at the model's t_min (T_MIN_SEARCH): its config, named
    schedules (the seeds), space, strategy and search id; the model, store and sets are shared."""
    config = dataclasses.replace(setup.config, final="sigma_min")
    low, high = config.nfe_range
    noise = setup.model.noise
    t_start, peers = named_peers_for(noise, low, high, config.strength, config.guidance, config.final)
    space, strategy, warm = _strategy(config, noise, t_start, peers, setup.evaluator, setup.store)
    return dataclasses.replace(setup, config=config, strategy=strategy, space=space, named_peers=peers,
                               search_id=_search_id(config, setup.evaluator, space, warm))


# The model-time shifts can fit the search set's tail more than fresh noise's. Guided digits (guidance 4) NFE 8,
# stage 1's best refined 40 steps, on the 1024 report noises (mean / p99): with shifts 1.59e-3 / 1.38e-2 (on its own
# 128 noises the p99 was 3.22e-3), without them 1.66e-3 / 7.98e-3, where stage 1 was at 3.12e-3 / 8.97e-3 and the
# best diffusers peer at 3.99e-3 / 9.29e-3. Elsewhere the shifts win: digits NFE 5 2.24e-3 / 1.54e-2 with them,
# 3.12e-3 / 1.61e-2 without; guidance 2 NFE 4 9.01e-3 / 5.36e-2 vs 1.16e-2 / 4.54e-2. So both are refined and
# validation's tail-aware rule (search/selection.py) chooses, for the price of a second refinement (scratch runs,
# 2026-12-04; a cosine-decayed step and 512 search noises were tried too: the first worse, the second 8x the time).
NO_SHIFT_LABEL = "refined without shifts"

# A refinement gives up halfway when its best loss is still over GIVE_UP x the lowest loss any refinement has
# reached (the same loss on the same noises; RACE: in which order), keeping its best iterate as a finalist. Loss
# after 40 steps / after 20, refining from the best named schedule with shifts, without, and from the AFS start
# (scratch, 2026-12-05, search-set sizes of the job): digits NFE 4 0.93 / 0.87 / 0.81, NFE 5 0.86 / 0.96 / 0.72,
# guidance 4 NFE 8 0.79 / 0.84 / 0.85, gmm64 NFE 5 0.51 / 0.65 / 0.81, digits-flow NFE 5 0.97 / 0.80 / 0.31. The one
# fall over 2x was digits-flow's AFS start, 27x above the lowest at halfway and still 8x above at the end. The
# README's digits search, whose AFS start refines to a third of the others' loss, saves half of its refinement
# without shifts.
GIVE_UP = 3.0

# RACE: the starts (the AFS start, stage 1's best, the second start, stage 1's best without shifts) each run the first
# half of their steps, then go on from the lowest loss up, each only while its best is within GIVE_UP x the lowest
# loss reached, the earlier ones' finished runs included. Run one after the other, the first had no bar, so the
# order decided which start gave up: with stage 1's best first the README's digits search refined it in full (36.6
# s) though the AFS start, the finalist chosen, reached a third of its loss; with the AFS start first digits-flow
# NFE 5 refined that start in full (+32 s; 27x above the others halfway). Raced, each gives up where it would have
# gone last (scratch, 2026-12-06: digits NFE 5 stage 1's best after 20 steps, digits-flow NFE 5 the AFS start).
# Not the race search/gradient.py tells of (10 steps on 32 noises, the lowest alone went on): here every start fits
# the whole set, and all within GIVE_UP go on, as before.


# QUASI_NEWTON: an Adam descent that backs off (BACKOFF in search/gradient.py: an iterate far above the best) has
# overshot a stiff direction of the loss, where Adam's steps (at first lr x the gradient's sign in every parameter)
# are too long, and its halved steps then crawl along the others. Measured on rgb32-v (scratch, 2026-12-06, the AFS
# start unipc-bh1-o2+afs, 128 search noises): at NFE 6 the loss along the first interior time alone rises 1.6x
# within 0.0024 of its minimum (the second time: 1.35x at +0.002), where Adam's first step moves them 0.007 and
# 0.016. Adam backed off and ended its 40 steps at rms 4.10e-3 (report mean 4.35e-3, 0.75x the best peer); L-BFGS
# (torch's, strong Wolfe line search: it learns that curvature) at 3.29e-3 (report 3.43e-3, 0.59x). L-BFGS is not
# the better optimiser everywhere: rgb32-v NFE 5 (Adam backs off there too) 7.78e-3 against Adam's 4.78e-3; digits
# NFE 5 (no backoff) 1.22e-3 vs 1.14e-3 (report 1.32e-3 vs 1.25e-3); Adam's first 20 steps and L-BFGS's 20 after
# them were worse than the better of the two in all 3. So every start whose Adam descent backed off in its first
# half (within GIVE_UP of the lowest) is refined by L-BFGS to halfway too, and the lower of the two goes on in its
# place: at halfway rgb32-v NFE 6's AFS start L-BFGS (4.08e-3 vs 4.54e-3), NFE 5's Adam (5.89e-3 vs 1.08e-2), 20
# more evaluations a start that backed off. (Only the lowest such start had one at first: at NFE 6 that was stage
# 1's best, while validation chose the AFS start, refined by Adam: 0.75x the best peer.) A job whose descents do not
# back off runs as before.


def _refine(setup: SearchSetup, result: SearchResult, winner: _Winner, hooks: JobHooks,
            pool: Optional[Pool] = None) -> None:
    from autotune.search.gradient import Descent, QuasiNewtonDescent

    c, evaluator = setup.config, setup.evaluator
    fitted = evaluator  # the set the refinement fits: the search set, or a larger one of its kind (REFINE_SET: why)
    if setup.sizes.refine and setup.sizes.refine != evaluator.eval_set.size:
        from autotune.evaluate.evaluator import Evaluator

        fitted = Evaluator(setup.model, "search", size=setup.sizes.refine, seed=c.seed, store=setup.store,
                           prompts=c.prompts)
        with _step(hooks, f"reference solution, {fitted.eval_set.size} samples for the refinement") as progress:
            fitted.progress = progress
            reference = fitted.reference(c.guidance, nfe=result.best.nfe)
            fitted.progress = None
    else:
        reference = setup.references[evaluator.reference_version(c.guidance, nfe=result.best.nfe)]
    # the compensation ratios move with the grid unless --ratios fits them for every scored schedule itself
    fit_ratios = c.ratios is None
    what = "times, shifts and ratios" if fit_ratios else "times and shifts"
    split = _on_workers(pool, "gradient_split", evaluator.fingerprint)
    # only validation can choose between two refined grids: without it (or with several objectives) no second start
    # nor refinement without shifts, and the named schedules are not scored for one
    validated = c.validating and c.single_mse
    other = None
    if validated:
        other = second_start(evaluator, result.best, result.best_trial.mse_ref, list(setup.named_peers))

    winner.refine_set = fitted.eval_set.id
    # the starts, each (label, what the step line calls it, schedule, shifts move)
    starts: list[tuple[str, str, Schedule, bool]] = []
    if validated and c.analytic_first and c.strength is None and c.nfe_range[0] == c.nfe_range[1]:
        with _step(hooks, "scoring named schedules with an analytic first step"):  # AFS_NAMED: why
            afs = analytic_first_start(evaluator, setup.model.noise, result.best, c.final)
        if afs is not None:
            starts.append((f"refined from {afs.name}", f"from {afs.name}", afs, True))
    starts.append((REFINED_LABEL, what, result.best, True))
    if validated and c.strength is None and c.final == "zero" and c.nfe_range[0] == c.nfe_range[1]:
        with _step(hooks, "scoring named schedules ending at t_min"):  # T_MIN_STARTS: why
            ending = t_min_starts(evaluator, setup.model.noise, result.best, c.analytic_first)
        if ending and T_MIN_SEARCH:  # T_MIN_SEARCH: why
            at_t_min = t_min_setup(setup)
            winner.t_min_search = (at_t_min.search_id, run_stage1(at_t_min, pool, hooks, where=" to t_min"))
            best_there = winner.t_min_search[1].best
            if best_there.hash() not in {s.hash() for s in ending}:
                starts.append((T_MIN_SEARCH_LABEL, "the t_min search's best", best_there, True))
        starts += [(f"refined from {s.name} to t_min", f"from {s.name} to t_min", s, True) for s in ending]
    if other is not None:  # second_start: why
        starts.append((f"refined from {other.name}", f"from {other.name} too", other, True))
    if validated:  # NO_SHIFT_LABEL: why
        starts.append((NO_SHIFT_LABEL, f"{'times and ratios' if fit_ratios else 'times'} without shifts",
                       result.best, False))

    half = c.refine_steps // 2

    def descent(kind: Any, start: Schedule, shifts: bool, steps: int = c.refine_steps) -> Any:  # Adam or L-BFGS
        return kind(setup.model, start, fitted.eval_set, reference, iterations=steps,
                    samples=REFINE_SAMPLES, ratios=fit_ratios, split=split, shifts=shifts)

    # RACE: every start to halfway, then on from the lowest loss up while within GIVE_UP x the lowest
    runs: list[Any] = []
    for _, description, start, shifts in starts:
        line = f"refining {description} (steps 1-{half} of {c.refine_steps})"
        with _step(hooks, line) if half else contextlib.nullcontext():
            runs.append(descent(Descent, start, shifts))
            runs[-1].halfway()
    lowest = min(run.best_loss for run in runs)  # the lowest loss any refinement has reached
    quasi_newton = _quasi_newton_twins(runs, starts, lowest, hooks, half, c.refine_steps,
                                       functools.partial(descent, QuasiNewtonDescent))
    lowest = min(run.best_loss for run in runs)
    finished: dict[int, tuple[Schedule, float, int]] = {}  # by start: the schedule, its search mean, gave up after
    for rank, i in enumerate(sorted(range(len(runs)), key=lambda i: runs[i].best_loss)):
        description, run = starts[i][1], runs[i]
        if rank and run.above(GIVE_UP * lowest):  # the lowest at halfway always goes on
            done = run.give_up()
        else:
            verb = "L-BFGS:" if i in quasi_newton else "refining"  # STEP_LINES
            with _step(hooks, f"{verb} {description} (steps {half + 1}-{c.refine_steps})"):
                done = run.finish()
        lowest = min([lowest, *done.losses])
        schedule, value = _as_evaluated(evaluator, done.schedule)
        finished[i] = (schedule, value, len(done.losses) if done.gave_up else 0)

    def polish(i: int) -> Optional[Schedule]:  # POLISH: why; L-BFGS's own descent goes on, its history kept
        steps = polish_steps(c.refine_steps)
        run = runs[i] if i in quasi_newton else descent(QuasiNewtonDescent, finished[i][0], starts[i][3], steps)
        before = run.best_loss  # a fresh descent's is inf: its first loss is the start's
        done = run.go_on(steps)  # a fresh one's from 0 evaluations: its own budget
        if not (done.losses and min(done.losses) < min(before, done.losses[0])):
            return None
        return _as_evaluated(evaluator, done.schedule)[0]

    def fit_scales(schedule: Schedule) -> Optional[Schedule]:  # SCALE_FIT: why
        run = QuasiNewtonDescent(setup.model, schedule, fitted.eval_set, reference, iterations=SCALE_FIT_STEPS,
                                 samples=REFINE_SAMPLES, split=split, move_grid=False, shifts=False, data_scales=True)
        done = run.finish()
        if not (done.losses and min(done.losses) < done.losses[0]):
            return None
        return _as_evaluated(evaluator, done.schedule)[0]

    if validated and SCALE_FIT_STEPS:
        winner.fit_scales = fit_scales
    for i, (label, *_) in enumerate(starts):  # the finalists in the starts' order
        schedule, value, stopped = finished[i]
        named = label + refinement_suffix(stopped, i in quasi_newton)  # as validation names it
        if label == REFINED_LABEL:
            winner.refined, winner.refined_label = schedule, named
            winner.refinement = RefinementNote(result.best_trial.mse_ref, value, stopped, i in quasi_newton)
        else:
            winner.also_refined.append((named, schedule))
        if i in quasi_newton or runs[i].backoffs:  # a stiff direction met on the way (POLISH: why only there)
            winner.polish[named] = functools.partial(polish, i)
    if winner.refinement.after < result.best_trial.mse_ref and c.single_mse:
        winner.schedule, winner.value = winner.refined, winner.refinement.after


# POLISH: the refinements stop after --refine steps, and where a descent met a stiff direction its loss is still
# falling fast there. Scratch (2026-12-06, /work/bw/s35: lbfgs.py, 128 search noises, report mean on 1024 noises
# / the best peer's, uni1-o3 on rgb32-v at both NFE): rgb32-v NFE 6's AFS start by Adam 40 steps rms 4.10e-3,
# report 4.35e-3 (0.75x); then 20 more of L-BFGS 3.71e-3, 40 more 2.88e-3 (report 3.06e-3, 0.53x, p99 0.80x);
# L-BFGS alone 40 / 60 / 80 steps 3.29e-3 / 2.75e-3 / 2.66e-3 (report 2.88e-3, 0.50x, p99 0.67x). NFE 5's AFS
# start by Adam 40 steps 4.78e-3 (report 4.85e-3, 0.51x); then L-BFGS 20 / 40 more 4.32e-3 / 4.11e-3 (report
# 4.41e-3, 0.47x, p99 0.66x). So after validation has chosen, its choice, when a refinement that backed off (or
# that L-BFGS took), goes on by L-BFGS for POLISH_SHARE x --refine evaluations on the refinements' set, and is
# scored on validation again: written when its selection value is lower. Digits NFE 5 gains too (the README's job
# polishing its AFS start: report mean 1.27e-3 -> 1.11e-3, 5.28x -> 6.03x the best named schedule), but its
# descents never back off, and 40 steps cost it 38 s: with them the README's command took 320 s in a fresh venv
# (over its 5 minutes), so a descent that did not back off is not polished. A refinement by Adam is polished by a
# fresh L-BFGS (Adam's history is no curvature; on rgb32-v 20 L-BFGS steps after Adam's 20 did worse than Adam's
# 40; here Adam has had its 40); one that its L-BFGS twin took goes on by that descent, its curvature pairs kept:
# a fresh one forgets them, and rgb32-v NFE 6's AFS start by L-BFGS 80 in one go reached report mean 2.88e-3 (0.495x
# the best peer, scratch above) where the job's 40, then a fresh 40, reached 3.00e-3 (0.52x). With the descent going
# on, the job (`bench/search.py --models rgb32-v --nfe 6`): 2.88e-3, 0.495x [0.452, 0.540], p99 0.67x.
# With the twins for every start that backed off (QUASI_NEWTON), `bench/search.py --models rgb32-v`: NFE 5 0.51 ->
# 0.47 [0.44, 0.49] the best peer's mean (the AFS start by Adam, polished: the scratch figure to the digit), NFE 6
# 0.75 -> 0.52 [0.47, 0.56] (its AFS start's twin won, polished: validation mean 4.87e-3 -> 3.43e-3); p99 0.66 /
# 0.71; 689 s / 798 s more search job (one thread). gmm64 NFE 6 (its AFS descent backs off) seemed to lose on the
# 1024 report noises (0.15 -> 0.17, p99 0.12 -> 2.60 the best peer's), but its schedules switch mode on about 0.5 %
# of noises, and the p99 of 1024 sits on that cliff: on 3 x 16384 fresh noises (scratch, 2026-12-06) the polished
# finalist validation chose is lower than the unpolished one in the mean (1.88e-3 / 1.40e-3 / 1.40e-3 vs 2.27e-3 /
# 1.84e-3 / 1.89e-3), in the switches (errors over 0.05: 83 / 62 / 64 vs 90 / 69 / 73) and in the p99 (1.0e-3 vs
# 4.3e-3 on the first set). `bench/search.py --models gmm64 --report-size 16384`: NFE 4-10 0.18 / 0.097 / 0.088 /
# 0.19 / 0.054 the best peer's mean, p99 0.075 / 0.032 / 0.033 / 0.42 / 0.008, each within its whole 95 % interval.
# STEP_LINES: short, to stay on one line in an 80-column terminal (a longer one folds onto a second there,
# progress_cli._columns), so the L-BFGS lines do not repeat "refining" and the polish's do not name the finalist
# (its label can run to 70 characters).
POLISH_SHARE = 1.0  # the polish's evaluations, as a share of a start's refinement steps (--refine)
# SCALE_FIT: every call's data prediction may be a little off in a way the time grid cannot express (the network sees
# states a few-step solver left, not the ones it was trained on). Scaling each step's data prediction by a factor
# (Step.data_scale) fitted on the refinement set corrects that (Ning et al.'s epsilon scaling against exposure bias
# scales the noise prediction by one schedule-wide rule; here each step has its own factor, fitted): on the schedules
# the default job wrote (scratch /work/bw/s42/scale/proto.py: Adam at 0.01 on the log scales, 30 steps, 128 search
# noises, grid fixed; report mean / p99 on 1024 noises, scaled over unscaled) digits-dit NFE 5 0.83 / 0.86, NFE 8 0.89
# / 0.84, digits NFE 5 0.94 / 0.88, digits guidance 2 NFE 10 0.96 / 1.15; gmm64 NFE 10 fitted on 128 noises of a model
# whose refinement fits 2048 was worse on validation (1.55x). Moving the scales in every refinement instead (with the
# grid, the shifts and the ratios) made gmm64 NFE 10's descents back off and end worse (validation 4.1e-3 vs 7.9e-4 for
# the finalist the job chose without them; digits NFE 5 gained more that way, 0.183x the best named schedule's report
# mean against 0.204x without scales, p99 0.265x vs 0.269x). So the scales are fitted last, on validation's choice with
# everything else fixed, and validation keeps the scaled schedule only where its selection value is lower. The job
# (scratch /work/bw/s42/exp/ab.py, 1024 report noises, mean / p99 over the best named schedule's): digits NFE 5 0.204 /
# 0.269 -> 0.194 / 0.224 (the scaled choice kept); gmm64 NFE 10 0.140 / 0.101 both (the scaled one lower on the 2048
# fitted noises, higher on validation: not kept). Those fits were Adam's, 20 steps; the scales alone are a few smooth
# parameters, and L-BFGS does as well in fewer evaluations (scratch /work/bw/s42/exp/lbfgs.py, the scales alone from
# the job's unscaled choice, 128 search noises; report mean / p99 over the unscaled schedule's): digits-dit NFE 5 Adam
# 20 0.849 / 0.918, L-BFGS 12 0.834 / 0.863, L-BFGS 8 0.839 / 0.860; digits NFE 5 Adam 20 0.953 / 0.833, L-BFGS 12
# 0.952 / 0.875, L-BFGS 8 0.966 / 0.808, Adam 10 0.963 / 0.848. 12 evaluations of L-BFGS, then: each costs what a
# refinement step does (the README's search is near its five minutes).
SCALE_FIT_STEPS = 12  # the scale fit's evaluations (L-BFGS)
SCALED_SUFFIX = " + data scales"
POLISHED_SUFFIX = " + L-BFGS"


def polish_steps(refine_steps: int) -> int:
    """The polish's L-BFGS evaluations for a refinement of ``refine_steps`` steps a start (POLISH_SHARE)."""
    return round(POLISH_SHARE * refine_steps)


def _as_evaluated(evaluator: Evaluator, schedule: Schedule) -> tuple[Schedule, float]:
    """The schedule as the evaluator scores it (ratios fitted by the evaluator: the refined grid with the ratios
    it fitted for it) and its mse_ref there."""
    from autotune.space.fileformat import loads

    metrics = evaluator.evaluate(schedule)
    if "evaluated_schedule" in metrics:
        schedule = loads(metrics["evaluated_schedule"])
    return schedule, metrics["mse_ref"]


def _quasi_newton_twins(runs: list[Any], starts: list[tuple[str, str, Schedule, bool]], lowest: float,
                        hooks: JobHooks, half: int, steps: int, make: Callable[[Schedule, bool], Any]) -> set[int]:
    """QUASI_NEWTON: every start whose Adam descent backed off by halfway (and is within GIVE_UP of the lowest)
    races an L-BFGS descent of itself to halfway; the lower of the two takes its place in ``runs``. Returns the
    starts' indices where L-BFGS took them."""
    taken = set()
    for i, run in enumerate(list(runs)):
        if not run.backoffs or run.above(GIVE_UP * lowest):
            continue
        _, description, start, shifts = starts[i]
        with _step(hooks, f"L-BFGS: {description} (steps 1-{half} of {steps})"):  # STEP_LINES
            twin = make(start, shifts)
            twin.halfway()
        if twin.best_loss < run.best_loss:
            runs[i] = twin
            taken.add(i)
    return taken


# a named schedule this many times worse than the best named one on the search set is neither validated nor in the
# closing table: on digits NFE 5 ddim and ipndm (5x) never came close, and each costs a pass over 512 or 1024
# noises. Validation takes at most VALIDATED_NAMED of the rest (they are there as the fallback when the search's
# finds are worse than the best named schedule, which is among the best three on the search set).
NAMED_FINALIST_SLACK = 2.0
VALIDATED_NAMED = 3


def _named_finalists(evaluator: Evaluator, named: list[Schedule], most: Optional[int] = None
                     ) -> list[tuple[str, Schedule]]:
    """The named schedules worth scoring on held-out noise (at most ``most``, the best), by their search-set mean
    (the search's seeds: already scored), in the order given."""
    values = [evaluator.evaluate(s)["mse_ref"] for s in named]
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return []
    limit = NAMED_FINALIST_SLACK * finite[0]
    if most is not None and len(finite) > most:
        limit = min(limit, finite[most - 1])
    return [(f"named {s.name}", s) for s, v in zip(named, values) if math.isfinite(v) and v <= limit]


def _held_out(setup: SearchSetup, kind: str, size: int, pool: Optional[Pool], **options: Any) -> Evaluator:
    """An evaluator of a held-out set ("validation", "report") whose sampling runs on the Ray workers when the
    job has some holding the same model (2 workers of one thread each sampled digits 22 % faster than the driver
    on 2 threads); ``options`` go to the Evaluator."""
    from autotune.evaluate.evaluator import Evaluator

    c = setup.config
    evaluator = Evaluator(setup.model, kind, size=size, store=setup.store, prompts=c.prompts, **options)
    evaluator.sampler = _on_workers(pool, "sample_split", evaluator.fingerprint)
    return evaluator


def _on_workers(pool: Optional[Pool], method: str, fingerprint: str) -> Optional[Callable[..., Any]]:
    """The pool's ``method`` (RayPool.sample_split, .gradient_split) when its workers hold the model of this
    ``fingerprint``; None (compute here) for a pool without it or with another model."""
    split = getattr(pool, method, None)
    return split if split is not None and pool.model_fingerprint() == fingerprint else None


def _validate(setup: SearchSetup, result: SearchResult, winner: _Winner, hooks: JobHooks,
              pool: Optional[Pool] = None) -> None:
    """Choose among the finalists (refined grid, best trials, named schedules) on the held-out validation set."""
    from autotune.search.selection import selection_value
    from autotune.search.validate import finalists, pick_on_validation

    c, evaluator = setup.config, setup.evaluator
    held_out = _held_out(setup, "validation", setup.sizes.validation, pool, seed=c.seed)
    extra = ([(winner.refined_label, winner.refined)] if winner.refined is not None else []) + winner.also_refined
    named_here = _named_finalists(evaluator, [s for s in setup.named_peers if s.nfe == result.best.nfe],
                                  most=VALIDATED_NAMED)
    candidates = finalists(result.trials, extra + [("best", result.best)]) + named_here
    line = f"validation: {len(candidates)} finalists, {held_out.eval_set.size} held-out samples"
    with _step(hooks, line) as progress:
        held_out.progress = progress  # the validation set's reference, solved first unless cached
        chosen, scored = pick_on_validation(held_out, candidates, progress=progress)
    polish, polished = winner.polish.get(chosen.label), None
    if polish is not None and polish_steps(c.refine_steps):  # POLISH: why
        # STEP_LINES; the finalists table names the choice ("+ L-BFGS")
        with _step(hooks, f"polishing validation's choice by L-BFGS ({polish_steps(c.refine_steps)} steps)"):
            polished = polish()
    if polished is not None:
        chosen = _the_lower_on_validation(held_out, scored, chosen, chosen.label + POLISHED_SUFFIX, polished,
                                          hooks, "validation: the choice, polished")
    scaled = None
    # SCALE_FIT: why; the refinement's reference is at the search's NFE, and a draw (an SDE schedule) has no mse_ref
    if winner.fit_scales is not None and chosen.schedule.nfe == result.best.nfe and not chosen.schedule.stochastic:
        with _step(hooks, f"fitting the choice's data scales by L-BFGS ({SCALE_FIT_STEPS} steps)"):  # STEP_LINES
            scaled = winner.fit_scales(chosen.schedule)
    if scaled is not None:
        chosen = _the_lower_on_validation(held_out, scored, chosen, chosen.label + SCALED_SUFFIX, scaled, hooks,
                                          "validation: the choice, data scales fitted")
    search_values = [evaluator.evaluate(f.schedule)["mse_ref"] for f in scored]
    winner.schedule, winner.value = chosen.schedule, evaluator.evaluate(chosen.schedule)["mse_ref"]
    winner.validation = ValidationNote(held_out.eval_set.id, chosen, scored, search_values)
    winner.validation_meta = {"set": held_out.eval_set.id, "chosen": chosen.label,
                              "mse_ref": chosen.validation["mse_ref"],
                              "finalists": {f.label: f.validation["mse_ref"] for f in scored},
                              "selection": {f.label: selection_value(f.validation) for f in scored if not f.screened},
                              # stopped by validation's screen: their figure is the mean on this many noises
                              "screened": {f.label: f.validation["screened"] for f in scored if f.screened}}


def _the_lower_on_validation(held_out: Evaluator, scored: list[Finalist], chosen: Finalist, label: str,
                             schedule: Schedule, hooks: JobHooks, line: str) -> Finalist:
    """``schedule``, validation's choice changed after the choice (POLISH, SCALE_FIT), scored on the held-out set
    under the step line ``line`` and added to ``scored`` as the finalist ``label``; that finalist where its selection
    value is lower than ``chosen``'s, else ``chosen``."""
    from autotune.search.selection import selection_value
    from autotune.search.validate import Finalist

    with _step(hooks, line) as progress:
        held_out.progress = progress
        scored.append(Finalist(label, schedule, held_out.evaluate(schedule)))
    return scored[-1] if selection_value(scored[-1].validation) < selection_value(chosen.validation) else chosen


def _stage2(setup: SearchSetup, pool: Pool, winner: _Winner, hooks: JobHooks) -> None:
    from autotune.search.skip_stage import run_stage2

    c = setup.config
    # the guidance direction exists only in guided calls: a guidance scale and conditions (a text model's prompts)
    guided = winner.schedule.guidance if setup.evaluator.eval_set.conditions() is not None else None
    reusable = reusable_for(setup.model.units, guided) if c.reuse else ()
    what = "compute / reuse / skip per unit" if reusable else "skip masks"
    # its finalists are chosen on the validation set as stage 1's are (skip_stage.STAGE2_FINALISTS says why)
    validation = _held_out(setup, "validation", setup.sizes.validation, pool, seed=c.seed) if c.validating else None
    with _step(hooks, f"stage 2: {what}, {c.stage2_budget} evaluations") as progress:
        if validation is not None:
            validation.progress = progress
        winner.stage2 = run_stage2(winner.schedule, tuple(setup.model.units), pool, c.stage2_budget,
                                   fraction=c.latency_budget, seed=c.seed, batch_size=c.batch, store=setup.store,
                                   parent_id=setup.search_id, study_url=setup.study_url, study_attrs=setup.study_attrs,
                                   reusable=reusable, validation=validation, progress=progress)
    if winner.stage2.result is not None:
        winner.schedule = winner.stage2.best


def stage2_meta(stage2: Stage2) -> dict[str, Any]:
    """The schedule file's record of stage 2 (latencies are wall times on the search's workers)."""
    meta = {"search_id": stage2.search_id, "latency_budget": stage2.fraction, "limit_ms": stage2.limit_ms,
            "unpruned_latency_ms": stage2.unpruned_ms, "found": stage2.result is not None}
    if stage2.result is not None:
        t = stage2.best_trial
        meta.update(latency_ms=t.latency_ms, mse_ref=t.mse_ref, true_evaluations=stage2.result.true_evaluations,
                    cache_hits=stage2.result.cache_hits,
                    **({"latency_share_retimed": stage2.retimed[t.hash]} if t.hash in stage2.retimed else {}),
                    **({"validation_mse_ref": stage2.validation} if stage2.validation else {}))
    return meta


def _with_metadata(setup: SearchSetup, result: SearchResult, winner: _Winner) -> Schedule:
    """The winner named after the method and its NFE, with the record of how it was found."""
    c, w = setup.config, winner.schedule
    return dataclasses.replace(w, name=f"{c.search_method}-nfe{w.nfe}", metadata={
        "search_id": setup.search_id, "method": c.search_method, "model": c.model,
        "model_fingerprint": setup.evaluator.fingerprint, "nfe": w.nfe, "objectives": list(c.objectives),
        "search_value": winner.value, "search_mse_ref": result.best_trial.mse_ref,
        "refine_steps": c.refine_steps if winner.refined is not None else 0,
        **({"refine_set": winner.refine_set} if winner.refined is not None else {}),
        "true_evaluations": result.true_evaluations, "cache_hits": result.cache_hits,
        "budget_spent": round(result.spent, 4),  # whole-set evaluations: a partial score (s3-mf) counts its share
        "seconds": round(result.seconds, 2), "seed": c.seed, "eval_set": setup.evaluator.eval_set.id,
        **({"validation": winner.validation_meta} if winner.validation_meta else {}),
        **({"t_min_search": _t_min_meta(*winner.t_min_search)} if winner.t_min_search else {}),
        **({"stage2": stage2_meta(winner.stage2)} if winner.stage2 else {})})


def _t_min_meta(search_id: str, result: SearchResult) -> dict[str, Any]:
    """The schedule file's record of the search ending at t_min (T_MIN_SEARCH)."""
    return {"search_id": search_id, "search_mse_ref": result.best_trial.mse_ref,
            "true_evaluations": result.true_evaluations, "cache_hits": result.cache_hits,
            "budget_spent": round(result.spent, 4), "seconds": round(result.seconds, 2)}


def pareto_path_for(out: Path) -> Path:
    """Where a Pareto search's front goes: beside the schedule file, ``<stem>.pareto.json``."""
    return out.with_name(f"{out.stem}.pareto.json")


def _write_files(config: JobConfig, best: Schedule, result: SearchResult) -> dict[str, Any]:
    """The schedule file and, for several objectives, the front beside it; their paths (none without ``out``)."""
    from autotune.space.fileformat import loads, save, to_dict

    if config.out is None:
        return {}
    save(best, config.out)
    if len(config.objectives) == 1:
        return {"schedule_path": config.out}
    front_path = pareto_path_for(config.out)
    front_path.write_text(json.dumps([{"schedule": to_dict(loads(t.schedule)), "objectives": dict(t.objectives)}
                                      for t in result.front], indent=1, default=str))
    return {"schedule_path": config.out, "pareto_path": front_path}


def _score_report(setup: SearchSetup, result: SearchResult, best: Schedule, stage2: Optional[Stage2],
                  hooks: JobHooks, pool: Optional[Pool] = None) -> dict[str, Any]:
    """The best (and after stage 2 its unpruned schedule, to show what the skips cost) and the named schedules
    at its NFE that validation took (the VALIDATED_NAMED best on the search set, within NAMED_FINALIST_SLACK of the
    best), scored on the report set (`autotune compare` scores any other). Each named schedule costs a pass over
    1024 noises: on digits NFE 5 the other three were about 20 s of the README's search, and the best named
    schedule on the report set, unipc-bh1-o3, was also the search set's best."""
    c = setup.config
    report = _held_out(setup, "report", c.report_size, pool, model_spec=c.model)
    peers = [s for _, s in _named_finalists(setup.evaluator, [s for s in setup.named_peers if s.nfe == best.nfe],
                                            most=VALIDATED_NAMED)]
    ours = [(best.name, best)]
    if stage2 and stage2.result is not None:
        ours.append((f"{best.name}-unpruned", dataclasses.replace(result.best, name=f"{best.name}-unpruned")))
    with _step(hooks, f"scoring {len(ours) + len(peers)} schedules, report set") as progress:
        report.progress = progress  # the report set's reference, solved first unless cached
        scored_ours = [Scored(n, s, report.evaluate(s)) for n, s in ours]
        scored_peers = [Scored(s.name, s, report.evaluate(s)) for s in peers]
        reference_metrics = report.reference_data_metrics(best)
    report.sampler = None  # the pool closes after this; report images sample here
    return {"report_set": report.eval_set.id, "ours": scored_ours, "peers": scored_peers,
            "report_evaluator": report, "reference_metrics": reference_metrics}
