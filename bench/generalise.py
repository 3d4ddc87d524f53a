"""What makes a searched schedule win on noise it never saw: search objectives and selection rules.

Each run is one search (model, NFE, seed; the space and seeds = the named schedules as `autotune search`
uses them; a budget of true evaluations, in this process) with a *search objective* over the per-sample
errors of its search set (variants: mean / tail-aware aggregates, 128 or 512 noises, rotating noise,
multi-fidelity promotion). Its finalists are then chosen on a validation set by each *selection rule*,
and the choice is graded on a held-out set that neither the search nor the selection saw (``--holdout``
noises, own seed). The peer is the best named schedule on the same held-out noise; ratios are peer / ours
(> 1: ours is better) for the mean, the median and the 99th percentile of the per-sample error. The last
table is the geometric mean over all runs. Rules: ``top3-mean`` (before search/selection.py),
``top8+named-mean``, ``top8+named-tail`` (mean + TAIL_WEIGHT x worst-5 % mean: the default now).

    python bench/generalise.py                        # gmm64, NFE 4,5,6 x seeds 1-4, mean128 and mean512
    python bench/generalise.py --model digits --nfes 5 --seeds 0 --variants mean128 --ref-steps 40
"""

from __future__ import annotations

import argparse
from pathlib import Path
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from autotune.evaluate.metrics import tail_mean
from autotune.search.selection import TOP_FINALISTS


def per_sample_errors(model, schedule, eval_set, reference) -> np.ndarray | None:
    """Squared error vs the reference, one number per sample; None when the schedule diverges."""
    from autotune.sampling.executor import sample

    with torch.no_grad():
        out = sample(model, schedule, eval_set.noise(torch.float32), eval_set.labels(), check_finite=True)
    if out.diverged_at is not None:
        return None
    return ((out.sample.double() - reference.final.double()) ** 2).flatten(1).mean(1).numpy()


AGGREGATES: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda e: float(e.mean()),
    # mean of the worst 5 % (the metrics' mse_ref_cvar): the tail a mode switch lands in
    "cvar": lambda e: tail_mean(e),
    "mean+cvar": lambda e: float(e.mean() + 0.25 * tail_mean(e)),
    # an upper confidence bound of the mean: pessimistic about schedules scored on few lucky samples
    "ucb": lambda e: float(e.mean() + 2.0 * e.std(ddof=1) / math.sqrt(len(e))),
    "ucb3": lambda e: float(e.mean() + 3.0 * e.std(ddof=1) / math.sqrt(len(e))),
    "ucb+cvar": lambda e: float(e.mean() + 2.0 * e.std(ddof=1) / math.sqrt(len(e)) + 0.25 * tail_mean(e)),
}


@dataclass
class Variant:
    name: str
    aggregate: str
    size: int
    rotate: int = 1  # number of disjoint noise subsets cycled through batch by batch (1: fixed noise)
    promote: int = 0  # per batch, this many best (on the first set) are also scored on the extension set
    extension: int = 0  # size of the extension set (multi-fidelity)


VARIANTS = {
    "mean128": Variant("mean128", "mean", 128),
    "mean512": Variant("mean512", "mean", 512),
    "cvar128": Variant("cvar128", "mean+cvar", 128),
    "ucb128": Variant("ucb128", "ucb", 128),
    "ucb512": Variant("ucb512", "ucb", 512),
    "rot4x128": Variant("rot4x128", "mean", 128, rotate=4),
    "sh": Variant("sh", "mean+cvar", 128, promote=2, extension=384),
    "sh_mean": Variant("sh_mean", "mean", 128, promote=2, extension=384),
    "mc512": Variant("mc512", "mean+cvar", 512),
    "ucb3_128": Variant("ucb3_128", "ucb3", 128),
    "ucbcvar128": Variant("ucbcvar128", "ucb+cvar", 128),
    "ucbrot4x128": Variant("ucbrot4x128", "ucb", 128, rotate=4),
}


class PromotingPool:
    """Multi-fidelity: every candidate on the small set; the best ``promote`` of each batch also on the
    extension, and told the aggregate over both (``fidelity`` says which a trial got)."""

    workers = 0

    def __init__(self, model, small, small_ref, ext, ext_ref, aggregate: str, promote: int) -> None:
        self.model, self.small, self.small_ref, self.ext, self.ext_ref = model, small, small_ref, ext, ext_ref
        self.aggregate, self.promote = AGGREGATES[aggregate], promote
        self.memo: dict[str, np.ndarray | None] = {}
        self.full: dict[str, np.ndarray | None] = {}

    def map(self, schedules):
        out, errs = [], []
        for s in schedules:
            h = s.hash()
            cached = h in self.memo
            if not cached:
                self.memo[h] = per_sample_errors(self.model, s, self.small, self.small_ref)
            errs.append(self.memo[h])
            out.append({"nfe": s.nfe, "cached": cached})
        order = sorted(range(len(schedules)), key=lambda i: math.inf if errs[i] is None else errs[i].mean())
        for rank, i in enumerate(order):
            s, e = schedules[i], errs[i]
            h = s.hash()
            if e is not None and rank < self.promote and h not in self.full:
                extra = per_sample_errors(self.model, s, self.ext, self.ext_ref)
                self.full[h] = None if extra is None else np.concatenate([e, extra])
            full = self.full.get(h)
            if e is None or (h in self.full and full is None):
                out[i].update(mse_ref=math.inf, diverged=True, fidelity=0)
            elif full is not None:
                out[i].update(mse_ref=self.aggregate(full), diverged=False, fidelity=2)
            else:
                out[i].update(mse_ref=self.aggregate(e), diverged=False, fidelity=1)
        return out

    def close(self):
        return None


class AggregatePool:
    """Scores candidates in this process with a chosen aggregate of the per-sample errors as ``mse_ref``."""

    workers = 0

    def __init__(self, model, sets, references, aggregate: str) -> None:
        self.model, self.sets, self.refs = model, sets, references
        self.aggregate = AGGREGATES[aggregate]
        self.batches = 0
        self.memo: dict[tuple[int, str], dict[str, Any]] = {}

    def map(self, schedules):
        k = self.batches % len(self.sets)
        self.batches += 1
        out = []
        for s in schedules:
            key = (k, s.hash())
            if key not in self.memo:
                e = per_sample_errors(self.model, s, self.sets[k], self.refs[k])
                self.memo[key] = ({"mse_ref": math.inf, "diverged": True, "nfe": s.nfe} if e is None else
                                  {"mse_ref": self.aggregate(e), "diverged": False, "nfe": s.nfe})
                out.append({**self.memo[key], "cached": False})
            else:
                out.append({**self.memo[key], "cached": True})
        return out

    def close(self):
        return None


def summary(e: np.ndarray | None) -> dict[str, float]:
    if e is None:
        return {"mean": math.inf, "median": math.inf, "p99": math.inf}
    return {"mean": float(e.mean()), "median": float(np.median(e)), "p99": float(np.quantile(e, 0.99))}


RULES = ("top3-mean", "top8+named-mean", "top8+named-tail")


def choose(rule: str, vs: list[dict[str, float]], n_found: int) -> int:
    """Index of the finalist a selection rule keeps: ``vs`` = validation figures of the found schedules
    (best first, ``n_found`` of them) followed by the named schedules'."""
    from autotune.search.selection import selection_value

    if rule == "top3-mean":  # the rule before search/selection.py
        return min(range(min(3, n_found)), key=lambda i: vs[i]["mean"])
    if rule == "top8+named-mean":
        return min(range(len(vs)), key=lambda i: vs[i]["mean"])
    # the product's own rule, on the figures the evaluator would return
    return min(range(len(vs)), key=lambda i: selection_value({"mse_ref": vs[i]["mean"], "mse_ref_cvar": vs[i]["cvar"]}))


def run_one(model, store, args, nfe: int, seed: int, vname: str, sets_cache: dict) -> dict[str, tuple]:
    """One search + every selection rule, graded on the held-out set: rule -> (mean, median, p99 ratios,
    whether the named schedule was kept)."""
    import dataclasses

    from autotune.evaluate.evaluator import Evaluator
    from autotune.evaluate.sets import eval_set_for
    from autotune.sampling.named import NAMED, build
    from autotune.search.runner import run_search
    from autotune.search.strategy import SearchContext, make_strategy
    from autotune.space.encoding import ScheduleSpace
    from autotune.space.fileformat import loads

    g = args.guidance

    def ref_for(es):
        return Evaluator(model, es.kind, size=es.size, seed=es.seed, store=store,
                         ref_steps=args.ref_steps).reference(g)

    if "holdout" not in sets_cache:
        holdout = eval_set_for(model, "report", args.holdout, seed=101)
        sets_cache["holdout"] = (holdout, ref_for(holdout))
    holdout, hold_ref = sets_cache["holdout"]
    valid = eval_set_for(model, "validation", args.validate, seed=seed)
    valid_ref = ref_for(valid)
    seeds = tuple(dataclasses.replace(build(n, model.noise, nfe), guidance=g) for n in NAMED)
    if ("peer", nfe) not in sets_cache:
        named = {s.name: summary(per_sample_errors(model, s, holdout, hold_ref)) for s in seeds}
        best_name = min(named, key=lambda n: named[n]["mean"])
        sets_cache[("peer", nfe)] = named[best_name]
        print(f"NFE {nfe}: best named on the held-out set {best_name}: mean {named[best_name]['mean']:.3e} "
              f"p99 {named[best_name]['p99']:.3e}", flush=True)
    peer = sets_cache[("peer", nfe)]
    v = VARIANTS[vname]
    sets = [eval_set_for(model, "search", v.size // v.rotate, seed=seed * 100 + i) for i in range(v.rotate)]
    refs = [ref_for(s) for s in sets]
    if v.promote:
        ext = eval_set_for(model, "search", v.extension, seed=seed * 100 + 50)
        pool = PromotingPool(model, sets[0], refs[0], ext, ref_for(ext), v.aggregate, v.promote)
    else:
        pool = AggregatePool(model, sets, refs, v.aggregate)
    space = ScheduleSpace(nfe, model.noise.T, 0.0, ratio_range=None, guidance=g)
    strategy = make_strategy(args.method, SearchContext(space, model.noise, seeds, seed))
    result = run_search(strategy, pool, args.budget)
    full = set(getattr(pool, "full", {}))  # multi-fidelity: only fully scored trials can be finalists
    ranked = sorted((t for t in result.trials if t.finite and (not full or t.hash in full)), key=lambda t: t.value)
    found, seen = [], set()
    for t in ranked:
        if t.hash not in seen and len(found) < TOP_FINALISTS:
            seen.add(t.hash)
            found.append(loads(t.schedule))
    cands = found + list(seeds)
    vs = []
    for s in cands:
        e = per_sample_errors(model, s, valid, valid_ref)
        vs.append({**summary(e), "cvar": math.inf if e is None else AGGREGATES["cvar"](e)})
    out = {}
    for rule in RULES:
        i = choose(rule, vs, len(found))
        ours = summary(per_sample_errors(model, cands[i], holdout, hold_ref))
        out[rule] = (peer["mean"] / ours["mean"], peer["median"] / ours["median"], peer["p99"] / ours["p99"],
                     i >= len(found))
    return out


def main() -> None:
    from autotune.cache.store import open_store
    from autotune.models.registry import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gmm64")
    parser.add_argument("--nfes", default="4,5,6")
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--method", default="evolution")
    parser.add_argument("--variants", default="mean128,mean512")
    parser.add_argument("--holdout", type=int, default=1024)
    parser.add_argument("--validate", type=int, default=512)
    parser.add_argument("--cache", default="bench/work/generalise.sqlite")
    parser.add_argument("--ref-steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    store = open_store(args.cache)
    sets_cache: dict = {}
    results: dict[tuple[str, str], list[tuple]] = {}
    for nfe in (int(n) for n in args.nfes.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for vname in args.variants.split(","):
                t0 = time.perf_counter()
                for rule, r in run_one(model, store, args, nfe, seed, vname, sets_cache).items():
                    results.setdefault((vname, rule), []).append(r)
                    print(f"NFE {nfe} seed {seed} {vname} {rule}: mean {r[0]:.2f}x median {r[1]:.2f}x "
                          f"p99 {r[2]:.2f}x{' (named kept)' if r[3] else ''}", flush=True)
                print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n{args.model}, {args.method}, budget {args.budget}; ratio = best named / ours\n"
          f"on {args.holdout} held-out noises (> 1: ours better), geometric mean over runs")
    print(f"{'search objective':18s} {'selection':16s} {'runs':>4s} {'mean':>6s} {'min':>6s} "
          f"{'p99':>6s} {'p99>=1':>6s}")
    for (vname, rule), rs in results.items():
        gm = [math.exp(sum(math.log(r[k]) for r in rs) / len(rs)) for k in range(3)]
        print(f"{vname:18s} {rule:16s} {len(rs):4d} {gm[0]:5.2f}x {min(r[0] for r in rs):5.2f}x "
              f"{gm[2]:5.2f}x {sum(r[2] >= 1 for r in rs):3d}/{len(rs)}")


if __name__ == "__main__":
    main()
