"""Search cost: true evaluations each method needs to reach the final quality of `evolution`.

Every method runs the search stage of `autotune search` itself (search/job.py: the same space, search set,
seeds = the named schedules, batches and search id) in this process with the same budget of true evaluations
and no cache, so each method pays its own way; validation, refinement and the report set are off, as they do
not change the count. The target is evolution's final best search-set value; for each method the bench
prints its own final best and the first true evaluation at which its best-so-far reached the target (or "not
reached"), the ratio to evolution's, the search loop's wall time (the search set's reference is solved
before it) and how many of its evaluations set a new best.

Where the predictor's ranking is wrong (s3): each schedule s3's predictor proposed is set against its true
search-set value. Per round (one ask answered by the predictor), the Kendall tau between predicted and true
log(mse_ref) over the round's proposals, the mean error (predicted - true, in log units: < 0 means it promised
more than it found) and how many proposals beat the best value told before the round; then the same errors split
by how far each proposal lay from the nearest point the predictor was trained on (thirds of the distance in
feature space): extrapolation is where a predictor fitted to a few dozen points goes wrong. A screened trial's
value (stopped early by the search's screen) is the screen's estimate.

    python bench/search_cost.py                                   # digits, NFE 5, the default budget (96)
    python bench/search_cost.py --methods evolution,s3 --budget 200
"""

from __future__ import annotations

import argparse
import contextlib
import math

import numpy as np
import torch


def best_so_far(trials: list) -> list[float]:
    """Best value after each true evaluation (cache hits are free and do not advance the count)."""
    out, best = [], math.inf
    for t in trials:
        best = min(best, t.value)
        if not t.cached:
            out.append(best)
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
        if batches[0] % 3 == 0 or p.true_evaluations >= budget:
            print(f"  {description}: {p.true_evaluations}/{budget} evaluations, best {p.best_value:.3e}", flush=True)
    yield on_batch


def run_search_stage(config, model):
    """The job's search stage alone (no store: a fresh memory), and the strategy that ran it."""
    from autotune.search.job import JobHooks, open_pool, prepare_search, run_stage1

    setup = prepare_search(config, None, model=model)
    pool = open_pool(setup)
    try:
        return run_stage1(setup, pool, JobHooks(search_progress=progress_lines)), setup.strategy
    finally:
        pool.close()


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
    print("\ns3's predictor on its own proposals (log mse_ref; error = predicted - true, < 0: over-promised)")
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
    print("by distance to the nearest training point (feature space), thirds of the proposals:")
    for k in range(3):
        inside = (dist >= edges[k]) & ((dist < edges[k + 1]) if k < 2 else (dist <= edges[k + 1]))
        if inside.any():
            print(f"  distance {edges[k]:5.2f}-{edges[k + 1]:5.2f}: {int(inside.sum()):3d} proposals, mean err "
                  f"{err[inside].mean():6.2f}, |err| {np.abs(err[inside]).mean():5.2f}")
    tau = ranking_quality([row["pred"] for row in rows], [row["true"] for row in rows]).kendall
    print(f"all rounds: kendall {tau:.2f}, mean err {err.mean():.2f}, |err| {np.abs(err).mean():.2f}")


def main() -> None:
    from autotune.models.registry import load_model
    from autotune.search.job import JobConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--budget", type=int, default=JobConfig.budget)
    parser.add_argument("--methods", default="evolution,s3,optuna-tpe,random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    results, s3_rows = {}, None
    for method in args.methods.split(","):
        config = JobConfig(model=args.model, nfe=str(args.nfe), method=method, budget=args.budget, seed=args.seed,
                           refine=0, validate=0, score_report=False)  # the search stage alone: no file, no report set
        search, strategy = run_search_stage(config, model)
        results[method] = (best_so_far(search.trials), search.seconds)
        if method == "s3":
            s3_rows = prediction_rows(strategy.predictions, search.trials)
        curve = results[method][0]
        print(f"{method:12s} final best {curve[-1]:.4e}, {len(curve)} true evaluations "
              f"({new_bests(curve)} new bests), {results[method][1]:.0f} s", flush=True)
    if s3_rows is not None:
        print_prediction_report(s3_rows)
    if "evolution" not in results:
        return
    target = results["evolution"][0][-1]
    n_evo = evaluations_to_reach(results["evolution"][0], target)
    print(f"\ntarget: evolution's final search-set value {target:.4e}, first reached at evaluation {n_evo}")
    for method, (curve, _) in results.items():
        n = evaluations_to_reach(curve, target)
        print(f"{method:12s} reaches it at " + (f"evaluation {n} ({n / len(results['evolution'][0]):.2f} of "
                                                  f"evolution's budget)" if n else "not reached within the budget"))


if __name__ == "__main__":
    main()
