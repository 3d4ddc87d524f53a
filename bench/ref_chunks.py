"""Scoring in slices vs in one batch, side by side: the reference solve and a schedule's score on the report set.

The evaluator samples in slices of ``EVAL_CHUNK`` (sampling/executor.py) because small CPU networks lose
per-sample throughput at large batches. This bench times both ways on the same model, noise and machine, checks
they give the same samples, and prints the ratio.

    python bench/ref_chunks.py                      # digits, 1024 report noises, a 20-step reference
    python bench/ref_chunks.py --model gmm64 --size 4096
"""

from __future__ import annotations

import argparse
import time

import torch

from autotune.evaluate.reference import lambda_uniform_schedule
from autotune.evaluate.evaluator import eval_set_for
from autotune.models.registry import load_model
from autotune.sampling.executor import EVAL_CHUNK, sample_in_chunks
from autotune.space.schedule import Schedule


def timed(model, schedule, noise, cond, chunk: int) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    result = sample_in_chunks(model, schedule, noise, cond, chunk=chunk, keep_states=True)
    return time.perf_counter() - started, result.sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--size", type=int, default=1024, help="noises (the report set's default size)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the reference-style solve")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = load_model(args.model)
    eval_set = eval_set_for(model, "report", args.size, 0, ())
    noise, cond = eval_set.noise(torch.float32), eval_set.conditions()
    ref = lambda_uniform_schedule(model.noise, args.steps, 3, solver="unip-bh2", corrector="bh2")
    ref = Schedule(ref.t_start, ref.steps, guidance=args.guidance, name=ref.name)
    print(f"{args.model}: {args.size} noises, {len(ref.steps)} steps, torch threads "
          f"{torch.get_num_threads()}, slices of {EVAL_CHUNK}")
    whole, sliced = [], []
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows both alike
        t, one = timed(model, ref, noise, cond, chunk=args.size)
        whole.append(t)
        t, many = timed(model, ref, noise, cond, chunk=EVAL_CHUNK)
        sliced.append(t)
    diff = float((one - many).abs().max())
    print(f"one batch    {min(whole):8.2f} s")
    print(f"slices       {min(sliced):8.2f} s")
    print(f"speed-up     {min(whole) / min(sliced):8.2f}x   (max abs difference of the samples {diff:.1e})")


if __name__ == "__main__":
    main()
