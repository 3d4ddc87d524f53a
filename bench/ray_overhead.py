"""Evaluations per second: the default local Ray pool vs `--workers 0` (in-process), same machine, same candidates.

Both pools score the same distinct schedules (drawn from the search space's prior, NFE 5) in batches, as a
search does, on the search set with the reference computed once beforehand and handed to the workers. The
in-process pool runs with torch's default thread count (as `autotune search --workers 0` does); each Ray
worker runs one thread (as `autotune search` does). Ray's start-up (starting Ray, starting the actors,
loading the model) is timed separately and then excluded: the figure is steady-state throughput.

    python bench/ray_overhead.py                    # digits, 48 candidates in batches of 8, 2 workers
    python bench/ray_overhead.py --model gmm64 --candidates 96
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.registry import load_model
    from autotune.search.runner import EvaluatorSpec, InProcessPool, RayPool
    from autotune.space.encoding import ScheduleSpace

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    model = load_model(args.model)
    space = ScheduleSpace(args.nfe, model.noise.T, 0.0, ratio_range=None)
    rng = np.random.default_rng(0)
    schedules, seen = [], set()
    while len(schedules) < args.candidates + args.batch:  # the first batch warms the Ray workers up
        s = space.sample_prior(rng)
        if s.hash() not in seen:
            seen.add(s.hash())
            schedules.append(s)
    warm, timed = schedules[: args.batch], schedules[args.batch:]
    batches = [timed[i: i + args.batch] for i in range(0, len(timed), args.batch)]

    def throughput(pool) -> tuple[float, int]:
        start = time.perf_counter()
        n = sum(len(pool.map(b)) for b in batches)
        return n / (time.perf_counter() - start), n

    evaluator = Evaluator(model, "search")
    reference = evaluator.reference(None)
    print(f"{args.model}, NFE {args.nfe}, {len(timed)} candidates in batches of {args.batch}, "
          f"search set {evaluator.eval_set.size} samples; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads in-process", flush=True)
    in_process, n = throughput(InProcessPool(evaluator))
    print(f"in-process (--workers 0): {in_process:.2f} evaluations/s ({n} evaluations)", flush=True)

    t0 = time.perf_counter()
    spec = EvaluatorSpec(args.model, "search", 0, 0, None, evaluator.ref_steps)
    pool = RayPool(spec, args.workers, references={evaluator.reference_version(None): reference})
    pool.map(warm)
    startup = time.perf_counter() - t0
    try:
        ray_rate, n = throughput(pool)
    finally:
        pool.close()
    print(f"local Ray, {args.workers} workers: {ray_rate:.2f} evaluations/s ({n} evaluations; start-up incl. "
          f"model load and one warm-up batch {startup:.1f} s, excluded)")
    print(f"Ray / in-process throughput: {ray_rate / in_process:.2f}x (target >= 0.8x)")


if __name__ == "__main__":
    main()
