"""Searched schedules vs diffusers' own schedulers, side by side on the same model, noise and machine.

For each model and NFE: every diffusers peer (DPM-Solver++ 2M/3M with and without Karras sigmas, UniPC
bh1/bh2 orders 2/3, DEIS orders 2/3) runs its own `scheduler.step` loop over our model wrapper, and the
schedule found by `autotune search` (the CLI itself, run as a subprocess, so the figure is what a user gets)
is scored by the Evaluator. Both are scored on the *report* evaluation set against the same reference
solution: mse_ref (mean over samples) and the median per-sample error. The search only ever sees the search
set. Also printed: the search's wall time and true evaluations, and the issue's two targets (>= 2x lower
than the best peer at NFE <= 5; searched NFE 5 <= best peer at NFE 8).

    python bench/search.py                         # digits and a diffusers pipeline directory, NFE 4,5,6,8,10
    python bench/search.py --models digits --nfe 5 --budget 60 --refine 10    # a quick look
    python bench/search.py --models digits --nfe 4,5,6 --no-dc \
        --grown-space dpm,unip-bh1,unip-bh2,ipndm,dpm-single      # the space grown by the registry vs without

`--json FILE` also writes every row. The diffusers pipeline directory is the tiny DDPM UNet trained by
tests/peers.py (400 Adam steps on smooth 8x8 images; built once into --work).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from autotune.evaluate.ids import PER_SAMPLE
from autotune.evaluate.metrics import encode_errors
from autotune.sampling.named import DIFFUSERS_PEERS
from autotune.tables import Versus, versus  # the one better/worse convention: ratio = best peer / ours

ROOT = Path(__file__).resolve().parents[1]

# peer name -> (diffusers scheduler class, constructor arguments beyond the model's noise schedule): the named
# schedules' own peers (declared once in sampling/named.py) and the Karras / DEIS variants no named one has
PEERS = {
    **{name: DIFFUSERS_PEERS[name] for name in ("dpmsolver++2m", "dpmsolver++3m", "unipc-bh1-o2", "unipc-bh2-o2",
                                                 "unipc-bh2-o3")},
    "dpmsolver++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                             "use_karras_sigmas": True}),
    "dpmsolver++3m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                             "use_karras_sigmas": True}),
    "deis-o2": ("DEISMultistepScheduler", {"solver_order": 2}),
    "deis-o3": ("DEISMultistepScheduler", {"solver_order": 3}),
}


def diffusers_scheduler(model, peer: str):
    """The peer's diffusers scheduler on exactly the model's noise schedule (its betas) and parameterisation."""
    import diffusers

    cls_name, kwargs = PEERS[peer]
    acp = model.noise.alphas_cumprod
    betas = 1.0 - acp / np.concatenate([[1.0], acp[:-1]])
    return getattr(diffusers, cls_name)(num_train_timesteps=len(acp), trained_betas=betas.tolist(),
                                        prediction_type=model.parameterization, **kwargs)


def run_peer(model, peer: str, noise: torch.Tensor, labels, nfe: int, guidance) -> torch.Tensor:
    """diffusers' loop as its pipelines run it; the network sees training step n at our time (n + 1) / N."""
    sched = diffusers_scheduler(model, peer)
    sched.set_timesteps(nfe)
    n_train = model.noise.num_train_timesteps
    x = noise * sched.init_noise_sigma
    calls = 0
    with torch.no_grad():
        for step in sched.timesteps:
            t = torch.tensor((float(step) + 1.0) / n_train, dtype=torch.float64)
            out = model(sched.scale_model_input(x, step), t, labels, guidance=guidance)
            calls += 1
            x = sched.step(out, step, x).prev_sample
    assert calls == nfe, f"{peer}: {calls} model calls for NFE {nfe}"
    return x


def per_sample_error(samples: torch.Tensor, reference) -> torch.Tensor:
    return ((samples.double() - reference.final.double()) ** 2).flatten(1).mean(1)


def pipeline_dir(work: Path) -> Path:
    """The tiny diffusers DDPM pipeline directory of the test suite, trained once into ``work``."""
    path = work / "tiny-ddpm-eps"
    if not (path / "model_index.json").exists():
        sys.path.insert(0, str(ROOT))
        from tests.peers import make_pipeline_dir

        make_pipeline_dir(path)
    return path


def run_search(model_arg: str, nfe: int, args, out: Path, solvers: str | None = None) -> dict:
    """`autotune search` as a user runs it (with ``--solvers`` when given); returns the written schedule's metadata
    plus the wall time."""
    cmd = ["autotune", "search", "--model", model_arg, "--nfe", str(nfe), "--method", args.method,
           "--budget", str(args.budget), "--workers", str(args.workers), "--seed", str(args.seed),
           "--refine", str(args.refine), "--cache", args.cache, "--out", str(out)]
    if solvers:
        cmd += ["--solvers", solvers]
    if args.guidance is not None:
        cmd += ["--guidance", str(args.guidance)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"search failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    meta = json.loads(out.read_text())["metadata"]
    return {**meta, "wall_seconds": wall}


def run_dc_fit(model_arg: str, schedule: Path, args, out: Path) -> float:
    """`autotune dc fit` on the searched schedule (the DC-Solver finishing step); returns its wall time."""
    cmd = ["autotune", "dc", "fit", "--model", model_arg, "--schedule", str(schedule), "--cache", args.cache,
           "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dc fit failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def bench_model(name: str, model_arg: str, args, work: Path) -> list[dict]:
    from autotune.cache.store import open_store
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.registry import load_model
    from autotune.space.fileformat import load

    model = load_model(model_arg)
    report = Evaluator(model, "report", store=open_store(args.cache))
    reference = report.reference(args.guidance)
    noise, labels = report.eval_set.noise(torch.float32), report.eval_set.labels()
    rows = []
    for nfe in args.nfe:
        peers, peer_errors = {}, {}
        for peer in PEERS:
            err = per_sample_error(run_peer(model, peer, noise, labels, nfe, args.guidance), reference)
            peers[peer] = (float(err.mean()), float(err.median()))
            peer_errors[peer] = {"mse_ref": peers[peer][0], PER_SAMPLE: encode_errors(err.numpy())}
        best_peer = min(peers, key=lambda p: peers[p][0])
        vs_peer = peer_errors[best_peer]
        out = work / f"{name}-nfe{nfe}.json"
        meta = run_search(model_arg, nfe, args, out)
        ours = report.evaluate(load(out))
        fitted = out.with_name(out.stem + "-dc.json")
        dc_seconds = run_dc_fit(model_arg, out, args, fitted) if args.dc else None
        ours_dc = report.evaluate(load(fitted)) if args.dc else {"mse_ref": math.nan, "mse_ref_median": math.nan}
        rows.append({"model": name, "nfe": nfe, "peers": peers, "best_peer": best_peer,
                     "best_peer_mse": peers[best_peer][0], "best_peer_median": peers[best_peer][1],
                     "ours_mse": ours["mse_ref"], "ours_median": ours["mse_ref_median"],
                     "ratio": versus(ours, vs_peer).ratio, "ratio_ci": versus(ours, vs_peer).interval_text(),
                     "search_wall_s": meta["wall_seconds"],
                     "search_seconds": meta.get("seconds"), "true_evaluations": meta.get("true_evaluations"),
                     "ours_dc_mse": ours_dc["mse_ref"], "ours_dc_median": ours_dc["mse_ref_median"],
                     "ratio_dc": versus(ours_dc, vs_peer).ratio if args.dc else math.nan,
                     "ratio_dc_ci": versus(ours_dc, vs_peer).interval_text() if args.dc else None,
                     "dc_fit_s": dc_seconds,
                     "schedule": str(out)})
        r = rows[-1]
        if args.grown_space:
            grown_out = work / f"{name}-nfe{nfe}-grown.json"
            grown_meta = run_search(model_arg, nfe, args, grown_out, args.grown_space)
            grown_schedule = load(grown_out)
            grown = report.evaluate(grown_schedule)
            r.update(grown_mse=grown["mse_ref"], grown_vs_default=versus(grown, ours).ratio,
                     grown_vs_default_ci=versus(grown, ours).interval_text(), grown_vs_peer=versus(grown, vs_peer).ratio,
                     grown_wall_s=grown_meta["wall_seconds"], grown_evaluations=grown_meta.get("true_evaluations"),
                     grown_solvers=sorted({st.solver for st in grown_schedule.steps}))
        print(f"{name:10s} NFE {nfe:2d}  best peer {best_peer:22s} {r['best_peer_mse']:.3e} "
              f"(median {r['best_peer_median']:.3e})  ours {r['ours_mse']:.3e} (median {r['ours_median']:.3e})  "
              f"{Versus(r['ratio']).text()} {r['ratio_ci']}  search {r['search_wall_s']:.0f} s / "
              f"{r['true_evaluations']} evals"
              + (f"  | + dc fit {r['ours_dc_mse']:.3e} (median {r['ours_dc_median']:.3e}) "
                 f"{Versus(r['ratio_dc']).text()} {r['ratio_dc_ci']}, "
                 f"{r['dc_fit_s']:.0f} s" if args.dc else ""), flush=True)
        if args.grown_space:
            print(f"{'':10s}        grown space ({args.grown_space}): {r['grown_mse']:.3e}, vs the default space "
                  f"{Versus(r['grown_vs_default']).text()} {r['grown_vs_default_ci']}, vs the best peer "
                  f"{Versus(r['grown_vs_peer']).text()}; search {r['grown_wall_s']:.0f} s / "
                  f"{r['grown_evaluations']} evals; solvers used: {', '.join(r['grown_solvers'])}", flush=True)
    return rows


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for model in sorted({r["model"] for r in rows}):
        by_nfe = {r["nfe"]: r for r in rows if r["model"] == model}
        for nfe in sorted(n for n in by_nfe if n <= 5):
            r = by_nfe[nfe]
            for label, ratio in (("searched", r["ratio"]), ("searched + dc fit", r["ratio_dc"])):
                if math.isfinite(ratio):
                    median = r["best_peer_median"] / r["ours_median" if label == "searched" else "ours_dc_median"]
                    lines.append(f"{model}: NFE {nfe} {label} vs the best peer ({r['best_peer']}): mse_ref "
                                 f"{Versus(ratio).text()} — target >= 2x better: "
                                 f"{'met' if ratio >= 2 else 'NOT met'}; "
                                 f"median {Versus(median).text()}")
        if 5 in by_nfe and 8 in by_nfe:
            peer8 = by_nfe[8]["best_peer_mse"]
            for label, key in (("searched", "ours_mse"), ("searched + dc fit", "ours_dc_mse")):
                ours5 = by_nfe[5][key]
                if math.isfinite(ours5):
                    lines.append(f"{model}: {label} NFE 5 {ours5:.3e} vs best peer at NFE 8 {peer8:.3e} "
                                 f"({by_nfe[8]['best_peer']}) — target ours <= peer: "
                                 f"{'met' if ours5 <= peer8 else 'NOT met'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,pipeline", help="digits and/or pipeline (a diffusers directory)")
    parser.add_argument("--nfe", default="4,5,6,8,10")
    parser.add_argument("--method", default="evolution")
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--refine", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--work", default="bench-search-work", help="folder for schedules, the cache, the pipeline")
    parser.add_argument("--json", default=None, help="also write every row here")
    parser.add_argument("--no-dc", dest="dc", action="store_false", help="skip the `autotune dc fit` finishing step")
    parser.add_argument("--grown-space", default=None, metavar="SOLVERS",
                        help="also search with `--solvers SOLVERS` (e.g. dpm,unip-bh1,unip-bh2,ipndm,dpm-single) and "
                             "compare it with the default space on the same report set")
    args = parser.parse_args()
    args.nfe = [int(n) for n in args.nfe.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.cache = str(work / "cache.sqlite")
    torch.set_num_threads(1)
    os.environ.setdefault("AUTOTUNE_CACHE", args.cache)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; method {args.method}, budget {args.budget}, "
          f"refine {args.refine}, workers {args.workers}; report set scored against the reference", flush=True)
    rows = []
    for name in args.models.split(","):
        model_arg = {"digits": "digits", "pipeline": None}.get(name, name)
        if name == "pipeline":
            model_arg = str(pipeline_dir(work))
        rows += bench_model(name, model_arg, args, work)
    print()
    for line in targets(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
