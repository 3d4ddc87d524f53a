"""DC-Solver bench: fitted ratios vs none, and CPR on held-out configurations. Prints its figures.

Part 1 — for `digits` with guidance and for a tiny diffusers pipeline directory (built here by
tests/peers.make_pipeline_dir, trained for a few hundred steps): report-set mse_ref of UniPC and
DPM-Solver++ at each NFE without and with ratios fitted on the first datapoints of the search set.
Part 2 — CPR on `digits`: fit a grid of (NFE, guidance), regress, then on held-out (NFE, guidance) pairs
compare the report-set error reduction of the predicted ratios with that of ratios fitted directly
(target: at least 90 %). Fitting and prediction times are printed.

    python bench/dc.py                                 # the full bench (tens of minutes on 2 busy cores)
    python bench/dc.py --quick                         # a smoke run with small sets and few iterations
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from autotune.evaluate.evaluator import Evaluator  # noqa: E402
from autotune.models.registry import load_model  # noqa: E402
from autotune.search.dc_fit import FitSettings, base_schedule, fit_grid, fit_ratios, regress_grid  # noqa: E402


def _pairs(text: str) -> list[tuple[int, float | None]]:
    out = []
    for part in text.split(","):
        n, g = part.split(":")
        out.append((int(n), None if g == "none" else float(g)))
    return out


def part1(name: str, model, guidance, nfes, solvers, settings, report_size) -> list[dict]:
    fit_eval = Evaluator(model, "search", size=settings.datapoints)
    report = Evaluator(model, "report", size=report_size)
    reference = fit_eval.reference(guidance)
    rows = []
    for solver in solvers:
        for nfe in nfes:
            base = base_schedule(model, solver, nfe, guidance)
            fit = fit_ratios(model, base, fit_eval.eval_set, reference, settings)
            before = report.evaluate(base)["mse_ref"]
            after = report.evaluate(fit.schedule)["mse_ref"]
            rows.append({"model": name, "solver": solver, "nfe": nfe, "guidance": guidance, "before": before,
                         "after": after, "fit_s": fit.seconds, "ratios": fit.ratios})
            print(f"{name:>10} g={guidance!s:<4} {solver:<14} NFE {nfe:>2}: report mse_ref {before:.4e} -> "
                  f"{after:.4e} ({100 * (1 - after / before):+.1f} % lower), fit {fit.seconds:.1f} s, "
                  f"ratios {', '.join(f'{r:.3f}' for r in fit.ratios)}", flush=True)
    return rows


def part2(model, solver, grid_nfe, grid_g, held_out, settings, report_size) -> list[dict]:
    start = time.perf_counter()
    fits = fit_grid(model, solver, grid_nfe, grid_g, settings,
                    callback=lambda f: print(f"  grid fit NFE {f.nfe} g={f.guidance}: {f.fit.seconds:.1f} s, ratios "
                                             f"{', '.join(f'{r:.3f}' for r in f.fit.ratios)}", flush=True))
    grid_seconds = time.perf_counter() - start
    cpr = regress_grid(fits, model.fingerprint(), solver, settings=settings)
    print(f"CPR over {len(fits)} configurations in {grid_seconds:.1f} s; degrees {cpr.degrees}, rms residual "
          f"{cpr.fit['rms_residual']:.4f}")
    fit_eval = Evaluator(model, "search", size=settings.datapoints)
    report = Evaluator(model, "report", size=report_size)
    rows = []
    for nfe, g in held_out:
        base = base_schedule(model, solver, nfe, g)
        t0 = time.perf_counter()
        predicted = cpr.apply(base)
        predict_s = time.perf_counter() - t0
        fit = fit_ratios(model, base, fit_eval.eval_set, fit_eval.reference(g), settings)
        m_base = report.evaluate(base)["mse_ref"]
        m_fit = report.evaluate(fit.schedule)["mse_ref"]
        m_cpr = report.evaluate(predicted)["mse_ref"]
        share = (m_base - m_cpr) / (m_base - m_fit) if m_base > m_fit else float("nan")
        rows.append({"nfe": nfe, "guidance": g, "base": m_base, "fit": m_fit, "cpr": m_cpr, "share": share,
                     "fit_s": fit.seconds, "predict_s": predict_s})
        print(f"held out NFE {nfe} g={g}: mse_ref none {m_base:.4e}, direct fit {m_fit:.4e} ({fit.seconds:.1f} s), "
              f"CPR {m_cpr:.4e} ({1e3 * predict_s:.2f} ms): CPR reaches {100 * share:.0f} % of the direct fit's "
              f"reduction (target >= 90 %)", flush=True)
        print(f"    ratios fit {', '.join(f'{r:.3f}' for r in fit.ratios)}; CPR "
              f"{', '.join(f'{s.ratio:.3f}' for s in predicted.steps)}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sets, few iterations, one NFE (a smoke run)")
    p.add_argument("--nfe", default="5,6,8")
    p.add_argument("--solvers", default="unipc-bh2-o2,dpmsolver++2m")
    p.add_argument("--guidance", type=float, default=2.0, help="digits guidance of part 1")
    p.add_argument("--method", default="joint", choices=("joint", "greedy"))
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--datapoints", type=int, default=10)
    p.add_argument("--report-size", type=int, default=0, help="report-set size (0: default 256)")
    p.add_argument("--cpr-solver", default="unipc-bh2-o2")
    p.add_argument("--cpr-nfe", default="4,6,8,10")
    p.add_argument("--cpr-guidance", default="1,2,4,6,8")
    p.add_argument("--held-out", default="5:3,7:5,9:1.5", help="NFE:guidance pairs outside the CPR grid")
    p.add_argument("--parts", default="digits,pipeline,cpr")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.nfe, args.iterations, args.report_size = "5", 10, 32
        args.cpr_nfe, args.cpr_guidance, args.held_out = "4,6", "1,3", "5:2"
    nfes = [int(v) for v in args.nfe.split(",")]
    solvers = args.solvers.split(",")
    settings = FitSettings(datapoints=args.datapoints, iterations=args.iterations, method=args.method)
    parts = args.parts.split(",")
    print(f"settings: {settings.as_dict()}, report size {args.report_size or 'default'}, threads {args.threads}")
    rows = []
    if "digits" in parts:
        rows += part1("digits", load_model("digits"), args.guidance, nfes, solvers, settings, args.report_size)
    if "pipeline" in parts:
        from peers import make_pipeline_dir

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            path = make_pipeline_dir(Path(tmp) / "ddpm-eps", "epsilon")
            print(f"built the diffusers pipeline directory in {time.perf_counter() - t0:.1f} s")
            rows += part1("pipeline", load_model(str(path)), None, nfes, solvers, settings, args.report_size)
    if rows:
        worse = [r for r in rows if not r["after"] < r["before"]]
        print(f"part 1: fitted ratios lower report mse_ref in {len(rows) - len(worse)} of {len(rows)} cases; "
              f"mean reduction {100 * sum(1 - r['after'] / r['before'] for r in rows) / len(rows):.1f} %; "
              f"mean fit time {sum(r['fit_s'] for r in rows) / len(rows):.1f} s")
    if "cpr" in parts:
        grid_nfe = [int(v) for v in args.cpr_nfe.split(",")]
        grid_g = [float(v) for v in args.cpr_guidance.split(",")]
        held = _pairs(args.held_out)
        clash = [(n, g) for n, g in held if n in grid_nfe or g in grid_g]
        if clash:
            raise SystemExit(f"--held-out {clash}: NFE and guidance must both lie outside the grid")
        out = part2(load_model("digits"), args.cpr_solver, grid_nfe, grid_g, held, settings, args.report_size)
        ok = [r for r in out if r["share"] >= 0.9]
        print(f"part 2: CPR reached >= 90 % of the direct fit's reduction on {len(ok)} of {len(out)} held-out "
              f"configurations; mean prediction time {1e3 * sum(r['predict_s'] for r in out) / len(out):.2f} ms, "
              f"mean direct fit {sum(r['fit_s'] for r in out) / len(out):.1f} s")


if __name__ == "__main__":
    main()
