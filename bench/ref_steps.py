"""How fine a reference few-step schedules need: the reference's own error at K steps, side by side with the error
of the schedules scored against it.

Every mse_ref is measured against a reference solve (evaluate/reference.py). Its own error adds to every figure,
so it must be small next to the errors it measures; its cost is most of a short search's time. For each model
this solves, on the same noises, a 300-step reference (taken as the truth), the references at the steps the
evaluator uses (``ref_steps_for``: FEW_STEP_REF_STEPS for NFE <= FEW_STEP_NFE, DEFAULT_REF_STEPS above) and a few
others, and unipc-bh2-o2 at NFE 5 and 10; it prints each reference's mean squared error and that error as a
fraction of the peer's, with the solve's seconds.

    python bench/ref_steps.py                                    # gmm64, digits, digits-g4, digits-flow
    python bench/ref_steps.py --models rgb32-v,rgb32-eps --work bench-work --size 32
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import BENCH_MODELS, model_argument  # noqa: E402  (bench/search.py: the benchmark models)

from autotune.errors import AutotuneError  # noqa: E402
from autotune.evaluate.ids import DEFAULT_REF_STEPS, FEW_STEP_REF_STEPS  # noqa: E402
from autotune.evaluate.progress import report  # noqa: E402
from autotune.evaluate.reference import lambda_uniform_schedule  # noqa: E402
from autotune.evaluate.sets import eval_set_for  # noqa: E402
from autotune.models.registry import load_model  # noqa: E402
from autotune.progress_cli import step  # noqa: E402
from autotune.sampling.executor import sample_in_chunks  # noqa: E402
from autotune.sampling.named import build  # noqa: E402

TRUTH_STEPS = 300
PEER = "unipc-bh2-o2"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gmm64,digits,digits-g4,digits-flow",
                    help=f"comma-separated: {', '.join(BENCH_MODELS)}, or any MODEL argument")
    ap.add_argument("--size", type=int, default=128, help="noises (of a held-out set no search sees)")
    ap.add_argument("--steps", default=f"{FEW_STEP_REF_STEPS},60,{DEFAULT_REF_STEPS}", help="reference steps to try")
    ap.add_argument("--work", type=Path, default=Path("bench-work"), help="where bench models are built")
    ap.add_argument("--rgb32-steps", type=int, default=None, help="training steps if an rgb32 model is built")
    args = ap.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        ap.error(f"--steps: expected comma-separated integers like 40,60,100, got {args.steps!r}")
    if min(steps) < 1:
        ap.error(f"--steps: every step count must be >= 1, got {args.steps!r}")
    try:
        run(args, steps)
    except AutotuneError as e:  # a model that does not load: one line, no traceback
        raise SystemExit(f"bench/ref_steps.py: {e}") from None


def run(args, steps: list[int]) -> None:
    torch.manual_seed(0)
    print(f"{'model':<12}{'reference':>10}{'mse vs 300':>12}{'/ NFE-5':>9}{'/ NFE-10':>10}{'seconds':>9}")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        spec, guidance = model_argument(name, args.work, args)
        with step(f"loading {name}"):
            model = load_model(spec)
        es = eval_set_for(model, "validation", args.size, 7, ())
        noise, cond = es.noise(torch.float32), es.conditions()

        def solve(schedule) -> tuple[torch.Tensor, float]:
            """The schedule's samples and seconds; a progress bar on a terminal while it runs (steps of slices)."""
            total = len(schedule.steps) * noise.shape[0]
            done = 0
            with step(f"{name}: {schedule.name}") as progress:

                def count(k: int, x: torch.Tensor) -> None:
                    nonlocal done
                    done += x.shape[0]
                    report(progress, schedule.name, done, total)

                started = time.perf_counter()
                with torch.no_grad():
                    x = sample_in_chunks(model, dataclasses.replace(schedule, guidance=guidance), noise, cond,
                                         callback=count).sample
                seconds = time.perf_counter() - started
            return x.double(), seconds

        def reference(k: int):
            return solve(lambda_uniform_schedule(model.noise, k, 3, solver="unip-bh2", corrector="bh2"))

        def mse(x: torch.Tensor, y: torch.Tensor) -> float:
            return float(((x - y) ** 2).mean())

        truth, _ = reference(TRUTH_STEPS)
        peer = {n: mse(solve(build(PEER, model.noise, n))[0], truth) for n in (5, 10)}
        print(f"{name:<12}{PEER + ' NFE 5 / 10: ':>31}{peer[5]:.2e} / {peer[10]:.2e}")
        for k in steps:
            x, seconds = reference(k)
            e = mse(x, truth)
            print(f"{'':<12}{k:>10}{e:>12.2e}{e / peer[5]:>8.2%}{e / peer[10]:>10.2%}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
