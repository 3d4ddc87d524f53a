"""Search cost: the budget each method needs to reach the final quality of `evolution`.

Every method runs the search stage of `autotune search` itself (search/job.py: the same space, search set,
seeds = the named schedules, batches and search id) in this process with the same budget and no cache, so each
method pays its own way; validation, refinement and the report set are off, as they do not change the count. The
budget counts whole-set evaluations: a candidate scored in full costs one, one `s3-mf` scores on its first noises
only costs that share (search/runner.py). The target is evolution's final best search-set value; for each method
the bench prints its own final best, the budget it had spent when its best-so-far (scores in full only) first
reached the target (or "never"), as a share of evolution's, the search loop's wall time (the search set's
reference is solved before it) and how many of its evaluations set a new best.

Where the predictor's ranking is wrong (s3): each schedule s3's predictor proposed is set against its true
search-set value. Per round (one ask answered by the predictor), the Kendall tau between predicted and true
log(mse_ref) over the round's proposals, the mean error (predicted - true, in log units: < 0 means it promised
more than it found) and how many proposals beat the best value told before the round; then the same errors split
by how far each proposal lay from the nearest point the predictor was trained on (thirds of the distance in
feature space): extrapolation is where a predictor fitted to a few dozen points goes wrong. A screened trial's
value (stopped early by the search's screen) is the screen's estimate.

One seed says little: which mutation of a named schedule evolution happens to find first moves its final value and
when it got there (digits NFE 5: reached at evaluation 16 with seed 0, at 5 with seed 1, a named schedule it never
improved on), so the bench runs every method at each of ``--seeds`` and prints, per method, the share of
evolution's budget it needed at each seed (its own seed's evolution is the target) and their median ("never" counts
as worse than any share).

    python bench/search_cost.py                                   # digits, NFE 5, budget 96, seeds 0, 1, 2
    python bench/search_cost.py --model gmm64 --methods evolution,s3 --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import contextlib
import math

import numpy as np
import torch


def best_so_far(trials: list) -> list[float]:
    """Best value after each true evaluation (cache hits are free and do not advance the count). A trial scored in
    part (``s3-mf``'s partial scores: ``cost`` set) holds an estimate, never the best: the best so far stays."""
    out, best = [], math.inf
    for t in trials:
        if t.cost is None:
            best = min(best, t.value)
        if not t.cached:
            out.append(best)
    return out


def spent_so_far(trials: list) -> list[float]:
    """The budget used after each true evaluation: 1 each, or its share of the set for a partial score."""
    out, spent = [], 0.0
    for t in trials:
        if not t.cached:
            spent += 1.0 if t.cost is None else t.cost
            out.append(spent)
    return out


def new_bests(curve: list[float]) -> int:
    """True evaluations that lowered the best so far (the first one counts)."""
    return sum(1 for i, v in enumerate(curve) if i == 0 or v < curve[i - 1])


def evaluations_to_reach(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


@contextlib.contextmanager
def progress_lines(description: str, budget: int):
    """A line every third batch of the search loop (a digits search is a minute long)."""
    batches = [0]

    def on_batch(p) -> None:
        batches[0] += 1
        if batches[0] % 3 == 0 or p.spent >= budget:
            print(f"  {description}: {p.spent:.4g}/{budget} evaluations, best {p.best_value:.3e}", flush=True)
    yield on_batch


def reach_share(curve: list[float], evolution: list[float], spent: list[float] | None = None) -> float:
    """The budget ``curve`` used to reach evolution's final value (``spent`` after each of its evaluations; None:
    one each), as a share of evolution's evaluations (inf: not reached)."""
    n = evaluations_to_reach(curve, evolution[-1])
    if not n:
        return math.inf
    return (spent[n - 1] if spent is not None else n) / len(evolution)


def median_share(shares: list[float]) -> float:
    """The median share over seeds (inf, not reached, sorts last; an even count takes the upper middle, so a
    method that failed at half the seeds has an infinite median)."""
    return sorted(shares)[len(shares) // 2]


def run_search_stage(config, model):
    """The job's search stage alone (no store: a fresh memory), and the strategy that ran it."""
    from autotune.search.job import JobHooks, open_pool, prepare_search, run_stage1

    setup = prepare_search(config, None, model=model)
    pool = open_pool(setup)
    try:
        return run_stage1(setup, pool, JobHooks(search_progress=progress_lines)), setup.strategy
    finally:
        pool.close()


def search_set_size(config, model) -> int:
    """The search set the job would use (a cheap model's is larger; search/set_sizes.py decides that by timing a
    probe, which a loaded machine or a cold first run can tip), chosen once so every method scores on the same."""
    from autotune.search.job import prepare_search

    return prepare_search(config, None, model=model).sizes.search


def prediction_rows(predictions: list, trials: list) -> list[dict]:
    """Each prediction with the proposal's true log value and the best true value told before its round."""
    value = {t.hash: t.value for t in trials}
    order = [t.hash for t in trials if not t.cached]
    rows = []
    for p in predictions:
        true = value.get(p.hash, math.nan)
        if not math.isfinite(true) or true <= 0:
            continue  # diverged: the predictor's log target caps it, there is no error to measure
        before = [value[h] for h in order[:p.told] if math.isfinite(value[h])]
        rows.append({"round": p.round, "pred": p.mean, "true": math.log(true), "distance": p.distance,
                     "improved": bool(before) and true < min(before)})
    return rows


def print_prediction_report(rows: list[dict]) -> None:
    from autotune.predictors.s3 import ranking_quality

    if not rows:
        print("s3: the predictor proposed nothing that was scored")
        return
    print("\ns3's predictor on its own proposals (log mse_ref)\nerror = predicted - true (< 0: over-promised)")
    print(f"{'round':>5} {'n':>3} {'kendall':>8} {'mean err':>9} {'|err|':>6} {'beat best':>9}")
    for r in sorted({row["round"] for row in rows}):
        batch = [row for row in rows if row["round"] == r]
        err = np.array([row["pred"] - row["true"] for row in batch])
        tau = ranking_quality([b["pred"] for b in batch], [b["true"] for b in batch]).kendall if len(batch) > 1 \
            else math.nan
        print(f"{r:5d} {len(batch):3d} {tau:8.2f} {err.mean():9.2f} {np.abs(err).mean():6.2f} "
              f"{sum(b['improved'] for b in batch):5d}/{len(batch):<3d}")
    dist = np.array([row["distance"] for row in rows])
    err = np.array([row["pred"] - row["true"] for row in rows])
    edges = np.quantile(dist, [0, 1 / 3, 2 / 3, 1])
    print("by distance to the nearest training point (features), thirds of the proposals:")
    for k in range(3):
        inside = (dist >= edges[k]) & ((dist < edges[k + 1]) if k < 2 else (dist <= edges[k + 1]))
        if inside.any():
            print(f"  distance {edges[k]:5.2f}-{edges[k + 1]:5.2f}: {int(inside.sum()):3d} proposals, mean err "
                  f"{err[inside].mean():6.2f}, |err| {np.abs(err[inside]).mean():5.2f}")
    tau = ranking_quality([row["pred"] for row in rows], [row["true"] for row in rows]).kendall
    print(f"all rounds: kendall {tau:.2f}, mean err {err.mean():.2f}, |err| {np.abs(err).mean():.2f}")


def seed_list(text: str) -> list[int]:
    """``--seeds``: comma-separated non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers like 0,1,2, got {text!r}")
    return seeds


def run_seed(model, args, seed: int) -> tuple[dict, list[dict] | None, int]:
    """Each method's best-so-far curve and wall time at ``seed``, s3's prediction rows, the number of named seeds."""
    from autotune.search.job import JobConfig

    results, s3_rows, named = {}, None, 0
    for method in args.methods.split(","):
        config = JobConfig(model=args.model, nfe=str(args.nfe), method=method, budget=args.budget, seed=seed,
                           refine=0, validate=0, score_report=False,  # the search stage alone: no file, no report set
                           set_size=args.set_size)
        search, strategy = run_search_stage(config, model)
        named = len(strategy.context.seeds)
        results[method] = (best_so_far(search.trials), search.seconds, spent_so_far(search.trials))
        if method == "s3":
            s3_rows = prediction_rows(strategy.predictions, search.trials)
        curve, spent = results[method][0], results[method][2]
        part = f", {spent[-1]:.1f} spent" if spent[-1] != len(curve) else ""  # partial scores at their share
        print(f"seed {seed} {method:9s} best {curve[-1]:.4e}, {len(curve)} scores{part}, {new_bests(curve)} new "
              f"bests, {results[method][1]:.0f} s", flush=True)
    return results, s3_rows, named


def main() -> None:
    from autotune.models.registry import load_model
    from autotune.search.job import JobConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--budget", type=int, default=JobConfig.budget)
    parser.add_argument("--methods", default="evolution,s3,s3-mf,optuna-tpe,random")
    parser.add_argument("--set-size", type=int, default=0, help="search noises (default: the job's choice)")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="search seeds (default 0,1,2)")
    args = parser.parse_args()
    seeds = args.seeds
    torch.set_num_threads(1)
    model = load_model(args.model)
    if not args.set_size:
        args.set_size = search_set_size(JobConfig(model=args.model, nfe=str(args.nfe), refine=0, validate=0,
                                                  score_report=False), model)
    print(f"{args.model} NFE {args.nfe}: every method scores on the same {args.set_size} search noises", flush=True)
    shares: dict[str, list[float]] = {m: [] for m in args.methods.split(",")}
    s3_rows: list[dict] = []
    for seed in seeds:
        results, rows, named = run_seed(model, args, seed)
        s3_rows += rows or []
        if "evolution" not in results:
            continue
        evolution = results["evolution"][0]
        n_evo = evaluations_to_reach(evolution, evolution[-1])
        kept = "\n  (a named schedule: evolution never improved on the seeds)" if n_evo <= named else ""
        print(f"seed {seed}: target {evolution[-1]:.4e}, evolution's final value, first reached at {n_evo}{kept}",
              flush=True)
        for method, (curve, _, spent) in results.items():
            shares[method].append(reach_share(curve, evolution, spent))
    if "s3" in shares:
        print_prediction_report(s3_rows)
    if "evolution" not in shares:
        return
    print(f"\n{args.model} NFE {args.nfe}: share of {args.budget} spent to reach evolution's final value\n"
          f"(seeds {', '.join(map(str, seeds))}; never: not reached)")
    for method, values in shares.items():
        cells = " ".join("never" if math.isinf(v) else f"{v:.2f}" for v in values)
        med = median_share(values)
        print(f"  {method:9s} {cells}   median " + ("never" if math.isinf(med) else f"{med:.2f}"))


if __name__ == "__main__":
    main()
