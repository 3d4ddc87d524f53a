"""`autotune dc fit` and `autotune cpr fit|apply`: DC-Solver ratios fitted, regressed and predicted."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from autotune.sampling.capabilities import check_guidance_applies
from autotune.cli_common import MAX_BATCH, MAX_ITERATIONS, check_guidance, check_output_file
from autotune.cli_common import console, err_console, one_line_errors, open_store_option
from autotune.errors import AutotuneError, InputError
from autotune.progress_cli import step
from autotune.space.fileformat import MAX_NFE

dc_app = typer.Typer(add_completion=False, no_args_is_help=True,
                     help="DC-Solver: fit a schedule's compensation ratios to the reference trajectory.")
cpr_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="Cascade polynomial regression: predict DC ratios for unseen NFE and guidance.")

CACHE_HELP = "cache file or SQLAlchemy URL for references and fits (default: the per-user cache)"


def _settings(datapoints: int, iterations: int, lr: float, method: str):
    import math

    from autotune.search.dc_fit import FitSettings

    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"--lr {lr}: expected a positive learning rate like 0.1")

    return FitSettings(datapoints=datapoints, iterations=iterations, lr=lr, method=method)


def _parse_range(text: str) -> list[int]:
    """'4-10' or '4,6,8' (or a mix: '4-6,8')."""
    bounds: list[tuple[int, int]] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, hi = (int(v) for v in part.split("-", 1)) if "-" in part[1:] else (int(part), int(part))
            bounds.append((lo, hi))
    except ValueError:
        raise AutotuneError(f"--nfe: expected integers like 4-10 or 4,6,8, got {text!r}") from None
    if any(lo > hi or lo < 1 or hi > MAX_NFE for lo, hi in bounds):  # before a range of 10**9 is listed
        raise InputError(f"--nfe: expected integers or rising ranges in 1..{MAX_NFE}, got {text!r}")
    values = [n for lo, hi in bounds for n in range(lo, hi + 1)]
    if not values:
        raise InputError(f"--nfe: expected at least one NFE, got {text!r}")
    return sorted(set(values))


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AutotuneError(f"{option}: expected comma-separated numbers like 1,2,4, got {text!r}") from None
    if not values:
        raise AutotuneError(f"{option}: expected at least one number")
    for v in values:
        check_guidance(v, option)
    return sorted(set(values))


MAX_DEGREE = 8  # the paper uses 3,2,2; higher degrees only fit noise


def _degrees(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or max(values) > MAX_DEGREE:
        raise AutotuneError(f"--degrees: expected STEP,GUIDANCE,NFE integers in 0..{MAX_DEGREE} like 3,2,2, "
                            f"got {text!r}")
    return values  # type: ignore[return-value]


def _ratios_text(ratios) -> str:
    return ", ".join(f"{r:.3f}" for r in ratios)


@dc_app.command("fit")
@one_line_errors
def dc_fit_cmd(
    model: str = typer.Option(..., "--model", help="diffusers pipeline directory or built-in model name"),
    schedule: Path = typer.Option(..., "--schedule", help="schedule file whose ratios are fitted"),
    out: Path = typer.Option(..., "--out", help="schedule file to write (the input with fitted ratios)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="override the schedule's guidance scale"),
    datapoints: int = typer.Option(10, "--datapoints", min=1, max=MAX_BATCH, help="search-set samples the fit sees"),
    iterations: int = typer.Option(40, "--iterations", min=0, max=MAX_ITERATIONS,
                                   help="AdamW iterations (per step for greedy)"),
    lr: float = typer.Option(0.1, "--lr", help="AdamW learning rate"),
    method: str = typer.Option("joint", "--method", help="joint (trajectory loss, all ratios) or greedy (paper's "
                                                          "step-by-step search)"),
    cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the cache"),
) -> None:
    """Fit SCHEDULE's DC-Solver compensation ratios on MODEL and write the schedule with them."""
    from autotune.evaluate.cpus import fit_threads_to_free_cpus
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.registry import load_model
    from autotune.search.dc_fit import fit_ratios
    from autotune.space.fileformat import load, save

    settings = _settings(datapoints, iterations, lr, method)
    check_output_file(out, "--out")
    check_guidance(guidance)
    sched = load(schedule)
    if guidance is not None:
        sched = dataclasses.replace(sched, guidance=guidance)
    with step(f"loading {model}"):
        m = load_model(model)
    sched.check_units(m.units)
    check_guidance_applies(m, sched.guidance, model)
    evaluator = Evaluator(m, "search", size=datapoints, store=open_store_option(cache, no_cache))
    fit_threads_to_free_cpus()
    with step(f"reference solution, {evaluator.eval_set.size} samples") as progress:
        evaluator.progress = progress
        reference = evaluator.reference(sched.guidance)
    with step(f"fitting ratios ({settings.method}, {settings.iterations} iterations)"):
        fit = fit_ratios(m, sched, evaluator.eval_set, reference, settings)
    fitted = dataclasses.replace(fit.schedule, metadata={
        **sched.metadata, "dc_fit": {**settings.as_dict(), "model_fingerprint": evaluator.fingerprint,
                                     "fit_set": evaluator.eval_set.id, "loss_before": fit.loss_before,
                                     "loss_after": fit.loss_after, "seconds": round(fit.seconds, 3)}})
    save(fitted, out)
    console.print(f"ratios: {_ratios_text(fit.ratios)}")
    console.print(f"trajectory loss on {evaluator.eval_set.size} datapoints: {fit.loss_before:.4e} -> "
                  f"{fit.loss_after:.4e} ({100 * (1 - fit.loss_after / fit.loss_before):.1f} % lower) in "
                  f"{fit.seconds:.1f} s, {fit.model_calls} model calls")
    console.print(f"wrote {out}: NFE {fitted.nfe}, hash {fitted.hash()}")


@cpr_app.command("fit")
@one_line_errors
def cpr_fit_cmd(
    model: str = typer.Option(..., "--model", help="diffusers pipeline directory or built-in model name"),
    nfe: str = typer.Option(..., "--nfe", help=f"NFE grid, e.g. 4-10 or 4,6,8,10 (each 1..{MAX_NFE})"),
    guidance: Optional[str] = typer.Option(None, "--guidance", help="guidance grid, e.g. 1,2,4,6,8 "
                                                                     "(omit for an unguided model)"),
    out: Path = typer.Option(..., "--out", help="CPR file to write"),
    solver: str = typer.Option("unipc-bh2-o2", "--solver", help="named schedule the ratios are fitted on"),
    degrees: str = typer.Option("3,2,2", "--degrees", help="polynomial degrees STEP,GUIDANCE,NFE"),
    datapoints: int = typer.Option(10, "--datapoints", min=1, max=MAX_BATCH, help="search-set samples each fit sees"),
    iterations: int = typer.Option(40, "--iterations", min=0, max=MAX_ITERATIONS, help="AdamW iterations per fit"),
    lr: float = typer.Option(0.1, "--lr", help="AdamW learning rate"),
    method: str = typer.Option("joint", "--method", help="joint or greedy (see `autotune dc fit --help`)"),
    cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the cache"),
) -> None:
    """Fit ratios on a grid of (NFE, guidance) and regress them into a CPR file."""
    import time

    from autotune.models.registry import load_model
    from autotune.predictors.cpr import save_cpr
    from autotune.search.dc_fit import fit_grid, regress_grid

    nfes = _parse_range(nfe)
    guidances = [None] if guidance is None else _parse_floats(guidance, "--guidance")
    degs = _degrees(degrees)
    settings = _settings(datapoints, iterations, lr, method)
    check_output_file(out, "--out")
    m = load_model(model)
    check_guidance_applies(m, guidances[0], model)
    table = Table("NFE", "guidance", "ratios", "loss before", "loss after", "seconds")
    start = time.perf_counter()
    store = open_store_option(cache, no_cache)
    fits = fit_grid(m, solver, nfes, guidances, settings, store=store, callback=lambda f: table.add_row(
        str(f.nfe), str(f.guidance), _ratios_text(f.fit.ratios), f"{f.fit.loss_before:.3e}",
        f"{f.fit.loss_after:.3e}", f"{f.fit.seconds:.1f}"))
    cpr = regress_grid(fits, m.fingerprint(), solver, degs, settings)
    save_cpr(cpr, out)
    console.print(table)
    console.print(f"wrote {out}: {len(fits)} configurations, degrees {cpr.degrees} (step, guidance, nfe), "
                  f"rms residual {cpr.fit['rms_residual']:.4f}, {time.perf_counter() - start:.1f} s")


@cpr_app.command("apply")
@one_line_errors
def cpr_apply_cmd(
    cpr_file: Path = typer.Option(..., "--cpr", help="CPR file written by `autotune cpr fit`"),
    out: Path = typer.Option(..., "--out", help="schedule file to write"),
    schedule: Optional[Path] = typer.Option(None, "--schedule", help="schedule to give ratios (default: the "
                                                                      "CPR's solver at --nfe; needs --model)"),
    nfe: Optional[int] = typer.Option(None, "--nfe", min=1, max=MAX_NFE,
                                      help=f"steps, 1..{MAX_NFE} (default: the schedule's)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="guidance scale (default: the schedule's)"),
    model: Optional[str] = typer.Option(None, "--model", help="check the CPR was fitted on this model (needed "
                                                              "when the schedule records no model fingerprint)"),
) -> None:
    """Predict ratios for (NFE, guidance) instantly and write the schedule with them. An NFE or guidance
    outside the grid the CPR was fitted on is clamped into it, with a warning."""
    import time

    from autotune.predictors.cpr import load_cpr
    from autotune.space.fileformat import load, save

    check_output_file(out, "--out")
    check_guidance(guidance)
    cpr = load_cpr(cpr_file)
    m = None
    if model is not None:
        from autotune.models.registry import load_model

        m = load_model(model)
        cpr.check_model(m.fingerprint())
    if schedule is not None:
        sched = load(schedule)
        if nfe is not None and nfe != len(sched.steps):
            raise AutotuneError(f"--nfe {nfe}: the schedule {schedule} has {len(sched.steps)} steps")
    else:
        if m is None or nfe is None:
            raise AutotuneError("--schedule: give a schedule file, or --model and --nfe to use the CPR's solver")
        from autotune.search.dc_fit import base_schedule

        sched = base_schedule(m, cpr.solver, nfe, None)
    if m is None:
        recorded = _recorded_fingerprint(sched.metadata)
        if recorded is None:
            raise InputError(f"--model: {schedule} records no model fingerprint; give --model so that the CPR "
                             "is checked against the model it was fitted on")
        cpr.check_model(recorded)
    if guidance is not None:
        sched = dataclasses.replace(sched, guidance=guidance)
    for note in cpr.outside_grid(len(sched.steps), sched.guidance):
        err_console.print(f"warning: {note}", highlight=False, soft_wrap=True)
    start = time.perf_counter()
    result = cpr.apply(sched)
    seconds = time.perf_counter() - start
    result = dataclasses.replace(result, metadata={**sched.metadata, "cpr": {
        "file": str(cpr_file), "model_fingerprint": cpr.model_fingerprint, "solver": cpr.solver}})
    save(result, out)
    console.print(f"ratios: {_ratios_text(result.steps[k].ratio for k in range(len(result.steps)))} "
                  f"(predicted in {1e3 * seconds:.2f} ms)")
    console.print(f"wrote {out}: NFE {result.nfe}, guidance {result.guidance}, hash {result.hash()}")


def _recorded_fingerprint(metadata: dict) -> Optional[str]:
    """The model fingerprint a schedule file records: written by `search`, `dc fit` or `cpr apply`."""
    for where in (metadata, metadata.get("dc_fit"), metadata.get("cpr")):
        if isinstance(where, dict) and isinstance(where.get("model_fingerprint"), str):
            return where["model_fingerprint"]
    return None


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `autotune` app."""
    app.add_typer(dc_app, name="dc")
    app.add_typer(cpr_app, name="cpr")
