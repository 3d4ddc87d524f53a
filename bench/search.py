"""The default `autotune search` vs the best of diffusers' own schedulers at the same NFE (issue 16's first table).

For each model and NFE: the schedule the *default* search finds (exactly what `autotune search --model M --nfe N`
runs: its default method, budget, search-set size, refinement and validation, no DC ratios; called in this
process through `search/job.py: run_search_job`, the function the command calls) against every diffusers peer
(DPM-Solver++ 2M/3M with and without Karras sigmas, UniPC bh1/bh2 orders 2/3, DEIS orders 2/3), each running its
own `scheduler.step` loop over our model wrapper on the model's own noise schedule. All are scored on the held-out
*report* evaluation set (1024 noises by default; the search sees only the search set, its selection only the
validation set) against the same reference solution.

The best peer is the one with the lowest mean mse_ref at that NFE. The table prints ratios as the issue's targets
read them, ours / best peer (< 1: ours lower; the inverse of `autotune.tables.versus`, whose paired-bootstrap 95 %
interval is inverted with it): the mean (target <= 0.5 at NFE <= 6, <= 0.7 above), the 99th percentile (target <=
1) and the model's headline distribution metric (Frechet distance on digits, sliced Wasserstein on gmm64; target:
every distribution metric the model reports, class accuracy and the NLL gap included, no worse than the best peer's,
within a relative 1e-4; "-" where the model has none), each marked "ok" (met) or "NO" (missed); then the search's
wall time (the whole job: its reference solves, the search, the validation) and its true evaluations. A summary
line per target follows; for the mean and the p99 it also counts the rows whose whole 95 % interval meets it (the
p99's is a paired bootstrap too: where a schedule fails on about 1 % of noises, as gmm64's mode switches do, the
p99 of 1024 noises sits on that cliff; `--report-size 16384` decides it there). `--json FILE` writes every row
(each peer's figures, medians, both intervals, the best p99 among all peers, every distribution metric).

    python bench/search.py                                   # every model, NFE 4,5,6,8,10 (hours on a CPU)
    python bench/search.py --models digits --nfe 5 --budget 16 --report-size 64 --set-size 16 --validate 32
    python bench/search.py --models digits --nfe 4,5 --grown-space dpm,unip-bh1,unip-bh2,ipndm,dpm-single

Models: digits (its default guidance), digits-g2 and digits-g4 (guidance 2 and 4), gmm64, pipeline (the test
suite's tiny DDPM directory, trained once into --work), rgb32-eps and rgb32-v (bench/rgb32.py's photo-patch
pipelines, built into --work when missing), rgb32-eps-sd (the eps one under Stable Diffusion 1.x's noise
schedule); any other name is passed to `load_model` as it is. A flow-matching model (digits-flow, digits-dit) is
set against diffusers' flow schedulers instead (FLOW_PEERS). gmm64's
continuous VP-linear noise is given to diffusers as its 1000-step discretisation (step n at t = (n + 1) / 1000,
the time the network is then called at, so the peers solve the same ODE).

Each search starts from an empty memory (no store), so its wall time and true evaluations are those of a
first run; `--search-cache` lets the searches share the bench's cache instead (references solved once, a rerun
resumes). `--workers` defaults to 0 (in this process); the command's own default is 2 Ray workers, which finds
the same schedule in another wall time. `--method` / `--refine` replace the default search's (the header then
says so). `--grown-space SOLVERS` also runs the search with `--solvers SOLVERS` and prints a second table: that
schedule vs the default search's and vs the best peer. `--score-finalists` also scores every finalist the
job's validation chose among on the report set and prints, per row, the chosen one's report mean, the one with
the lowest validation mean's and the lowest on the report set's (each over the best peer's); the --json rows keep
every finalist's figures and schedule, so another selection rule can be checked on them without a new search.
The DC-Solver finishing step is bench/dc.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from autotune.evaluate.ids import PER_SAMPLE
from autotune.evaluate.metrics import ERROR_FIGURES, encode_errors, error_summary, excess_interval
from autotune.evaluate.metrics import data_metric_draws as metric_draws
from autotune.sampling.capabilities import capabilities_of
from autotune.sampling.named import DIFFUSERS_PEERS, FINALS
from autotune.search.pareto import direction
from autotune.tables import DATA_METRICS, versus  # the one ratio convention: best peer / ours, > 1 ours better

ROOT = Path(__file__).resolve().parents[1]

# peer name -> (diffusers scheduler class, constructor arguments beyond the model's noise schedule): the named
# schedules' own peers (declared once in sampling/named.py) and the variants no named schedule has
_DPM2, _DPM3 = DIFFUSERS_PEERS["dpmsolver++2m"], DIFFUSERS_PEERS["dpmsolver++3m"]
PEERS = {
    "dpmsolver++2m": _DPM2,
    "dpmsolver++3m": _DPM3,
    "dpmsolver++2m-karras": DIFFUSERS_PEERS["dpmsolver++2m-karras"],
    "dpmsolver++3m-karras": DIFFUSERS_PEERS["dpmsolver++3m-karras"],
    "unipc-bh1-o2": DIFFUSERS_PEERS["unipc-bh1-o2-smin"],
    "unipc-bh1-o3": DIFFUSERS_PEERS["unipc-bh1-o3-smin"],
    "unipc-bh2-o2": DIFFUSERS_PEERS["unipc-bh2-o2"],
    "unipc-bh2-o3": DIFFUSERS_PEERS["unipc-bh2-o3"],
    "deis-o2": ("DEISMultistepScheduler", {"solver_order": 2}),
    "deis-o3": ("DEISMultistepScheduler", {"solver_order": 3}),
}
# a flow-matching model's peers: diffusers' flow schedulers (FlowMatchEulerDiscreteScheduler at shifts 1 / 3 / 6,
# UniPC and DPM-Solver++ 2M with use_flow_sigmas), run as the named schedules that reproduce them (to <= 1e-4 in
# fp32, tests/test_flow.py, test_sd3.py, test_flux.py) through our executor: diffusers' VP multistep loop above
# has no flow noise schedule to run on
FLOW_PEERS = ("flow-euler-shift1", "flow-euler-shift3", "flow-euler-shift6", "unipc-flow", "dpmsolver++2m-flow")
# the table's narrow names for them (the legend under the table spells them out)
PEER_LABELS = {"flow-euler-shift1": "euler-s1", "flow-euler-shift3": "euler-s3", "flow-euler-shift6": "euler-s6",
               "unipc-flow": "uni-flow", "dpmsolver++2m-flow": "dpm2m-flow",
               "dpmsolver++2m": "dpm2m", "dpmsolver++3m": "dpm3m", "dpmsolver++2m-karras": "dpm2m-k",
               "dpmsolver++3m-karras": "dpm3m-k", "unipc-bh1-o2": "uni1-o2", "unipc-bh1-o3": "uni1-o3",
               "unipc-bh2-o2": "uni2-o2", "unipc-bh2-o3": "uni2-o3", "deis-o2": "deis2", "deis-o3": "deis3"}
LEGEND = ("ok: target met, NO: missed; peers: dpm2m/3m = DPM-Solver++ 2M/3M (-k: Karras sigmas), "
          "uni1/uni2-oK = UniPC bh1/bh2 order K, deis2/3 = DEIS order 2/3; flow models: euler-sK = "
          "FlowMatchEuler shift K, uni-flow / dpm2m-flow = UniPC / DPM-Solver++ 2M with flow sigmas")

DIST_LEGEND = ("NO, undecided: worse on these noises, but the paired 95% interval of the difference (resampling "
               "the report noises for both) reaches no worse")
TRAIN_STEPS = 1000  # the discretisation a continuous VP schedule is given to diffusers in
DIST_HEADLINE = ("fd", "swd")  # the distribution metric shown as a ratio, the first one a model reports
# "no worse" allows this relative difference: the search may return a peer's own schedule (its seeds are the named
# schedules), which our executor and diffusers' float32 loop reproduce only to about 1e-5 (measured on digits)
SAME_WITHIN = 1e-4
ROW_KEYS = ("model", "nfe", "best_peer", "ours", "peers", "mean_ratio", "mean_ratio_ci", "p99_ratio", "met", "dist",
            "search_wall_s", "true_evaluations")  # what a saved row needs for the tables (--rows)


def code_version() -> str:
    """The checkout's commit the rows were measured on (short hash; "+changes" when tracked files differ from
    it), or "unknown" outside a git checkout: rows of several runs are only comparable with their code."""
    import subprocess

    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+changes" if changed else "")


def mean_target(nfe: int) -> float:
    """The issue's bound on ours / best peer mean: 0.5 at NFE <= 6, 0.7 above (measured at 8 and 10)."""
    return 0.5 if nfe <= 6 else 0.7


# ------------------------------------------------------------------------------------------------- models
def pipeline_dir(work: Path, args) -> Path:
    """The tiny diffusers DDPM pipeline directory of the test suite, trained once into ``work``."""
    path = work / "tiny-ddpm-eps"
    if not (path / "model_index.json").exists():
        sys.path.insert(0, str(ROOT))
        from tests.peers import make_pipeline_dir

        make_pipeline_dir(path)
    return path


def rgb32_dir(param: str, noise: str = "linear") -> Callable[[Path, Any], Path]:
    def build(work: Path, args) -> Path:
        # imported here: the other models run without bench/rgb32.py (and without scikit-learn)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from rgb32 import ensure_rgb32

        return ensure_rgb32(work, param, args.rgb32_steps, noise=noise)
    return build


# bench name -> (the MODEL argument, or a builder of a pipeline directory under --work; guidance)
BENCH_MODELS: dict[str, tuple[str | Callable[[Path, Any], Path], float | None]] = {
    "digits": ("digits", None), "digits-g2": ("digits", 2.0), "digits-g4": ("digits", 4.0), "gmm64": ("gmm64", None),
    "pipeline": (pipeline_dir, None), "rgb32-eps": (rgb32_dir("eps"), None), "rgb32-v": (rgb32_dir("v"), None),
    "rgb32-eps-sd": (rgb32_dir("eps", "sd"), None),  # Stable Diffusion 1.x's noise schedule; trained in session 37
}


def model_argument(name: str, work: Path, args) -> tuple[str, float | None]:
    """(the MODEL argument `autotune search` would be given, the guidance) of a bench model name."""
    spec, guidance = BENCH_MODELS.get(name, (name, None))
    return (spec if isinstance(spec, str) else str(spec(work, args))), guidance


# -------------------------------------------------------------------------------------------------- peers
def is_flow(model) -> bool:
    """A flow-matching model: its peers are FLOW_PEERS."""
    return model.noise.kind == "flow"


def train_alphas_cumprod(noise) -> np.ndarray:
    """The model's noise schedule as diffusers takes it: a DDPM's own alphas_cumprod, or a continuous VP schedule
    at t = (n + 1) / TRAIN_STEPS (our time convention for training step n)."""
    acp = getattr(noise, "alphas_cumprod", None)
    if acp is not None:
        return np.asarray(acp, dtype=np.float64)
    if noise.kind == "vp_linear":
        t = torch.arange(1, TRAIN_STEPS + 1, dtype=torch.float64) / TRAIN_STEPS
        return torch.exp(2.0 * noise.log_alpha(t)).numpy()
    raise SystemExit(f"{noise.kind} noise: diffusers' VP multistep schedulers have no peer on it")


def diffusers_scheduler(model, peer: str, acp: np.ndarray):
    """The peer's diffusers scheduler on exactly the model's noise schedule (its betas) and parameterisation."""
    import diffusers

    cls_name, kwargs = PEERS[peer]
    betas = 1.0 - acp / np.concatenate([[1.0], acp[:-1]])
    return getattr(diffusers, cls_name)(num_train_timesteps=len(acp), trained_betas=betas.tolist(),
                                        prediction_type=model.parameterization, **kwargs)


def run_peer(model, peer: str, noise: torch.Tensor, labels, nfe: int, guidance) -> torch.Tensor:
    """diffusers' loop as its pipelines run it; the network sees training step n at our time (n + 1) / N."""
    acp = train_alphas_cumprod(model.noise)
    sched = diffusers_scheduler(model, peer, acp)
    sched.set_timesteps(nfe)
    x = noise * sched.init_noise_sigma
    calls = 0
    with torch.no_grad():
        for step in sched.timesteps:
            t = torch.tensor((float(step) + 1.0) / len(acp), dtype=torch.float64)
            out = model(sched.scale_model_input(x, step), t, labels, guidance=guidance)
            calls += 1
            x = sched.step(out, step, x).prev_sample
    assert calls == nfe, f"{peer}: {calls} model calls for NFE {nfe}"
    return x


def sample_metrics(model, samples: torch.Tensor, reference, labels) -> dict[str, Any]:
    """The report-set figures `evaluate.metrics.score` gives a schedule, for samples made elsewhere: the error
    summary, the per-sample errors (for paired ratios) and the model's distribution metrics."""
    errors = ((samples.double() - reference.final.double()) ** 2).flatten(1).mean(1).numpy()
    if not np.isfinite(errors).all():
        return {**{k: math.inf for k in ERROR_FIGURES}, "diverged": True}
    row: dict[str, Any] = {**error_summary(errors), PER_SAMPLE: encode_errors(errors), "diverged": False}
    if capabilities_of(model).data_metrics:
        row.update(model.data_metrics(samples, labels))
    return row


def flow_peer_schedule(model, peer: str, nfe: int, guidance):
    """A flow model's peer: the named schedule that reproduces the diffusers flow scheduler (FLOW_PEERS)."""
    import dataclasses

    from autotune.sampling.named import build

    return dataclasses.replace(build(peer, model.noise, nfe), guidance=guidance)


def score_peers(model, report, guidance, nfe: int) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Every peer's report-set figures, and (where the model scores resamples: `paired_dist_intervals`) the diffusers
    peers' samples (a flow model's peers are sampled again when needed: the evaluator keeps no samples)."""
    from autotune.progress_cli import step

    scored, samples = {}, {}
    if is_flow(model):  # the named schedules, scored by the evaluator against the reference ours was scored against
        for peer in FLOW_PEERS:
            with step(f"{peer}, NFE {nfe}, {report.eval_set.size} noises"):
                scored[peer] = report.evaluate(flow_peer_schedule(model, peer, nfe, guidance))
        return scored, samples
    reference = report.reference(guidance, nfe=nfe)  # the one the search's schedule is scored against
    noise, labels = report.eval_set.noise(torch.float32), report.eval_set.labels()
    keep = capabilities_of(model).data_metric_draws
    for peer in PEERS:  # a line each: on a transformer a peer on 1024 noises takes a minute
        with step(f"diffusers {peer}, NFE {nfe}, {len(noise)} noises"):
            x = run_peer(model, peer, noise, labels, nfe, guidance)
            scored[peer] = sample_metrics(model, x, reference, labels)
            if keep:
                samples[peer] = x
    return scored, samples


def report_samples(model, report, schedule) -> torch.Tensor:
    """The schedule's final samples on the report set's noises, as the evaluator drew them to score it."""
    from autotune.sampling.executor import sample_in_chunks

    noise = report.eval_set.noise(torch.float32)
    return sample_in_chunks(model, schedule, noise, report.eval_set.conditions(), check_finite=True).sample


def excess_intervals(ours: dict[str, np.ndarray], peer: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """The 95 % interval of ours' `excess` over the peer per metric, from draws on the same resamples."""
    return {k: list(excess_interval(k, ours[k], peer[k])) for k in ours if k in peer}


# ------------------------------------------------------------------------------------------------- search
def run_search(model, model_arg: str, guidance, nfe: int, args, out: Path, solvers: tuple[str, ...] = ()):
    """`autotune search --model M --nfe N` (with ``--solvers`` when given) as the command runs it; the JobOutcome.
    The job's own report-set table is off: the bench scores the report set itself, beside the peers."""
    from autotune.cache.store import open_store
    from autotune.search.job import JobConfig, run_search_job

    config = JobConfig(model=model_arg, out=out, nfe=str(nfe), method=args.method, budget=args.budget,
                       seed=args.seed, workers=args.workers, guidance=guidance, set_size=args.set_size,
                       refine=args.refine, validate=args.validate, solvers=solvers, score_report=False,
                       **({"final": args.final} if args.final else {}))
    from autotune.cli import _search_hooks

    store = open_store(args.cache) if args.search_cache else None  # None: a first run's cost, every time
    # the command's own progress lines and bars on stderr (a search of a transformer is many silent minutes without)
    return run_search_job(config, store, model=model, hooks=_search_hooks("mse_ref"))


# --------------------------------------------------------------------------------------------------- rows
def _inverse(x: float | None) -> float | None:
    if x is None:
        return None
    return math.inf if x == 0 else 1.0 / x


def ours_over(ours: dict[str, Any], peer: dict[str, Any]) -> tuple[float, float | None, float | None]:
    """(ours / peer mean, and the 95 % interval of that ratio): `versus` inverted, its interval with it."""
    v = versus(ours, peer)
    if v.diverged:
        return math.inf, None, None
    return _inverse(v.ratio), _inverse(v.high), _inverse(v.low)


def p99_over(ours: dict[str, Any], peer: dict[str, Any]) -> tuple[float | None, float | None]:
    """The 95 % interval of ours / peer p99 (`versus`' paired bootstrap, inverted): at a failure rate near 1 %
    (gmm64's mode switches) the p99 of 1024 noises sits on that cliff, and one set of noises says little."""
    v = versus(ours, peer, p99=True)
    return _inverse(v.high), _inverse(v.low)


def no_worse(metric: str, ours: float, peer: float) -> bool:
    slack = SAME_WITHIN * abs(peer)
    return ours >= peer - slack if direction(metric) == "maximize" else ours <= peer + slack


def best_peer(peers: dict[str, dict[str, Any]], figure: str = "mse_ref") -> str:
    """The peer with the lowest ``figure`` among those that did not diverge."""
    return min((p for p in peers if math.isfinite(peers[p]["mse_ref"])), key=lambda p: peers[p][figure])


def dist_entry(metric: str, ours: float, peer: float, interval: list[float] | None) -> dict[str, Any]:
    """A distribution metric's row entry: the figures, no worse (within SAME_WITHIN), and with the paired interval
    of ours' excess over the peer (`paired_dist_intervals`) whether the whole interval is worse ("decided_worse") or no
    worse ("whole_ci_no_worse"); None for both without an interval."""
    slack = SAME_WITHIN * abs(peer)
    entry = {"ours": ours, "peer": peer, "no_worse": no_worse(metric, ours, peer), "excess_ci": interval,
             "decided_worse": None, "whole_ci_no_worse": None}
    if interval is not None:
        entry["decided_worse"], entry["whole_ci_no_worse"] = interval[0] > slack, interval[1] <= slack
    return entry


def dist_met(dist: dict[str, dict[str, Any]]) -> dict[str, bool | None]:
    """The row's distribution targets: every metric no worse on the figure ("dist"); of those with a paired
    interval, every whole interval no worse ("dist_whole_ci") and any whole interval worse ("dist_decided_worse")."""
    measured = [d for d in dist.values() if d["excess_ci"] is not None]
    return {"dist": all(d["no_worse"] for d in dist.values()) if dist else None,
            "dist_whole_ci": all(d["whole_ci_no_worse"] for d in measured) if measured else None,
            "dist_decided_worse": any(d["decided_worse"] for d in measured) if measured else None}


def compare_row(name: str, nfe: int, ours: dict[str, Any], peers: dict[str, dict[str, Any]], outcome,
                dist_ci: dict[str, list[float]] | None = None) -> dict:
    """One table row: ours against the best peer (lowest mean), the targets, the search's cost; ``dist_ci``:
    the distribution metrics' paired intervals against that peer (`paired_dist_intervals`), where measured."""
    best, best_p99 = best_peer(peers), best_peer(peers, "mse_ref_p99")
    peer = peers[best]
    mean_ratio, ci_low, ci_high = ours_over(ours, peer)
    p99_ratio = ours["mse_ref_p99"] / peer["mse_ref_p99"] if peer["mse_ref_p99"] > 0 else math.inf
    p99_low, p99_high = p99_over(ours, peer)
    dist = {k: dist_entry(k, ours[k], peer[k], (dist_ci or {}).get(k)) for k in DATA_METRICS if k in ours and k in peer}
    headline = next((k for k in DIST_HEADLINE if k in dist), None)
    target = mean_target(nfe)
    figures = ("mse_ref", "mse_ref_median", "mse_ref_p99")
    return {
        "model": name, "nfe": nfe, "best_peer": best, "best_p99_peer": best_p99,
        "ours": {k: ours.get(k) for k in (*figures, *DATA_METRICS) if k in ours},
        "peers": {p: {k: m.get(k) for k in (*figures, *DATA_METRICS, "diverged") if k in m} for p, m in peers.items()},
        "mean_ratio": mean_ratio, "mean_ratio_ci": [ci_low, ci_high], "mean_target": target,
        "median_ratio": ours["mse_ref_median"] / peer["mse_ref_median"] if peer["mse_ref_median"] > 0 else math.inf,
        "p99_ratio": p99_ratio, "p99_ratio_ci": [p99_low, p99_high],
        "p99_vs_best_p99": ours["mse_ref_p99"] / peers[best_p99]["mse_ref_p99"],
        "dist": dist, "dist_headline": headline,
        "dist_ratio": dist[headline]["ours"] / dist[headline]["peer"] if headline else None,
        "met": {"mean": mean_ratio <= target, "mean_whole_ci": ci_high is not None and ci_high <= target,
                "p99": no_worse("mse_ref_p99", ours["mse_ref_p99"], peer["mse_ref_p99"]),
                "p99_whole_ci": p99_high is not None and p99_high <= 1 + SAME_WITHIN,
                **dist_met(dist)},
        "search_wall_s": outcome.seconds, "search_loop_s": outcome.search_seconds,
        "true_evaluations": outcome.true_evaluations, "method": outcome.method, "final": outcome.config.final,
        "ends_at": outcome.best.times[-1],  # where the written schedule ends (T_MIN_STARTS may end it at t_min)
        "budget_spent": outcome.budget_spent,  # both searches' where the job ran one ending at t_min
        "schedule": str(outcome.schedule_path),
    }


def bench_model(name: str, args, work: Path) -> list[dict]:
    from autotune.cache.store import open_store
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.registry import load_model
    from autotune.progress_cli import step

    model_arg, guidance = model_argument(name, work, args)
    model = load_model(model_arg)
    if not is_flow(model):
        train_alphas_cumprod(model.noise)  # a noise schedule no peer runs on: stop now, not after the first search
    report = Evaluator(model, "report", size=args.report_size, store=open_store(args.cache), model_spec=model_arg)
    rows = []
    for nfe in args.nfe:
        print(f"{name} NFE {nfe}: search ...", file=sys.stderr, flush=True)
        outcome = run_search(model, model_arg, guidance, nfe, args, work / f"{name}-nfe{nfe}.json")
        print(f"{name} NFE {nfe}: {outcome.seconds:.0f} s, {outcome.true_evaluations} true evaluations; scoring "
              f"it and {len(FLOW_PEERS if is_flow(model) else PEERS)} peers on {report.eval_set.id}",
              file=sys.stderr, flush=True)
        with step(f"scoring ours, {report.eval_set.size} noises") as progress:
            report.progress = progress  # the report set's reference, solved first unless cached
            ours = report.evaluate(outcome.best)
        peers, peer_samples = score_peers(model, report, guidance, nfe)
        row = compare_row(name, nfe, ours, peers, outcome,
                          paired_dist_intervals(model, report, outcome.best, ours, peers, peer_samples, nfe, guidance))
        row["report_set"] = report.eval_set.id
        row["code"], row["date"] = args.code, time.strftime("%Y-%m-%d")
        row["reference_dist"] = report.reference_data_metrics(outcome.best)  # what ours was scored against
        if args.score_finalists:
            fin = score_finalists(report, outcome, row["peers"][row["best_peer"]]["mse_ref"])
            if fin is not None:
                row["finalists"] = fin
        if args.grown_space:
            solvers = tuple(s.strip() for s in args.grown_space.split(","))
            grown_outcome = run_search(model, model_arg, guidance, nfe, args, work / f"{name}-nfe{nfe}-grown.json",
                                       solvers)
            grown = report.evaluate(grown_outcome.best)
            vs_default, low, high = ours_over(grown, ours)
            peer = row["peers"][row["best_peer"]]
            row["grown"] = {"solvers": list(solvers), "mse_ref": grown["mse_ref"], "vs_default": vs_default,
                            "vs_default_ci": [low, high], "vs_best_peer": grown["mse_ref"] / peer["mse_ref"],
                            "wall_s": grown_outcome.seconds, "true_evaluations": grown_outcome.true_evaluations,
                            "solvers_used": sorted({st.solver for st in grown_outcome.best.steps})}
        rows.append(row)
    return rows


FINALIST_FIGURES = ("mse_ref", "mse_ref_median", "mse_ref_p99", "mse_ref_cvar")


def score_finalists(report, outcome, peer_mean: float) -> dict[str, Any] | None:
    """Every finalist validation scored in full (never one its screen stopped), scored on the report set too: how
    far the rule that chose on validation (search/selection.py) was from the finalist the report set puts lowest.
    A diagnostic only: nothing here changes what the job wrote. Per finalist its validation and report figures,
    the report mean over the best peer's, and its schedule file (so another rule can be checked on these rows
    later without running the job again); None where the job ran no validation."""
    from autotune.progress_cli import step
    from autotune.search.selection import selection_value
    from autotune.space.fileformat import dumps

    note = outcome.validation
    if note is None:
        return None
    full = [f for f in note.scored if not f.screened]
    by_label = {}
    with step(f"{len(full)} finalists, {report.eval_set.size} noises") as progress:
        report.progress = progress
        for f in full:
            r = report.evaluate(f.schedule)
            by_label[f.label] = {
                "validation": {k: f.validation.get(k) for k in FINALIST_FIGURES},
                "selection": selection_value(f.validation),
                "report": {k: r.get(k) for k in FINALIST_FIGURES},
                "report_over_best_peer": r["mse_ref"] / peer_mean if peer_mean > 0 else math.inf,
                "schedule": dumps(f.schedule)}
    return {"chosen": note.chosen.label, "validation_set": note.set_id, "by_label": by_label}


def finalist_lines(rows: list[dict]) -> list[str]:
    """Per row with scored finalists: the chosen one's report mean over the best peer's, the finalist with the
    lowest validation mean's, and the finalist the report set puts lowest (labels as validation names them)."""
    lines = []
    for r in rows:
        fin = r.get("finalists")
        if not fin:
            continue
        by = fin["by_label"]

        def text(label: str) -> str:
            f = by[label]
            return f"{f['report_over_best_peer']:.2f} ({label})"

        lowest_val = min(by, key=lambda k: by[k]["validation"]["mse_ref"])
        lowest_rep = min(by, key=lambda k: by[k]["report"]["mse_ref"])
        lines.append(f"{r['model']} NFE {r['nfe']}, report mean / best peer's: chosen {text(fin['chosen'])}; "
                     f"lowest validation mean {text(lowest_val)}; lowest on the report set {text(lowest_rep)}; "
                     f"{len(by)} finalists")
    return lines


def paired_dist_intervals(model, report, schedule, ours: dict[str, Any], peers: dict[str, dict[str, Any]],
                          peer_samples: dict[str, torch.Tensor], nfe: int, guidance) -> dict[str, list[float]]:
    """Each distribution metric's paired-bootstrap 95 % interval of ours' excess over the best peer (`excess`: both
    sample sets resampled alike, `excess_intervals`), on samples drawn again (the evaluator keeps none); they must
    give the figures the report scored, or the intervals would be of other samples. {} where the model cannot
    score resamples (``data_metric_draws``)."""
    from autotune.progress_cli import step

    if not capabilities_of(model).data_metric_draws or ours.get("diverged"):
        return {}
    best, labels = best_peer(peers), report.eval_set.labels()
    with step(f"distribution metrics: paired intervals against {best}"):
        mine = report_samples(model, report, schedule)
        theirs = peer_samples.get(best)
        if theirs is None:  # a flow peer, scored by the evaluator; or a saved row's (--recheck-dist)
            theirs = (report_samples(model, report, flow_peer_schedule(model, best, nfe, guidance)) if is_flow(model)
                      else run_peer(model, best, report.eval_set.noise(torch.float32), labels, nfe, guidance))
        draws = []
        for name, samples, figures in (("ours", mine, ours), (best, theirs, peers[best])):
            again, resampled = metric_draws(model, samples, labels)
            # 1e-5: FD's eigendecompositions differ by ~1e-6 relative between the formula of rows saved before
            # session 38 and today's batched one; samples that differ differ far more
            if any(not math.isclose(again[k], figures[k], rel_tol=1e-5, abs_tol=1e-9) for k in again if k in figures):
                raise RuntimeError(f"{name}: its samples drawn again score {again}, the report scored "
                                   f"{ {k: figures[k] for k in again if k in figures} }")
            draws.append(resampled)
        return excess_intervals(*draws)


def recheck_dist(rows: list[dict], args, work: Path, log: Callable[[str], None]) -> None:
    """--recheck-dist: the paired distribution intervals of saved rows, from their schedule files and the best peer
    sampled again on the same report noises (no search); the rows are updated in place. A row whose schedule file
    is gone, or whose model scores no resamples, keeps what it had (said in ``log``)."""
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.registry import load_model
    from autotune.space.fileformat import loads

    models: dict[str, tuple[Any, str, Any]] = {}
    for row in rows:
        what = f"{row['model']} NFE {row['nfe']}"
        path, found = Path(row.get("schedule", "")), re.search(r"^report-s(\d+)-n(\d+)-", row.get("report_set", ""))
        if not row["dist"] or not path.is_file() or not found:
            log(f"{what}: kept as saved ({'no distribution metric' if not row['dist'] else 'no schedule file'})")
            continue
        if row["model"] not in models:
            model_arg, guidance = model_argument(row["model"], work, args)
            models[row["model"]] = (load_model(model_arg), model_arg, guidance)
        model, model_arg, guidance = models[row["model"]]
        if not capabilities_of(model).data_metric_draws:
            log(f"{what}: kept as saved (the model scores no resamples)")
            continue
        report = Evaluator(model, "report", size=int(found.group(2)), seed=int(found.group(1)), model_spec=model_arg)
        best = row["best_peer"]
        intervals = paired_dist_intervals(model, report, loads(path.read_text(), str(path)), row["ours"],
                                          {best: row["peers"][best]}, {}, row["nfe"], guidance)
        row["dist"] = {k: dist_entry(k, d["ours"], d["peer"], intervals.get(k)) for k, d in row["dist"].items()}
        row["met"].update(dist_met(row["dist"]))
        row["dist_ci_code"] = args.code
        log(f"{what}: " + ", ".join(f"{DATA_METRICS[k]} {dist_verdict(d)}" for k, d in row["dist"].items()))


# ------------------------------------------------------------------------------------------------- tables
def ratio_text(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def ci_text(low: float | None, high: float | None) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "-"
    return f"[{ratio_text(low)},{ratio_text(high)}]"


def marked(ratio: float | None, met: bool | None, target: float | None = None) -> str:
    """The ratio and its mark; in three decimals where two would print the target itself (0.495 met and 0.503
    missed would both read 0.50)."""
    text = ratio_text(ratio)
    if target is not None and ratio is not None and math.isfinite(ratio) and text == ratio_text(target):
        text = f"{ratio:.3f}"
    return text if met is None else f"{text} {'ok' if met else 'NO'}"


def _table(*headers: str, title: str):
    from rich import box
    from rich.table import Column, Table

    columns = [Column(h, no_wrap=True, justify="left" if i < 3 else "right") for i, h in enumerate(headers)]
    # no padding: SIMPLE_HEAD's blank divider is the one space between columns, so nine fit in 80
    return Table(*columns, title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=0)


def evals_text(row: dict) -> str:
    """The search's true evaluations; with partial scores (s3-mf) the whole-set evaluations spent / the scores."""
    spent = row.get("budget_spent", row["true_evaluations"])
    return str(row["true_evaluations"]) if spent == row["true_evaluations"] else f"{spent:g}/{row['true_evaluations']}"


def report_sizes(rows: list[dict]) -> str:
    """The report-set sizes of the rows ("1024", "1024 / 16384"), read from their sets' ids (eval_set_id)."""
    sizes = sorted({int(m.group(1)) for r in rows if (m := re.search(r"-n(\d+)-", r.get("report_set", "")))})
    return " / ".join(str(n) for n in sizes) or "?"


def results_table(rows: list[dict]):
    sizes = report_sizes(rows)
    table = _table("model", "NFE", "best peer", "mean", "95% CI", "p99", "dist", "wall s", "evals",
                   title=f"ours / best peer at the same NFE (< 1: ours lower), report set{'s' * ('/' in sizes)} of "
                         f"{sizes}")
    for r in rows:
        dist = marked(r["dist_ratio"], r["met"]["dist"]) if r["dist"] else "-"
        table.add_row(r["model"], str(r["nfe"]), PEER_LABELS.get(r["best_peer"], r["best_peer"]),
                      marked(r["mean_ratio"], r["met"]["mean"], r.get("mean_target", mean_target(r["nfe"]))),
                      ci_text(*r["mean_ratio_ci"]), marked(r["p99_ratio"], r["met"]["p99"], 1.0), dist,
                      f"{r['search_wall_s']:.0f}", evals_text(r))
    return table


def grown_table(rows: list[dict], solvers: str):
    table = _table("model", "NFE", "grown/default", "95% CI", "/ best peer", "wall s", "evals",
                   title=f"--solvers {solvers} vs the default space (< 1: grown lower)")
    for r in rows:
        g = r["grown"]
        table.add_row(r["model"], str(r["nfe"]), ratio_text(g["vs_default"]), ci_text(*g["vs_default_ci"]),
                      ratio_text(g["vs_best_peer"]), f"{g['wall_s']:.0f}", str(g["true_evaluations"]))
    return table


def dist_table(rows: list[dict]):
    """Every distribution metric: ours, the best peer's and the reference solution's own samples'."""
    table = _table("model", "NFE", "metric", "ours", "best peer", "reference", "no worse",
                   title="distribution metrics (reference: the model's ODE solved to convergence)")
    for r in rows:
        for k, d in r["dist"].items():
            ref = r.get("reference_dist", {}).get(k)
            table.add_row(r["model"], str(r["nfe"]), DATA_METRICS[k], f"{d['ours']:.4g}", f"{d['peer']:.4g}",
                          "-" if ref is None else f"{ref:.4g}", dist_verdict(d))
    return table


def dist_verdict(entry: dict[str, Any]) -> str:
    """ok; NO; or, with the paired interval, "NO, undecided" where it reaches no worse (DIST_LEGEND)."""
    if entry["no_worse"]:
        return "ok"
    return "NO, undecided" if entry.get("decided_worse") is False else "NO"


def saved_rows(paths: list[str]) -> list[dict]:
    """The rows of earlier runs' --json files, one per (model, NFE): a later file's row replaces an earlier one's
    (list the files oldest first). A file that is not such a list raises ValueError naming it."""
    merged: dict[tuple[str, int], dict] = {}
    for path in paths:
        try:
            rows = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable rows file ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a rows file is the JSON list --json writes, not {type(rows).__name__}")
        for i, row in enumerate(rows):
            missing = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
            if missing:
                raise ValueError(f"{path}: row {i} lacks {', '.join(missing)}")
            merged.pop((row["model"], row["nfe"]), None)  # re-inserted: the table keeps the order rows came in
            merged[(row["model"], row["nfe"])] = {**row, "rows_file": str(path)}
    return list(merged.values())


def provenance(rows: list[dict]) -> list[str]:
    """A line per code version: which rows were measured on it, and when (rows written before the bench recorded
    its commit say "code not recorded")."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        code = r.get("code") or "code not recorded"
        when = f", {r['date']}" if r.get("date") else ""
        groups.setdefault(code, []).append(f"{r['model']} {r['nfe']}{when}")
    return [f"{code}: {'; '.join(which)}" for code, which in groups.items()]


def summary(rows: list[dict]) -> list[str]:
    """A line per target: how many rows met it."""
    def count(selected: list[dict], key: str, what: str) -> str:
        if not selected:
            return f"{what}: no row"
        met = sum(bool(r["met"][key]) for r in selected)
        whole = sum(bool(r["met"].get(f"{key}_whole_ci")) for r in selected)
        tail = f" (whole 95% CI: {whole})" if key in ("mean", "p99") else ""
        return f"{what}: met in {met} of {len(selected)} rows{tail}"

    low = [r for r in rows if r["nfe"] <= 6]
    high = [r for r in rows if r["nfe"] > 6]
    with_dist = [r for r in rows if r["dist"]]
    dist = count(with_dist, "dist", "distribution metrics no worse (models with one)")
    measured = [r for r in with_dist if r["met"].get("dist_decided_worse") is not None]
    if measured:
        worse = sum(bool(r["met"]["dist_decided_worse"]) for r in measured)
        whole = sum(bool(r["met"]["dist_whole_ci"]) for r in measured)
        dist += (f"; of {len(measured)} with paired intervals, worse with the whole 95% CI in {worse}, no worse "
                 f"with it in {whole}")
    return [count(low, "mean", "mean <= 0.5x best peer, NFE <= 6"),
            count(high, "mean", "mean <= 0.7x best peer, NFE > 6"),
            count(rows, "p99", "p99 no worse than best peer"), dist]


def main() -> None:
    from rich.console import Console

    from autotune.search.job import JobConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(BENCH_MODELS), help=f"comma-separated: {', '.join(BENCH_MODELS)}"
                        " (or any MODEL argument)")
    parser.add_argument("--nfe", default="4,5,6,8,10")
    parser.add_argument("--report-size", type=int, default=1024, help="held-out report-set noises")
    parser.add_argument("--budget", type=int, default=JobConfig.budget, help="the search's (default: the command's)")
    parser.add_argument("--set-size", type=int, default=JobConfig.set_size, help="search-set size (0: the default)")
    parser.add_argument("--validate", type=int, default=JobConfig.validate,
                        help="validation-set size (default: the command's)")
    parser.add_argument("--method", default=None, help="replace the default search method")
    parser.add_argument("--final", default=None, choices=FINALS,
                        help="replace where the searched schedules end (the command's --final)")
    parser.add_argument("--refine", type=int, default=None,
                        help="gradient steps on the winner's grid, shifts and ratios (default: autotune search's)")
    parser.add_argument("--workers", type=int, default=0, help="Ray workers of the search (0: in this process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work", default="bench-search-work", help="folder for schedules, the cache, the pipelines")
    parser.add_argument("--search-cache", action="store_true",
                        help="the searches use the bench's cache (references solved once; a rerun resumes)")
    parser.add_argument("--rgb32-steps", type=int, default=None, help="training steps of an rgb32 model built now")
    parser.add_argument("--json", default=None, help="also write every row here")
    parser.add_argument("--recheck-dist", action="store_true",
                        help="with --rows: give the saved rows' distribution metrics their paired intervals, from "
                             "their schedule files and the best peer sampled again (no search)")
    parser.add_argument("--rows", nargs="+", default=None, metavar="FILE",
                        help="run nothing: print the tables and the summary of earlier runs' --json files (oldest "
                             "first; a later row of the same model and NFE replaces an earlier one), with the code "
                             "each row was measured on; with --json, write the merged rows there")
    parser.add_argument("--score-finalists", action="store_true",
                        help="also score every finalist validation chose among on the report set (a diagnostic of "
                             "the selection rule; the row's figures stay the written schedule's)")
    parser.add_argument("--grown-space", default=None, metavar="SOLVERS",
                        help="also search with `--solvers SOLVERS` (e.g. dpm,unip-bh1,unip-bh2,ipndm,dpm-single) and "
                             "compare it with the default space on the same report set")
    args = parser.parse_args()
    console = Console()
    args.code = code_version()
    if args.recheck_dist and not args.rows:
        parser.error("--recheck-dist rechecks saved rows: give them with --rows")
    if args.rows:
        try:
            rows = saved_rows(args.rows)
        except ValueError as e:
            parser.error(str(e))
        if args.recheck_dist:
            torch.set_num_threads(args.threads)
            recheck_dist(rows, args, Path(args.work), lambda line: print(line, file=sys.stderr, flush=True))
        print_rows(console, rows, args)
        console.print("rows measured on (commit, date):", highlight=False)
        for line in provenance(rows):
            console.print(f"  {line}", highlight=False)
        return
    args.nfe = [int(n) for n in args.nfe.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.cache = str(work / "cache.sqlite")
    torch.set_num_threads(args.threads)
    method = JobConfig(model="digits", method=args.method).search_method
    changed = [f"{k} {v}" for k, v in (("method", args.method), ("refine", args.refine), ("final", args.final))
               if v is not None]
    console.print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s); search: "
                  + (f"NOT the default ({', '.join(changed)})" if changed else "the default `autotune search`")
                  + f", method {method}, budget {args.budget}, {args.workers} workers", highlight=False)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args, work)
    print_rows(console, rows, args)
    console.print(f"code: {args.code}", highlight=False)


def print_rows(console, rows: list[dict], args) -> None:
    """The tables and the summary of ``rows`` (and --json)."""
    console.print(results_table(rows))
    console.print(LEGEND + "; dist: " + ", ".join(DATA_METRICS[k] for k in DIST_HEADLINE) + " ratio, its mark "
                  "checks every distribution metric the model reports; wall s and evals: the search job's (a search "
                  "with partial scores: whole-set evaluations spent / scores)",
                  highlight=False)
    if any(r["dist"] for r in rows):
        console.print(dist_table(rows))
        console.print(DIST_LEGEND, highlight=False)
    grown = [r for r in rows if "grown" in r]
    if grown:
        console.print(grown_table(grown, " / ".join(sorted({",".join(r["grown"]["solvers"]) for r in grown}))))
    fin = finalist_lines(rows)
    if fin:
        console.print("the finalists on the report set (validation chose; the report set only measures):",
                      highlight=False)
        for line in fin:
            console.print(f"  {line}", highlight=False)
    for line in summary(rows):
        console.print(line, highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
