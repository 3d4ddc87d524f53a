"""How much a report-set mse_ref depends on which noises the report set holds: searched schedules and the best
named schedule at the same NFE, on report sets of several sizes and seeds, side by side.

On `digits` at NFE 4-5 the mean over 256 samples can be carried by one sample that switches mode; a larger,
independent report set (another seed: noise no search or selection has seen) shows whether a ratio is the
schedules' or the set's. The named schedules equal diffusers' schedulers (tests/test_peers.py).

    python bench/report_size.py --model digits --schedules bench-search-work/digits-nfe5.json,... \\
        --sets 256:0,1024:1 --cache bench-search-work/cache.sqlite
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from autotune.cache.store import open_store
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.registry import load_model
    from autotune.sampling.named import NAMED, build
    from autotune.space.fileformat import load

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--schedules", required=True, help="comma-separated schedule files")
    parser.add_argument("--sets", default="256:0,1024:1", help="report sets as SIZE:SEED, comma-separated")
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    store = open_store(args.cache) if args.cache else None
    schedules = [(path, load(path)) for path in args.schedules.split(",")]
    for spec in args.sets.split(","):
        size, seed = (int(x) for x in spec.split(":"))
        ev = Evaluator(model, "report", size=size, seed=seed, store=store)
        for path, s in schedules:
            ours = ev.evaluate(s)
            named = min((ev.evaluate(build(n, model.noise, s.nfe))["mse_ref"], n) for n in NAMED)
            print(f"{ev.eval_set.id:34s} {path}: NFE {s.nfe} mse_ref {ours['mse_ref']:.3e} (median "
                  f"{ours['mse_ref_median']:.3e}); best named {named[1]} {named[0]:.3e} -> {named[0] / ours['mse_ref']:.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
