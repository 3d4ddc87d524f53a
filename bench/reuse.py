"""Cached block reuse on ``digits`` (guidance 2), on ``digits-dit`` (the transformer, guidance 2: its blocks reuse
their residuals; DeepCache's and the threshold rule's reused part is ``rest1``, every block after the first) or the
32x32 RGB photo-patch pipeline (``--model rgb32-v`` or
``rgb32-eps``, bench/rgb32.py, unconditional; or any DDPM pipeline directory): latency against mse_ref for the
unpruned schedule, DeepCache's uniform interval (N = 2 / 3 / 5 on its default branch, ``deep0``: for a diffusers
UNet2DModel the branch of models/unet_branches.py), the same patterns with a first-order forecast of the reused
output ("forecast N=k": ``Schedule.reuse_order`` 1, extrapolated linearly in time from the unit's last two
computed outputs, TaylorSeer's first order, instead of copied), on the guided models the guidance direction
reused at the same intervals ("CFG N=k": ``guidance``, models/guidance.py: those calls run the conditional half
only; "CFG fcast N=3" with the forecast), a FirstBlockCache-style threshold rule (its first block: ``down0``, or
``down_blocks.0``) and the pattern stage 2 searches (compute / reuse / skip per step and unit, and the reuse
order, under a measured-latency budget).

Base schedule: a named one (``unipc-bh2-o2``) at each NFE. Latency: the executor (``sampling.executor.sample``, as
``search/latency.py`` measures it) on the same batch of the report set's first noises, all rows of every NFE timed
side by side in this process, interleaved round by round (one run of each row per round, after a warm-up round), the
least time per row, on ``--clock`` (evaluate/clock.py; ``auto``: this process's CPU time at one thread on the CPU,
which the machine's other load does not inflate, else the wall clock); with ``--engines``, the same for ONNX Runtime
engines of the static rows. mse_ref: the Evaluator on the report set (``--report-size`` noises, default 256), every
row against one reference (``--ref-steps`` solver steps, default 100), so rows of different NFE compare; the
threshold rule is scored by ``evaluate.metrics.score`` against it (it is a run-time wrapper, not a schedule). The
search scores its candidates on the *search* set (``--search-size`` noises) with their latency measured as stage 2
does; its best feasible patterns are re-scored on the validation set (``--validate-size`` noises) and the best there
is the winner, the only one graded on the report set. Ratios: speedup = unpruned latency / row latency, mse x = row
mse_ref / unpruned mse_ref.

The joint (NFE, reuse) front (``--front LO``, default 5; 0: off): the base schedule without reuse at every NFE
from LO to the largest of ``--nfes`` is scored and timed with the other rows. Each reuse row is then set against
the best of them that is no slower (what a user gets at that latency without reuse): at this latency, are fewer
steps or cheaper steps better?

    python bench/reuse.py                                  # NFE 10 and 20, search budget 24, front from NFE 5
    python bench/reuse.py --nfes 10 --search-budget 0 --report-size 256 --engines
    python bench/reuse.py --model rgb32-v --work bench-work     # builds bench-work/rgb32-v first if missing
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from autotune.evaluate.clock import CLOCKS, clock_words, resolve_clock, timed_seconds
from autotune.evaluate.evaluator import Evaluator
from autotune.evaluate.metrics import score
from autotune.sampling.executor import sample
from autotune.sampling.named import build
from autotune.sampling.reuse import ThresholdReuse, deepcache
from autotune.space.schedule import GUIDANCE_UNIT, Schedule

GUIDANCE = 2.0  # digits only: the pipeline models are unconditional
RGB32 = ("rgb32-eps", "rgb32-v")


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A model of this benchmark and its units: ``first`` (the threshold rule's watched block), ``rest`` (what
    DeepCache and the threshold rule reuse) and ``search`` (the units the search may reuse)."""

    model: Any
    guidance: float | None
    first: str
    rest: str
    search: tuple[str, ...]


def load_bench_model(name: str, work: Path, log: Callable[[str], None]) -> BenchModel:
    """The model ``--model`` names and its units."""
    if name == "digits":
        from autotune.models.digits import load_digits

        return BenchModel(load_digits(), GUIDANCE, "down0", "deep0", ("deep0", "deep1", GUIDANCE_UNIT))
    if name == "digits-dit":  # a transformer: DeepCache's branch is the stack after the first block
        from autotune.models.digits_dit import load_digits_dit

        return BenchModel(load_digits_dit(), GUIDANCE, "blocks.0", "rest1",
                          ("rest1", "rest2", "rest4", "rest6", GUIDANCE_UNIT))
    from autotune.models.diffusers_dir import load_pipeline_dir

    if name in RGB32:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from rgb32 import ensure_rgb32

        path = ensure_rgb32(work, name.split("-")[1], log=log)
    else:
        path = Path(name)
    return BenchModel(load_pipeline_dir(path), None, "down_blocks.0", "deep0", ("deep0", "deep1"))


@dataclasses.dataclass
class Row:
    nfe: int
    name: str
    model: Any
    schedule: Schedule
    note: str = ""
    ms: float = float("nan")
    engine_ms: float = float("nan")
    mse: float = float("nan")
    reused: str = ""


class Heartbeat:
    """Prints a line, and a "still working" line whenever ``beat`` is called ``every`` seconds after the last one:
    scoring a row on 256 noises or one timing round of all rows took over a minute on rgb32 at NFE 20, silently."""

    def __init__(self, every: float = 15.0) -> None:
        self.every = every
        self.last = time.perf_counter()
        self.task = ""

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.last = time.perf_counter()

    def beat(self, detail: str = "") -> None:
        if time.perf_counter() - self.last >= self.every:
            self.log(f"  ... {self.task}{': ' + detail if detail else ''}")

    def sampler(self, model, schedule, noise, cond=None, **kwargs):
        """``sample_in_chunks`` beating after every step (an Evaluator's ``sampler``: the same samples, and a run-time
        rule sees the same batches, so its decisions are the ones it makes unobserved)."""
        from autotune.sampling.executor import sample_in_chunks

        size, theirs = noise.shape[0], kwargs.pop("callback", None)  # a reference solve counts its own steps

        def step(k: int, x: torch.Tensor) -> None:
            if theirs is not None:
                theirs(k, x)
            self.beat(f"step {k + 1} of {len(schedule.steps)} on {size} samples")

        return sample_in_chunks(model, schedule, noise, cond, callback=step, **kwargs)


def reused_calls(schedule: Schedule) -> str:
    """How many model calls reuse some unit, out of the schedule's calls."""
    return f"{sum(1 for st in schedule.steps if st.reuse)}/{schedule.nfe}"


def interleaved_ms(runs: list[Callable[[], Any]], rounds: int, log: Callable[[str], None] | None = None,
                   beat: Callable[[str], None] | None = None, clock: str = "wall") -> list[float]:
    """Least time (ms, on the resolved ``clock``: wall or cpu) of each run, timed one after another in each round
    (after one warm-up round).

    The least, not the median: noise only adds time, and on a shared 2-core VM it added up to 40 % to single runs
    (the median of 15 identical runs 1.44x their least), enough to reorder rows whose work differs by 10 %. On the
    wall clock the least still favours short runs, which escape the machine's other load more often than long ones
    (evaluate/clock.py), hence CPU time where it measures the same work."""
    times: list[list[float]] = [[] for _ in runs]
    for r in range(rounds + 1):
        for i, fn in enumerate(runs):
            seconds = timed_seconds(fn, clock)
            if r:
                times[i].append(seconds)
            if beat is not None:
                beat(f"round {r}, {i + 1} of {len(runs)} runs")
        if log is not None:
            log(f"  timing: round {r} of {rounds} done" if r else "  timing: warm-up round done")
    return [1000.0 * min(t) for t in times]


def searched(model, base: Schedule, nfe: int, args, log) -> Schedule | None:
    """Stage 2 with 3-state genes on ``base`` under ``args.fraction`` x the unpruned latency; the best feasible."""
    from autotune.search.latency import LatencySpec
    from autotune.search.runner import InProcessPool
    from autotune.search.skip_stage import run_stage2

    ev = Evaluator(model, "search", size=args.search_size, store=args.store_obj)
    ev.sampler = args.heart.sampler
    ev.progress = lambda event: args.heart.beat(f"{event.task} {100 * event.done / max(event.total, 1):.0f} %")
    args.heart.task = f"search NFE {nfe}"
    pool = InProcessPool(ev)
    units = tuple(u for u in args.search_skip if u)
    started = time.perf_counter()

    def progress(p) -> None:
        best = f"{p.best_value:.3e}" if p.best_value < float("inf") else "none feasible yet"
        log(f"  search NFE {nfe}: {p.true_evaluations}/{p.budget} candidates, best mse_ref {best} "
            f"({p.elapsed:.0f} s)")

    # one candidate per batch: the strategy hears each result before it asks again, and a line follows every
    # candidate (a batch of 4 on rgb32 at NFE 20 was over three silent minutes)
    log(f"  search NFE {nfe}: {args.search_budget} candidates, one at a time, on {args.search_size} noises, "
        f"latency measured per candidate")
    validation = None
    if args.validate_size:
        validation = Evaluator(model, "validation", size=args.validate_size, store=args.store_obj)
        validation.sampler = args.heart.sampler
    stage = run_stage2(base, units, pool, args.search_budget, fraction=args.fraction, seed=args.seed,
                       batch_size=1, store=None,
                       latency=LatencySpec(batch=args.batch, repeats=3, clock=args.clock_used),
                       reusable=tuple(args.search_reuse) + units, callback=progress, validation=validation)
    log(f"  search NFE {nfe}: {args.search_budget} candidates in {time.perf_counter() - started:.0f} s, limit "
        f"{stage.limit_ms:.1f} ms (unpruned {stage.unpruned_ms:.1f} ms on the search worker)"
        + (f"; {stage.reason}" if stage.reason else ""))
    if stage.result is None or stage.best is None:
        return None
    if stage.retimed:
        held = sum(1 for share in stage.retimed.values() if share <= args.fraction)
        log(f"  search NFE {nfe}: {len(stage.retimed)} best masks timed again against unpruned, {held} within "
            f"{args.fraction:g}: " + " ".join(f"{share:.3f}" for share in stage.retimed.values()))
    if stage.validation:
        unpruned = validation.evaluate(base)["mse_ref"]
        log(f"  search NFE {nfe}: {len(stage.validation)} feasible finalists on {args.validate_size} validation "
            "noises, mse x unpruned: " + " ".join(f"{v / unpruned:.2f}" + ("*" if h == stage.best_trial.hash else "")
                                                   for h, v in stage.validation.items()) + " (* chosen)")
    return stage.best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="digits, digits-dit, rgb32-eps, rgb32-v or a DDPM pipeline "
                   "directory")
    p.add_argument("--work", type=Path, default=Path("bench-work"), help="where an rgb32 model is (or is built)")
    p.add_argument("--nfes", type=int, nargs="+", default=[10, 20])
    p.add_argument("--base", default="unipc-bh2-o2")
    p.add_argument("--report-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="latency batch")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (the least time counts)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--search-budget", type=int, default=24)
    p.add_argument("--search-size", type=int, default=64)
    p.add_argument("--validate-size", type=int, default=256, help="validation noises the search's best feasible "
                   "patterns are chosen on (0: the search set's best)")
    p.add_argument("--search-reuse", nargs="*", default=None, help="units the search may reuse (default: the "
                   "model's deep branches deep0 deep1; digits-dit: the block spans rest1 rest2 rest4 rest6; on the "
                   "guided models also the guidance direction, guidance)")
    p.add_argument("--search-skip", nargs="*", default=[], help="skippable units the search may also skip")
    p.add_argument("--fraction", type=float, default=0.66, help="search latency budget x unpruned")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", action="store_true", help="also time ONNX Runtime engines of the static rows")
    p.add_argument("--provider", default="cpu", help="--engines: onnxruntime execution provider (cpu, cuda)")
    p.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "autotune-bench-reuse.db"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="auto", choices=CLOCKS, help="auto: this process's CPU time at one thread "
                   "on the CPU (the machine's other load does not inflate it), else the wall clock")
    p.add_argument("--front", type=int, default=5, metavar="LO",
                   help="joint front: the base without reuse at NFE LO..max(--nfes) (0: off)")
    p.add_argument("--ref-steps", type=int, default=100, help="solver steps of the one reference every row is scored "
                   "against")
    args = p.parse_args(argv)
    if args.engines:
        from autotune.compile.backends import check_provider
        from autotune.errors import BackendError

        try:
            check_provider(args.provider)
        except BackendError as e:
            p.error(f"--provider: {e}")
    if args.front and not 1 <= args.front <= max(args.nfes):
        p.error(f"--front: must be 0 (off) or an NFE in 1..{max(args.nfes)}, got {args.front}")
    if args.validate_size < 0:
        p.error(f"--validate-size: must be 0 (off) or a number of noises, got {args.validate_size}")
    torch.set_num_threads(args.threads)
    # one clock for every row, the search's candidates and the engines (on a GPU provider: the wall clock)
    args.clock_used = resolve_clock(args.clock, "cpu" if args.provider == "cpu" else "cuda", args.threads)

    heart = Heartbeat()
    log = heart.log
    args.heart = heart

    from autotune.cache.store import open_store

    args.store_obj = open_store(args.store)
    bench_model = load_bench_model(args.model, args.work, log)
    model, guidance, first, rest = bench_model.model, bench_model.guidance, bench_model.first, bench_model.rest
    if args.search_reuse is None:
        args.search_reuse = list(bench_model.search)
    args.guidance = guidance
    missing = [u for u in args.search_reuse + args.search_skip if u and u not in model.units.reusable]
    if missing:
        p.error(f"--search-reuse/--search-skip: {args.model} has no unit {missing[0]!r} (reusable: "
                f"{', '.join(model.units.reusable[:8]) or 'none'}{', ...' if len(model.units.reusable) > 8 else ''})")
    report = Evaluator(model, "report", size=args.report_size, store=args.store_obj, ref_steps=args.ref_steps)
    started = time.perf_counter()
    last_said = [started]

    def reference_progress(event) -> None:  # a line every 20 s while the reference is solved
        if time.perf_counter() - last_said[0] >= 20:
            last_said[0] = time.perf_counter()
            log(f"  {event.task}: {100 * event.done / max(event.total, 1):.0f} %")

    report.progress = reference_progress
    report.sampler = heart.sampler
    reference = report.reference(guidance)
    log(f"reference: {args.report_size} report noises, guidance {guidance}, {args.ref_steps} steps "
        f"({time.perf_counter() - started:.0f} s)")
    noise = report.eval_set.noise(torch.float32)[: args.batch]
    conditions = report.eval_set.conditions()
    labels = None if conditions is None else conditions[: args.batch]

    rows: list[Row] = []
    for nfe in args.nfes:
        base = dataclasses.replace(build(args.base, model.noise, nfe), guidance=guidance)
        group = [Row(nfe, "unpruned", model, base)]
        group += [Row(nfe, f"DeepCache N={n}", model, deepcache(base, n, rest)) for n in (2, 3, 5)]
        group += [Row(nfe, f"forecast N={n}", model, dataclasses.replace(deepcache(base, n, rest), reuse_order=1))
                  for n in (2, 3)]
        if guidance is not None:  # the guidance direction reused at the same intervals (conditional half only)
            group += [Row(nfe, f"CFG N={n}", model, deepcache(base, n, GUIDANCE_UNIT)) for n in (2, 3)]
            group += [Row(nfe, "CFG fcast N=3", model,
                          dataclasses.replace(deepcache(base, 3, GUIDANCE_UNIT), reuse_order=1))]
        group += [Row(nfe, f"threshold {thr:g}", ThresholdReuse(model, thr, first=first, rest=rest), base,
                      "run-time rule")
                  for thr in args.thresholds]
        if args.search_budget > 0:
            found = searched(model, base, nfe, args, log)
            if found is not None:
                group.append(Row(nfe, "searched", model, found))
            else:
                log(f"  search NFE {nfe}: no candidate met the latency budget")
        for row in group:
            heart.task = f"NFE {nfe} {row.name}, scoring"
            score_row(row, report, reference)
            log(f"  NFE {nfe} {row.name}: mse_ref {row.mse:.3e} ({time.perf_counter() - started:.0f} s)")
        rows += group
        log(f"NFE {nfe} scored ({time.perf_counter() - started:.0f} s)")
    front = []
    for nfe in range(args.front, max(args.nfes) + 1) if args.front else ():
        if nfe not in args.nfes:  # the groups' unpruned rows are the front's points at their NFE
            base = dataclasses.replace(build(args.base, model.noise, nfe), guidance=guidance)
            row = Row(nfe, "no reuse", model, base)
            heart.task = f"front NFE {nfe}, scoring"
            score_row(row, report, reference)
            log(f"  front NFE {nfe}: mse_ref {row.mse:.3e} ({time.perf_counter() - started:.0f} s)")
            front.append(row)
    if front:
        log(f"front: NFE {args.front}..{max(args.nfes)} without reuse scored ({time.perf_counter() - started:.0f} s)")
    timed = rows + front
    heart.task = "timing"
    with torch.no_grad():
        times = interleaved_ms([lambda r=r: sample(r.model, r.schedule, noise, labels) for r in timed], args.rounds,
                               log, heart.beat, args.clock_used)
    for row, ms in zip(timed, times):
        row.ms = ms
    for row in rows:
        if isinstance(row.model, ThresholdReuse):
            row.note = f"run-time rule; {row.model.reused}/{row.model.calls} reused in timing"
    log(f"timed {len(timed)} rows, {args.rounds} rounds ({time.perf_counter() - started:.0f} s)")
    if args.engines:
        for nfe in args.nfes:
            engine_times(model, [r for r in rows if r.nfe == nfe and not isinstance(r.model, ThresholdReuse)], args,
                         log)
    print_table(rows, args)
    if front:
        print_front(rows, front)
    for row in rows:
        if row.name == "searched":
            log(f"searched NFE {row.nfe}: reuse order {row.schedule.reuse_order}, per step "
                + " ".join("+".join(st.reuse) or "-" for st in row.schedule.steps)
                + ("; skip " + " ".join("+".join(st.skip) or "-" for st in row.schedule.steps)
                   if row.schedule.units_used else ""))


def score_row(row: Row, report: Evaluator, reference) -> None:
    """mse_ref on the report set against ``reference`` (a threshold rule through ``score``: it is not a schedule)."""
    if isinstance(row.model, ThresholdReuse):
        with torch.no_grad():
            m = score(row.model, row.schedule, report.eval_set, reference, sampler=report.sampler)
        row.mse = float(m["mse_ref"])
        row.reused = f"{row.model.reused}/{row.model.calls}"
        row.model.calls = row.model.reused = 0
    else:
        row.mse = float(report.evaluate(row.schedule)["mse_ref"])
        row.reused = reused_calls(row.schedule)


def front_at(points: list[tuple[float, float]], ms: float) -> float | None:
    """The mse_ref of a policy's front at latency ``ms``: log mse_ref interpolated linearly in latency between the
    two of its points (ms, mse_ref) that bracket ``ms`` (what running the policy's next pattern on part of the steps
    would about give); None outside the points' latency range. DeepCache at the searched pattern's latency."""
    pts = sorted(points)
    for (m0, e0), (m1, e1) in zip(pts, pts[1:]):
        if m0 <= ms <= m1:
            w = 0.0 if m1 == m0 else (ms - m0) / (m1 - m0)
            return math.exp((1 - w) * math.log(e0) + w * math.log(e1))
    return None


def no_reuse_at(points: list[tuple[float, float, int]], ms: float) -> tuple[float, int] | None:
    """(mse_ref, NFE) of the best no-reuse point (ms, mse_ref, NFE) no slower than ``ms``: what a user gets at this
    latency without reuse (the lowest error among the step counts that fit; a named grid need not improve with every
    added step: on rgb32-v unipc-bh2-o2 scores 2.0e-3 at NFE 13 and 2.6e-3 at 15); None when all are slower."""
    fitting = [(mse, nfe) for m, mse, nfe in points if m <= ms]
    return min(fitting) if fitting else None


def print_front(rows: list[Row], front: list[Row]) -> None:
    """Each reuse row against the no-reuse schedule of the same latency (fewer steps instead of cheaper ones)."""
    points = [(r.ms, r.mse, r.nfe) for r in front + [r for r in rows if r.name == "unpruned"]]
    lo, hi = min(p[2] for p in points), max(p[2] for p in points)
    print()
    print(f"joint front: each reuse row vs the best base schedule without reuse (NFE {lo}..{hi}) that is no")
    print("slower; ratio = row mse_ref / its mse_ref; < 1: reuse (cheaper steps) wins")
    cells = [f"NFE {n:>2} {m:>6.0f} ms {e:.2e}" for m, e, n in sorted(points, key=lambda p: p[2])]
    print("no reuse:")
    for i in range(0, len(cells), 3):
        print("  " + "   ".join(cells[i:i + 3]))
    head = f"{'NFE':>3} {'policy':<15} {'ms':>7} {'mse_ref':>9} {'no reuse':>9} {'at NFE':>6} {'ratio':>6}  verdict"
    print(head)
    print("-" * len(head))
    wins = []
    for r in rows:
        if r.name == "unpruned":
            continue
        at = no_reuse_at(points, r.ms)
        if at is None:
            print(f"{r.nfe:>3} {r.name:<15} {r.ms:>7.1f} {r.mse:>9.2e} {'-':>9} {'-':>6} {'-':>6}  faster than all")
            continue
        ratio = r.mse / at[0]
        verdict = "reuse wins" if ratio < 1 else "fewer steps win"
        if ratio < 1:
            wins.append(f"{r.nfe} {r.name}")
        print(f"{r.nfe:>3} {r.name:<15} {r.ms:>7.1f} {r.mse:>9.2e} {at[0]:>9.2e} {at[1]:>6d} {ratio:>6.2f}  "
              f"{verdict}")
    print(f"reuse wins at equal latency: {', '.join(wins) if wins else 'nowhere on this model'}")


def engine_times(model, group: list[Row], args, log) -> None:
    """ONNX Runtime engines of the static rows, timed interleaved on the same batch (ms)."""
    from autotune.compile import build_engine, load_engine
    from autotune.compile.engine import engine_io, example_inputs

    with tempfile.TemporaryDirectory(prefix="autotune-reuse-") as tmp:
        runs = []
        for i, row in enumerate(group):
            man = build_engine(model, row.schedule, Path(tmp) / str(i), "onnxruntime", parity_noises=2,
                               load_options={"threads": args.threads, "provider": args.provider})
            row.note = (row.note + "; " if row.note else "") + \
                f"engine parity {man.parity['engine_vs_executor_max_abs']:.1e}"
            log(f"  engine NFE {row.nfe} {row.name}: built, parity "
                f"{man.parity['engine_vs_executor_max_abs']:.1e}")
            engine = load_engine(Path(tmp) / str(i), model, threads=args.threads, provider=args.provider)
            inputs, _ = engine_io(model, row.schedule)
            data = {k: v.numpy() for k, v in example_inputs(model, inputs, args.batch, seed=1).items()}
            runs.append(lambda engine=engine, data=data: engine(**data))
        args.heart.task = f"engine timing NFE {group[0].nfe}"
        for row, ms in zip(group, interleaved_ms(runs, args.rounds, log, args.heart.beat, args.clock_used)):
            row.engine_ms = ms


def print_table(rows: list[Row], args) -> None:
    """One table at 80 columns: latency (ms, speedup vs unpruned), mse_ref (and x unpruned), reused calls."""
    eng = args.engines
    head = f"{'NFE':>3} {'policy':<15} {'reused':>7} {'ms':>7} {'speedup':>7}"
    head += f" {'eng ms':>7} {'eng x':>6}" if eng else ""
    head += f" {'mse_ref':>9} {'mse x':>6}"
    print()
    model = args.model if args.guidance is None else f"{args.model}, guidance {args.guidance:g}"
    print(f"{model}, base {args.base}; mse_ref on {args.report_size} report noises;")
    where = "" if args.provider == "cpu" else f" on {args.provider}"
    print(f"latency: executor (ms) and ONNX Runtime engine{where} (eng ms), batch {args.batch}, least of {args.rounds} "
          f"interleaved rounds, {args.threads} thread(s), {clock_words(args.clock_used)}")
    print(head)
    print("-" * len(head))
    for nfe in dict.fromkeys(r.nfe for r in rows):
        group = [r for r in rows if r.nfe == nfe]
        ref = group[0]
        for r in group:
            line = f"{r.nfe:>3} {r.name:<15} {r.reused:>7} {r.ms:>7.1f} {ref.ms / r.ms:>7.2f}"
            if eng:
                e = r.engine_ms
                line += f" {e:>7.1f} {ref.engine_ms / e:>6.2f}" if e == e else f" {'-':>7} {'-':>6}"
            line += f" {r.mse:>9.2e} {r.mse / ref.mse:>6.2f}"
            print(line)
    notes = [f"{r.nfe:>3} {r.name}: {r.note}" for r in rows if r.note]
    if notes:
        print("\n".join(notes))
    for nfe in dict.fromkeys(r.nfe for r in rows):
        group = {r.name: r for r in rows if r.nfe == nfe}
        s, u = group.get("searched"), group["unpruned"]
        if s is None:
            continue
        target = u.ms / s.ms >= 1.5 and s.mse <= 1.25 * u.mse
        dc = [r for n, r in group.items() if n.startswith("DeepCache")]
        beaten = [r.name for r in dc if s.ms <= r.ms and s.mse < r.mse]
        dominated_by = [r.name for r in dc if r.ms <= s.ms and r.mse <= s.mse]
        print(f"NFE {nfe}: searched {u.ms / s.ms:.2f}x faster at {s.mse / u.mse:.2f}x mse_ref: target (>= 1.5x, "
              f"<= 1.25x) {'met' if target else 'NOT met'};")
        print(f"  faster and better than: {', '.join(beaten) or 'none'}; "
              f"dominated by: {', '.join(dominated_by) or 'none'}")
        at = front_at([(r.ms, r.mse) for r in dc + [u]], s.ms)
        if at is not None:
            # log mse_ref interpolated in latency between the DeepCache rows and unpruned that bracket it
            print(f"  DeepCache at equal latency (interpolated) {at:.2e}: searched {s.mse / at:.2f}x, "
                  f"{'better' if s.mse < at else 'NOT better'}")


if __name__ == "__main__":
    main()
