"""`autotune report search|compare`: markdown + PNG reports (registered on the main app by `register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from autotune.sampling.capabilities import check_guidance_applies
from autotune.cli_common import CACHE_HELP, check_guidance, check_output_dir, console
from autotune.cli_common import one_line_errors
from autotune.errors import AutotuneError

report_app = typer.Typer(no_args_is_help=True, help="Markdown + PNG reports of a search or a comparison.")

DEFAULT_NFES = (4, 5, 6, 8, 10)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `autotune` app."""
    app.add_typer(report_app, name="report")


def _parse_nfes(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise AutotuneError(f"--nfe: expected comma-separated integers like 4,5,6,8,10, got {text!r}") from None
    from autotune.space.fileformat import MAX_NFE

    if not values or values[0] < 1 or values[-1] > MAX_NFE:
        raise AutotuneError(f"--nfe: expected integers in 1..{MAX_NFE}, got {text!r}")
    return values


def _baseline_names(text: str, noise=None) -> list[str]:
    """The --baselines list; "all" is every named schedule that applies to the model (flow ones for flow models)."""
    from autotune.sampling.named import ALL_NAMED, NAMED, names_for

    if text == "all":
        return names_for(noise) if noise is not None else list(NAMED)
    if text == "none":
        return []
    names = [b.strip() for b in text.split(",") if b.strip()]
    for n in names:
        if n not in ALL_NAMED:
            raise AutotuneError(f"--baselines: unknown schedule {n!r} (one of {', '.join(ALL_NAMED)}, all, none)")
    return names


def _evaluator(model: str, eval_set: str, size: int, cache: Optional[str], no_cache: bool):
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.registry import load_model
    from autotune.progress_cli import step

    store = None
    if not no_cache:
        from autotune.cache.store import open_store

        store = open_store(cache)
    with step(f"loading {model}"):
        m = load_model(model)
    evaluator = Evaluator(m, eval_set, size=size, store=store, model_spec=model)
    return evaluator, store


@report_app.command("search")
@one_line_errors
def report_search_cmd(
    schedule: Path = typer.Option(..., "--schedule", help="schedule file written by `autotune search`"),
    out: Path = typer.Option(..., "--out", help="folder for report.md and the PNG plots"),
    cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP + "; the search's trials are read from it"),
    model: Optional[str] = typer.Option(None, "--model", help="the model (default: the schedule's metadata.model)"),
    nfe: Optional[str] = typer.Option(None, "--nfe", help="NFEs of the baselines (default 4,5,6,8,10 and the "
                                                          "schedule's)"),
    baselines: str = typer.Option("all", "--baselines", help="'all', 'none' or comma-separated named schedules"),
    size: int = typer.Option(0, "--size", min=0, help="report-set size (0: the default)"),
    samples: int = typer.Option(16, "--samples", min=0, help="samples per grid for image models (0: no grids)"),
) -> None:
    """Report a search: progress, the schedule's grid, error vs NFE against the baselines, the Pareto front
    (multi-objective searches) and sample grids (reference, best named peer, searched) from the same noise."""
    import dataclasses

    from autotune.progress_cli import step
    from autotune.report import baseline_rows, is_image_model, sample_images, schedule_row, write_search_report
    from autotune.sampling.named import build
    from autotune.space.fileformat import load

    check_output_dir(out, "--out")
    sched = load(schedule)
    meta = sched.metadata
    sid = meta.get("search_id")
    if not sid:
        raise AutotuneError(f"--schedule {schedule}: no metadata.search_id (not written by `autotune search`?); "
                            "use `autotune report compare` for any schedule")
    model = model or meta.get("model")
    if not model:
        raise AutotuneError(f"--schedule {schedule}: no metadata.model; pass --model")
    from autotune.cache.store import default_cache_path, open_store

    store = open_store(cache)
    trials = store.trials(sid)
    if not trials:
        raise AutotuneError(f"no trials of search {sid} in cache {cache or default_cache_path()} "
                            "(pass the --cache the search used)")
    nfes = _parse_nfes(nfe) if nfe else sorted(set(DEFAULT_NFES) | {sched.nfe})
    if sched.nfe not in nfes:
        nfes = sorted(set(nfes) | {sched.nfe})
    evaluator, _ = _evaluator(model, "report", size, cache, False)
    sched.check_units(evaluator.model.units)
    check_guidance_applies(evaluator.model, sched.guidance, model)
    name = sched.name or "searched"
    with step("scoring the schedule and the baselines, report set") as progress:
        evaluator.progress = progress  # the report set's reference, solved first unless cached
        rows = [schedule_row(evaluator, sched, name)] + baseline_rows(evaluator, _baseline_names(baselines, evaluator.model.noise), nfes,
                                                                      sched.guidance)
    images = None
    if samples and is_image_model(evaluator.model):
        peers = [r for r in rows[1:] if int(r["nfe"]) == sched.nfe and not r.get("diverged")]
        grids = {}
        if peers:
            best = min(peers, key=lambda r: r["mse_ref"])
            peer = build(best["name"], evaluator.model.noise, sched.nfe)
            grids[f"best peer: {best['name']}"] = dataclasses.replace(peer, guidance=sched.guidance)
        grids[f"searched: {name}"] = sched
        with step(f"sampling {len(grids)} grids of {samples}"):
            images = sample_images(evaluator, grids, samples, sched.guidance)
    objectives = meta.get("objectives") or ["mse_ref"]
    title = f"Search report: {name} on {model}, NFE {sched.nfe}"
    with step(f"writing the report to {out}"):
        path = write_search_report(out, schedule=sched, trials=trials, baselines=rows, title=title,
                                   objectives=objectives, images=images)
    console.print(f"wrote {path} ({len(trials)} trials, {len(rows)} report-set rows, "
                  f"{evaluator.misses} evaluated, {evaluator.hits} from the cache)")


@report_app.command("compare")
@one_line_errors
def report_compare_cmd(
    model: str = typer.Option(..., "--model", help="diffusers pipeline directory or built-in model name"),
    schedules: str = typer.Option("", "--schedules", help="comma-separated schedule files (A.json,B.json)"),
    nfe: str = typer.Option(",".join(map(str, DEFAULT_NFES)), "--nfe", help="NFEs of the named baselines"),
    out: Path = typer.Option(..., "--out", help="folder for report.md and the PNG plots"),
    baselines: str = typer.Option("all", "--baselines", help="'all', 'none' or comma-separated named schedules"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="guidance scale for the named schedules"),
    eval_set: str = typer.Option("report", "--set", help="report or search"),
    size: int = typer.Option(0, "--size", min=0, help="evaluation-set size (0: the default of the set)"),
    samples: int = typer.Option(0, "--samples", min=0, help="samples per grid for image models (0: no grids)"),
    cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the cache"),
) -> None:
    """Report a comparison: mse_ref against NFE of every named baseline and every given schedule, with each
    given schedule's time-grid plot."""
    import dataclasses

    from autotune.progress_cli import step
    from autotune.report import baseline_rows, is_image_model, sample_images, schedule_row, write_compare_report
    from autotune.space.fileformat import load

    check_output_dir(out, "--out")
    paths = [Path(p.strip()) for p in schedules.split(",") if p.strip()]
    given = [load(p) for p in paths]  # a bad file fails before the model is loaded
    names = _baseline_names(baselines)
    if not given and not names:
        raise AutotuneError("nothing to compare: pass --schedules or leave --baselines at 'all'")
    evaluator, _ = _evaluator(model, eval_set, size, cache, no_cache)
    check_guidance_applies(evaluator.model, check_guidance(guidance), model)
    names = _baseline_names(baselines, evaluator.model.noise)
    labelled = []
    for p, s in zip(paths, given):
        s.check_units(evaluator.model.units)
        check_guidance_applies(evaluator.model, s.guidance, model)
        label = s.name or p.stem
        if label in names or label in [n for n, _ in labelled]:
            label = f"{label} ({p.name})"  # a file holding a named schedule must not merge into that line
        labelled.append((label, s))
    given = [dataclasses.replace(s, name=label) for label, s in labelled]
    with step(f"scoring the schedules, {evaluator.eval_set.kind} set") as progress:
        evaluator.progress = progress  # the set's reference, solved first unless cached
        rows = baseline_rows(evaluator, names, _parse_nfes(nfe), guidance)
        rows += [schedule_row(evaluator, s, s.name) for s in given]
    images = None
    if samples and is_image_model(evaluator.model) and given:
        with step(f"sampling {len(given)} grids of {samples}"):
            images = sample_images(evaluator, {s.name: s for s in given}, samples, given[0].guidance)
    title = f"Comparison on {model} ({evaluator.eval_set.id})"
    with step(f"writing the report to {out}"):
        path = write_compare_report(out, rows=rows, schedules=given, title=title, images=images)
    console.print(f"wrote {path} ({len(rows)} rows: {evaluator.misses} evaluated, {evaluator.hits} from the cache)")
