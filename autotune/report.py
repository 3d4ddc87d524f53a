"""Reports of a search or a comparison: one ``report.md`` with its tables, and the PNG plots it embeds.

Plots (matplotlib's object API on the Agg canvas: no pyplot, no global backend switch):
``progress.png`` (objective per evaluation + best so far, log y), ``schedule*.png`` (the time grid with each
step's solver, order, corrector, compensation ratio and skip mask), ``pareto.png`` (multi-objective
searches), ``error_vs_nfe.png`` (mse_ref per NFE: every named baseline as a line, each given schedule as a
star) and ``samples.png`` (sample grids from the same noise, side by side).

Rendering takes plain data (trials as the store returns them, baseline rows as dicts, a Schedule); the
``gather`` helpers at the end produce that data with an Evaluator, so `autotune report`, `autotune search
--report` and tests share one path.

Example:
    >>> from autotune.sampling.named import build
    >>> from autotune.sampling.noise import VPLinear
    >>> import tempfile
    >>> s = build("unipc-bh2-o3", VPLinear(), 5)
    >>> rows = [{"name": "unipc-bh2-o3", "nfe": 5, "mse_ref": 0.01}, {"name": "ddim", "nfe": 5, "mse_ref": 0.1}]
    >>> path = write_compare_report(Path(tempfile.mkdtemp()), rows=rows, schedules=[s], title="demo")
    >>> sorted(p.name for p in path.parent.iterdir())
    ['error_vs_nfe.png', 'report.md', 'schedule-unipc-bh2-o3.png']
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from autotune.errors import AutotuneError
from autotune.sampling.capabilities import capabilities_of
from autotune.space.schedule import Schedule
from autotune.tables import (DATA_METRICS, best_row, data_metric_names, dist_lines, fig, mean_interval_text, sci,
                             versus)

SOLVER_MARKERS = {"dpm": "o", "unip-bh1": "s", "unip-bh2": "D", "ipndm": "^"}
ORDER_COLOURS = {1: "#4477aa", 2: "#228833", 3: "#ee7733", 4: "#aa3377"}
DPI = 110


class ReportError(AutotuneError, ValueError):
    """A report cannot be made from what it was given (no trials, no rows, an unreadable image)."""


# ----------------------------------------------------------------------------------------------- plotting


def _figure(width: float = 7.0, height: float = 4.2):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ReportError("reports need matplotlib: pip install 'autotune-diffusion[plots]'") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)  # a Figure without pyplot renders through the Agg canvas
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def trial_value(trial: Mapping[str, Any]) -> float:
    """The scalar objective of a stored trial (``metrics.value``; inf when diverged)."""
    v = trial["metrics"].get("value", math.inf)
    return float(v) if v is not None else math.inf


def plot_progress(trials: Sequence[Mapping[str, Any]], path: Path, objective: str = "mse_ref") -> Path:
    """Objective of every evaluation in trial order (true evaluations filled, cache hits hollow, diverged
    as crosses on the top edge) and the best so far, on a log axis."""
    if not trials:
        raise ReportError("progress plot: no trials")
    values = np.array([trial_value(t) for t in trials])
    cached = np.array([bool(t["metrics"].get("cached")) for t in trials])
    x = np.arange(1, len(values) + 1)
    finite = np.isfinite(values) & (values > 0)
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_yscale("log")
    ax.scatter(x[finite & ~cached], values[finite & ~cached], s=16, color="#4477aa", label="evaluation")
    if (finite & cached).any():
        ax.scatter(x[finite & cached], values[finite & cached], s=16, facecolors="none", edgecolors="#888888",
                   label="cache hit")
    best = np.minimum.accumulate(np.where(finite, values, np.inf))
    shown = np.isfinite(best)
    ax.step(x[shown], best[shown], where="post", color="#cc3311", lw=1.8, label="best so far")
    if (~finite).any() and finite.any():
        top = values[finite].max() * 1.5
        ax.scatter(x[~finite], np.full((~finite).sum(), top), marker="x", color="#cc3311", s=20,
                   label="diverged")
    ax.set_xlabel("evaluation (trial number)")
    ax.set_ylabel(f"{objective} (log)")
    ax.set_title("search progress")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_schedule(schedule: Schedule, path: Path, title: str | None = None) -> Path:
    """The time grid (t at the start and after every step) with each step's solver (marker), order (colour),
    UniC corrector (black ring, ``c<order>``), final denoising call (star), skipped units (``-n``) and the
    DC compensation ratios on the right axis."""
    fig = _figure()
    ax = fig.add_subplot()
    steps = schedule.steps
    ax.plot(range(len(steps) + 1), schedule.times, color="#bbbbbb", lw=1, zorder=1)
    ax.scatter([0], [schedule.t_start], color="black", s=22, zorder=3)
    for k, st in enumerate(steps):
        x = k + 1
        ax.scatter([x], [st.t], marker=SOLVER_MARKERS.get(st.solver, "o"), s=60, zorder=3,
                   color=ORDER_COLOURS.get(st.order, "#777777"),
                   edgecolors="black" if st.corrector != "none" else "none", linewidths=1.6)
        label = f"{st.order}" + (" N" if st.prediction == "noise" else "")
        if st.corrector != "none":
            label += f" c{st.corrector_order}"
        if st.skip:
            label += f" -{len(st.skip)}"
        ax.annotate(label, (x, st.t), textcoords="offset points", xytext=(6, 5), fontsize=7)
    if schedule.final_denoise:  # one more model call at the last time, drawn one column further
        ax.scatter([len(steps) + 1], [steps[-1].t], marker="*", s=160, color="#cc3311", zorder=4)
    ax.set_xlabel("step (marker: solver; colour: order; ring: corrector; N: noise prediction; -n: skipped units)")
    ax.set_ylabel("t")
    ax.set_xticks(range(len(steps) + 1 + int(schedule.final_denoise)))
    ax.grid(True, alpha=0.25)
    ratios = [st.ratio for st in steps]
    if any(r != 1.0 for r in ratios):
        ax2 = ax.twinx()
        ax2.plot(range(1, len(steps) + 1), ratios, ls="--", marker=".", color="#aa3377", label="DC ratio")
        ax2.set_ylabel("compensation ratio", color="#aa3377")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker=m, color="#555555", label=s) for s, m in SOLVER_MARKERS.items()
               if any(st.solver == s for st in steps)]
    handles += [Line2D([], [], ls="", marker="o", color=c, label=f"order {o}") for o, c in ORDER_COLOURS.items()
                if any(st.order == o for st in steps)]
    if schedule.final_denoise:
        handles.append(Line2D([], [], ls="", marker="*", color="#cc3311", label="final denoise"))
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set_title(title or f"{schedule.name or 'schedule'} ({schedule.hash()}), NFE {schedule.nfe}")
    return _save(fig, path)


def _log_if_wide(ax, axis: str, values: np.ndarray) -> None:
    v = values[np.isfinite(values)]
    if len(v) and (v > 0).all() and v.max() / v.min() > 20:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def plot_pareto(points: Sequence[Mapping[str, float]], objectives: Sequence[str], path: Path) -> Path:
    """Every trial against the first objective, one panel per other objective, the Pareto front (computed on
    all objectives) highlighted."""
    from autotune.search.pareto import pareto_front

    if len(objectives) < 2:
        raise ReportError("pareto plot: needs at least two objectives")
    front = set(pareto_front(points, objectives))
    first = objectives[0]
    others = list(objectives[1:])
    fig = _figure(4.2 * len(others) + 0.6, 4.0)
    for i, other in enumerate(others):
        ax = fig.add_subplot(1, len(others), i + 1)
        xs = np.array([float(p[other]) for p in points])
        ys = np.array([float(p[first]) for p in points])
        ok = np.isfinite(xs) & np.isfinite(ys)
        on = np.array([j in front for j in range(len(points))])
        ax.scatter(xs[ok & ~on], ys[ok & ~on], s=12, color="#999999", label="trial")
        order = np.argsort(xs[ok & on])
        ax.plot(xs[ok & on][order], ys[ok & on][order], "-o", color="#cc3311", ms=5, label="Pareto front")
        _log_if_wide(ax, "y", ys[ok])
        ax.set_xlabel(other)
        ax.set_ylabel(first)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
    fig.suptitle(f"Pareto front over {', '.join(objectives)} ({len(front)} of {len(points)} trials)")
    return _save(fig, path)


def plot_error_vs_nfe(rows: Sequence[Mapping[str, Any]], path: Path, ours: Sequence[str] = (),
                      metric: str = "mse_ref") -> Path:
    """``metric`` against NFE, log y: one line per named schedule, a labelled star per schedule in ``ours``."""
    if not rows:
        raise ReportError("error-vs-NFE plot: no rows")
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_yscale("log")
    for name in dict.fromkeys(r["name"] for r in rows):
        pts = sorted((int(r["nfe"]), float(r[metric])) for r in rows if r["name"] == name
                     and _finite(r.get(metric)) and float(r[metric]) > 0)
        if not pts:
            continue
        x, y = zip(*pts)
        if name in ours:
            ax.scatter(x, y, marker="*", s=220, zorder=4, label=name, edgecolors="black", linewidths=0.6)
            for xi, yi in pts:
                ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(8, -3), fontsize=8)
        else:
            ax.plot(x, y, marker="o", ms=4, lw=1.2, label=name)
    nfes = sorted({int(r["nfe"]) for r in rows})
    ax.set_xticks(nfes)
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel(f"{metric} vs reference (log, lower is better)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{metric} against NFE")
    return _save(fig, path)


def image_grid(images: Any, columns: int | None = None) -> np.ndarray:
    """An (H, W, C) uint8 grid from a batch (N, C, H, W) in [-1, 1] (numpy or torch), or an image as it is."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim == 4:
        import torch

        from autotune.images import to_grid

        return to_grid(torch.from_numpy(np.ascontiguousarray(arr)).float(), columns).numpy()
    if arr.ndim in (2, 3):
        return arr
    raise ReportError(f"sample grid: expected (N, C, H, W) samples or an image, got shape {arr.shape}")


def plot_samples(images: Mapping[str, Any], path: Path, columns: int | None = None) -> Path:
    """Sample grids side by side, titled by name (e.g. reference, best peer, searched)."""
    if not images:
        raise ReportError("sample grids: no images")
    grids = {name: image_grid(img, columns) for name, img in images.items()}
    fig = _figure(3.2 * len(grids), 3.6)
    for i, (name, grid) in enumerate(grids.items()):
        ax = fig.add_subplot(1, len(grids), i + 1)
        ax.imshow(grid[..., 0] if grid.ndim == 3 and grid.shape[-1] == 1 else grid,
                  cmap="gray" if grid.ndim == 2 or grid.shape[-1] == 1 else None, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- markdown


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, float):
        return "diverged" if not math.isfinite(v) else f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def slug(name: str) -> str:
    """A file-name-safe form of a schedule name."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "schedule"


def schedule_table(schedule: Schedule) -> str:
    """Every step of a schedule as a markdown table."""
    # the columns only for schedules that shift a model time, or scale a data prediction
    shifted = any(st.shift for st in schedule.steps)
    scaled = any(st.data_scale != 1.0 for st in schedule.steps)
    rows = [(k, st.t, st.solver, st.order, st.prediction, st.corrector if st.corrector == "none" else
             f"{st.corrector} ({st.corrector_order})", st.ratio, *((st.shift,) if shifted else ()),
             *((st.data_scale,) if scaled else ()), ", ".join(st.skip) or "-")
            for k, st in enumerate(schedule.steps)]
    extra = f"t_start {schedule.t_start:g}, final_denoise {str(schedule.final_denoise).lower()}, " \
            f"dc_order {schedule.dc_order}, guidance {_fmt(schedule.guidance) or 'none'}"
    header = ("step", "t", "solver", "order", "prediction", "corrector", "ratio", *(("shift",) if shifted else ()),
              *(("data scale",) if scaled else ()), "skip")
    return _table(header, rows) + f"\n\n{extra}\n"


def nfe_table(rows: Sequence[Mapping[str, Any]], metric: str = "mse_ref") -> str:
    """``metric`` per schedule (rows) and NFE (columns); the best per NFE in bold."""
    nfes = sorted({int(r["nfe"]) for r in rows})
    best = {n: min((float(r[metric]) for r in rows if int(r["nfe"]) == n and _finite(r.get(metric))),
                   default=None) for n in nfes}
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        cells: list[Any] = [name]
        for n in nfes:
            hit = [r for r in rows if r["name"] == name and int(r["nfe"]) == n]
            if not hit:
                cells.append("")
                continue
            v = float(hit[0].get(metric, math.inf))
            cells.append(f"**{_fmt(v)}**" if best[n] is not None and v == best[n] else _fmt(v))
        out.append(cells)
    return _table(["schedule"] + [f"NFE {n}" for n in nfes], out)


def versus_sentence(ours: Mapping[str, Any], best_named: Mapping[str, Any]) -> str:
    """The report's one-line verdict, in the convention of :func:`autotune.tables.versus`."""
    v = versus(ours, best_named)
    ci = v.interval_text()
    return (f"{ours['name']}: mse_ref {sci(ours.get('mse_ref'))} (95% CI "
            f"{mean_interval_text(ours)}); the best named schedule, "
            f"{best_named['name']}, {sci(best_named.get('mse_ref'))}: **{v.text()}**"
            + (f" (paired bootstrap 95% CI of the ratio {ci})" if ci != "-" else "")
            + ". Ratio = best named mean / this mean: > 1 means lower error.\n")


def figures_table(rows: Sequence[Mapping[str, Any]], best_named: Mapping[str, Any] | None) -> str:
    """Every schedule at one NFE, best first: mean with its bootstrap 95 % interval, median, p99, the
    tail mean, the model's distribution metrics and :func:`autotune.tables.versus` the best named schedule."""
    extra = data_metric_names(rows)
    header = ["schedule", "NFE", "mean", "95% CI", "median", "p99", "worst 5% mean",
              *[DATA_METRICS[k] for k in extra]]
    if best_named is not None:
        header += [f"vs best named ({best_named['name']})", "95% CI of ratio"]
    out = []
    for r in sorted(rows, key=lambda r: float(r.get("mse_ref", math.inf))):
        cells = [r["name"], r["nfe"], sci(r.get("mse_ref")), mean_interval_text(r),
                 sci(r.get("mse_ref_median")), sci(r.get("mse_ref_p99")), sci(r.get("mse_ref_cvar")),
                 *[fig(r.get(k)) for k in extra]]
        if best_named is not None:
            v = versus(r, best_named)
            cells += [v.text(), v.interval_text()]
        out.append(cells)
    return _table(header, out)


def figures_section(rows: Sequence[Mapping[str, Any]], named: Sequence[Mapping[str, Any]],
                    ours: Mapping[str, Any] | None) -> str:
    """The verdict sentence (when there is a schedule of ours and a named one) and :func:`figures_table`."""
    best_named = best_row(named)
    lead = versus_sentence(ours, best_named) + "\n" if ours is not None and best_named is not None else ""
    if ours is not None:  # the distribution metrics, each with its paired interval where the rows carry draws
        lead += "".join(f"{line}.\n\n" for line in dist_lines(ours, named, "a larger report set"))
    return lead + figures_table(rows, best_named) + "\n"


def peer_nfe_to_match(rows: Sequence[Mapping[str, Any]], name: str, nfe: int, value: float,
                      metric: str = "mse_ref") -> list[tuple[str, str]]:
    """For every other schedule: the smallest NFE (among the rows) at which it is at least as good as
    ``value``, or ``> max NFE`` if it never is."""
    out = []
    for other in dict.fromkeys(r["name"] for r in rows):
        if other == name:
            continue
        theirs = sorted((int(r["nfe"]), float(r[metric])) for r in rows if r["name"] == other
                        and _finite(r.get(metric)))
        if not theirs:
            continue
        hit = next((n for n, v in theirs if v <= value), None)
        out.append((other, str(hit) if hit is not None else f"> {theirs[-1][0]}"))
    return out


def _img(name: str, alt: str) -> str:
    return f"![{alt}]({name})\n"


def write_search_report(
    out_dir: Path,
    *,
    schedule: Schedule,
    trials: list[dict],
    baselines: list[dict],
    title: str,
    objectives: Sequence[str] = ("mse_ref",),
    images: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``report.md`` and its plots for a finished search; returns the report.md path.

    Args:
        out_dir: folder for report.md and the PNGs (created).
        schedule: the searched schedule (its metadata: method, model, search_id, ...).
        trials: ``store.trials(search_id)``: dicts with trial_number, schedule_hash and metrics (value,
            mse_ref, nfe, cached, elapsed, and objectives for multi-objective searches).
        baselines: rows {"name", "nfe", "mse_ref", "mse_ref_median", ...} on the report set, the searched
            schedule among them under its own name (any NFEs: several give the error-vs-NFE lines).
        title: the report's heading.
        objectives: the search's objective names (two or more: a Pareto plot and table).
        images: optional sample grids by name, (N, C, H, W) in [-1, 1] or an image.

    Raises:
        ReportError: no trials or no baseline rows.
    """
    if not trials:
        raise ReportError("search report: no trials (were they stored? see `autotune search --cache`)")
    if not baselines:
        raise ReportError("search report: no baseline rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = schedule.name or "searched"
    meta = schedule.metadata
    primary = objectives[0]
    plot_progress(trials, out_dir / "progress.png", primary)
    plot_schedule(schedule, out_dir / "schedule.png")
    plot_error_vs_nfe(baselines, out_dir / "error_vs_nfe.png", ours=[name])
    values = [trial_value(t) for t in trials]
    finite = [v for v in values if math.isfinite(v)]
    cached = sum(bool(t["metrics"].get("cached")) for t in trials)
    elapsed = max((float(t["metrics"].get("elapsed", 0.0) or 0.0) for t in trials), default=0.0)
    md = [f"# {title}\n"]
    facts = [("schedule", f"{name} (hash {schedule.hash()})"), ("NFE", schedule.nfe)]
    facts += [(k, meta[k]) for k in ("method", "model", "search_id", "seed", "eval_set") if k in meta]
    facts += [("objectives", ", ".join(objectives)), ("trials", len(trials)),
              ("true evaluations", len(trials) - cached), ("cache hits", cached),
              ("best search-set value", _fmt(min(finite)) if finite else "all diverged"),
              ("diverged trials", len(values) - len(finite)), ("search time (s)", _fmt(elapsed))]
    md.append(_table(("", ""), facts) + "\n")
    here = [r for r in baselines if int(r["nfe"]) == schedule.nfe]
    ours = [r for r in here if r["name"] == name]
    md.append(f"## Report set, NFE {schedule.nfe}\n")
    from autotune.sampling.named import ALL_NAMED  # peers are the named schedules (not e.g. our unpruned stage 1)

    md.append(figures_section(here, [r for r in here if r["name"] in ALL_NAMED], ours[0] if ours else None))
    if len({int(r["nfe"]) for r in baselines}) > 1 and ours and _finite(ours[0].get("mse_ref")):
        md.append(f"NFE each named schedule needs to match {name} (among the NFEs evaluated):\n")
        md.append(_table(("schedule", "NFE needed"), peer_nfe_to_match(baselines, name, schedule.nfe,
                                                                       ours[0]["mse_ref"])) + "\n")
    md.append("## Error against NFE\n")
    md.append(_img("error_vs_nfe.png", "mse_ref against NFE"))
    md.append(nfe_table(baselines) + "\n")
    md.append("## Search progress\n")
    md.append(_img("progress.png", "search progress"))
    md.append("## The schedule\n")
    md.append(_img("schedule.png", "time grid"))
    md.append(schedule_table(schedule))
    if len(objectives) > 1:
        points = [t["metrics"].get("objectives") for t in trials]
        if all(isinstance(p, Mapping) and all(o in p for o in objectives) for p in points):
            from autotune.search.pareto import pareto_front

            plot_pareto(points, objectives, out_dir / "pareto.png")
            front = pareto_front(points, objectives)
            md.append("## Pareto front\n")
            md.append(_img("pareto.png", "Pareto front"))
            seen, rows = set(), []
            for i in sorted(front, key=lambda i: float(points[i][objectives[0]])):
                if trials[i]["schedule_hash"] in seen:
                    continue
                seen.add(trials[i]["schedule_hash"])
                rows.append([trials[i]["trial_number"], trials[i]["schedule_hash"]] +
                            [float(points[i][o]) for o in objectives])
            md.append(_table(["trial", "schedule hash", *objectives], rows) + "\n")
        else:
            md.append("## Pareto front\n\nThe trials carry no `objectives`; no front to show.\n")
    return _finish(out_dir, md, images)


def _finish(out_dir: Path, md: list[str], images: Mapping[str, Any] | None) -> Path:
    """Append the sample grids (if any) and write ``report.md``."""
    if images:
        plot_samples(images, out_dir / "samples.png")
        md.append("## Samples from the same noise\n")
        md.append(_img("samples.png", "sample grids"))
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def write_compare_report(out_dir: Path, *, rows: list[dict], schedules: Sequence[Schedule], title: str,
                         images: Mapping[str, Any] | None = None) -> Path:
    """Write ``report.md`` of a comparison: error against NFE of the named baselines and the given schedules
    (rows {"name", "nfe", "mse_ref", ...}, a given schedule under its name), each given schedule's plot."""
    if not rows:
        raise ReportError("compare report: no rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name or f"schedule-{s.hash()}" for s in schedules]
    plot_error_vs_nfe(rows, out_dir / "error_vs_nfe.png", ours=names)
    md = [f"# {title}\n", "## Error against NFE\n", _img("error_vs_nfe.png", "mse_ref against NFE"),
          nfe_table(rows) + "\n"]
    for s, name in zip(schedules, names):
        file = f"schedule-{slug(name)}.png"
        plot_schedule(s, out_dir / file)
        mine = [r for r in rows if r["name"] == name and _finite(r.get("mse_ref"))]
        md.append(f"## {name}\n")
        here = [r for r in rows if int(r["nfe"]) == s.nfe]
        md.append(figures_section(here, [r for r in here if r["name"] not in names], mine[0] if mine else None))
        if mine and len({int(r["nfe"]) for r in rows}) > 1:
            md.append(f"mse_ref {_fmt(mine[0]['mse_ref'])} at NFE {s.nfe}; NFE each other schedule needs to match "
                      "it (among the NFEs evaluated):\n")
            md.append(_table(("schedule", "NFE needed"), peer_nfe_to_match(rows, name, s.nfe, mine[0]["mse_ref"]))
                      + "\n")
        md.append(_img(file, f"time grid of {name}"))
        md.append(schedule_table(s))
    return _finish(out_dir, md, images)


# ----------------------------------------------------------------------------------------------- gathering


def baseline_rows(evaluator: Any, names: Sequence[str], nfes: Sequence[int], guidance: float | None = None
                  ) -> list[dict]:
    """Report rows of the named schedules at each NFE, scored by ``evaluator`` (cached rows are free)."""
    import dataclasses

    from autotune.sampling.named import build

    rows = []
    for name in names:
        for n in nfes:
            s = dataclasses.replace(build(name, evaluator.model.noise, n), guidance=guidance)
            rows.append(schedule_row(evaluator, s, name))
    return rows


def schedule_row(evaluator: Any, schedule: Schedule, name: str) -> dict:
    """One report row: the schedule's metrics under ``name``."""
    return {"name": name, **evaluator.evaluate(schedule)}


def is_image_model(model: Any) -> bool:
    """Samples that are pictures: (1 or 3, H, W) pixels, or latents a VAE decodes."""
    return capabilities_of(model).images


def sample_images(evaluator: Any, schedules: Mapping[str, Schedule], count: int = 16,
                  reference_guidance: float | None = None) -> dict[str, Any]:
    """Sample grids from the first ``count`` noises (and labels) of the evaluator's set: "reference" (the
    reference ODE solution the finest of the schedules is scored against) first, then every schedule's samples;
    latents are decoded."""
    import torch

    from autotune.sampling.executor import sample

    model = evaluator.model
    noise = evaluator.eval_set.noise(torch.float32)[:count]
    labels = evaluator.eval_set.conditions()
    labels = None if labels is None else labels[:count]
    finest = max((s.nfe for s in schedules.values()), default=None)
    out: dict[str, Any] = {"reference": evaluator.reference(reference_guidance, nfe=finest).final[:count].float()}
    with torch.no_grad():
        for name, s in schedules.items():
            out[name] = sample(model, s, noise, labels).sample
    if capabilities_of(model).decodes:
        out = {k: model.decode(v) for k, v in out.items()}
    return out
