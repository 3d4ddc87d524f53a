"""Search cost: true evaluations each method needs to reach the final quality of `evolution`.

Every method runs the search stage of `autotune search` itself (search/job.py: the same space, search set,
seeds = the named schedules, batches and search id) in this process with the same budget of true evaluations
and no cache, so each method pays its own way; validation, refinement and the report set are off, as they do
not change the count. The target is evolution's final best search-set value; for each method the bench
prints its own final best and the first true evaluation at which its best-so-far reached the target (or "not
reached"), the ratio to evolution's, and the search loop's wall time (the search set's reference is solved
before it).

    python bench/search_cost.py                                   # digits, NFE 5, the default budget (96)
    python bench/search_cost.py --methods evolution,s3 --budget 200
"""

from __future__ import annotations

import argparse
import math

import torch


def best_so_far(trials: list) -> list[float]:
    """Best value after each true evaluation (cache hits are free and do not advance the count)."""
    out, best = [], math.inf
    for t in trials:
        best = min(best, t.value)
        if not t.cached:
            out.append(best)
    return out


def evaluations_to_reach(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def main() -> None:
    from autotune.models.registry import load_model
    from autotune.search.job import JobConfig, run_search_job

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--budget", type=int, default=JobConfig.budget)
    parser.add_argument("--methods", default="evolution,s3,optuna-tpe,random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    results = {}
    for method in args.methods.split(","):
        config = JobConfig(model=args.model, nfe=str(args.nfe), method=method, budget=args.budget, seed=args.seed,
                           refine=0, validate=0, score_report=False)  # the search stage alone: no file, no report set
        search = run_search_job(config, None, model=model).search  # no store: a fresh memory for every method
        results[method] = (best_so_far(search.trials), search.seconds)
        print(f"{method:12s} final best {results[method][0][-1]:.4e} after {len(results[method][0])} true "
              f"evaluations, {results[method][1]:.0f} s", flush=True)
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
