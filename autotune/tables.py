"""The tables the CLI prints, built in one place so that every number survives an 80-column terminal.

Rules the builders keep: numbers in 3 significant digits (``1.52e-03``); number columns never wrap, never
cut (``no_wrap``, wide enough for their longest cell); names fold onto a second line rather than lose
characters; long prose (a model's description) goes below the table, not into a cell; figures that do
not fit beside each other go into a second table.

One convention for "better" and "worse" (:func:`versus`): ratio = the best named schedule's mean error /
this schedule's, so > 1 means this schedule's error is lower, printed ``2.10x better`` or ``0.80x (worse)``.
The closing table of `autotune search`, `autotune compare`, report.md (autotune/report.py) and
bench/search.py all use it. A distribution metric (:func:`dist_lines`) has no ratio: its line says "better" or
"worse" by how much in the metric's own units and direction (class accuracy: higher is better), with the paired
interval of how much worse.

Tables are built here and printed by the *_cli modules (the only printers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from rich.table import Column, Table
from rich.text import Text

from autotune.evaluate.ids import DATA_DRAWS, PER_SAMPLE, direction
from autotune.evaluate.metrics import decode_errors, excess, excess_interval, ratio_interval

# the distribution metrics models return (``data_metrics``), in display order, with their column headers
DATA_METRICS = {"fd": "FD", "class_acc": "class acc", "nll_gap": "NLL gap", "swd": "SWD"}


# ----------------------------------------------------------------------------------------------- numbers


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sci(v: Any) -> str:
    """An error figure in 3 significant digits: ``1.52e-03``; ``diverged`` for inf, ``-`` when absent."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isinf(v):
        return "diverged"
    return f"{float(v):.2e}"


def fig(v: Any) -> str:
    """Any other figure in 3 significant digits (``12.3``, ``0.912``), ints as they are."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool) or isinstance(v, int) or not isinstance(v, float):
        return str(v)
    return f"{v:#.3g}".rstrip(".")  # '#' keeps trailing zeros (24.0, 0.330); a bare '217.' loses its dot


def interval(low: Any, high: Any, fmt=sci) -> str:
    """``[low, high]`` or ``-`` when either end is missing or not finite."""
    if not (_finite(low) and _finite(high)):
        return "-"
    return f"[{fmt(low)}, {fmt(high)}]"


def mean_interval_text(row: Mapping[str, Any]) -> str:
    """The bootstrap 95 % interval of a row's mean mse_ref, ``[low, high]``."""
    return interval(row.get("mse_ref_ci_low"), row.get("mse_ref_ci_high"))


# ----------------------------------------------------------------------------------------------- better/worse


@dataclass(frozen=True)
class Versus:
    """One schedule against the best named one: ``ratio`` = best named mean / this mean (> 1: this is
    better), with a paired-bootstrap 95 % interval when both carry per-sample errors on the same noise."""

    ratio: float
    low: float | None = None
    high: float | None = None
    diverged: bool = False  # this schedule diverged: no ratio to speak of

    @property
    def better(self) -> bool:
        return self.ratio > 1.0

    def text(self) -> str:
        """``2.10x better``, ``0.80x (worse)``, or ``1.00x (same)`` when equal to 2 decimals."""
        if self.diverged:
            return "diverged"
        if math.isinf(self.ratio):
            return "inf x better"  # this schedule's error is exactly zero
        shown = f"{self.ratio:.2f}x"
        if shown == "1.00x":
            return f"{shown} (same)"
        return f"{shown} better" if self.better else f"{shown} (worse)"

    def interval_text(self) -> str:
        """``[1.60, 2.70]`` (95 % interval of the ratio), or ``-``."""
        return interval(self.low, self.high, fmt=lambda v: f"{v:.2f}")


def versus(ours: Mapping[str, Any], best_peer: Mapping[str, Any], p99: bool = False) -> Versus:
    """The one better/worse convention: ratio = best_peer's mse_ref / ours (> 1: ours is better), or of their 99th
    percentiles with ``p99``; the interval is a paired bootstrap of that ratio when both rows carry per-sample
    errors of the same length."""
    key = "mse_ref_p99" if p99 else "mse_ref"
    mine, theirs = float(ours.get(key, math.inf)), float(best_peer.get(key, math.inf))
    if not math.isfinite(mine):
        return Versus(0.0, diverged=True)
    ratio = theirs / mine if mine > 0 else math.inf
    a, b = ours.get(PER_SAMPLE), best_peer.get(PER_SAMPLE)
    if isinstance(a, str) and isinstance(b, str):
        ea, eb = decode_errors(a), decode_errors(b)
        if ea.shape == eb.shape and ea.size > 1:
            low, high = ratio_interval(eb, ea, percentile=99 if p99 else None)
            return Versus(ratio, low, high)
    return Versus(ratio)


def tail_line(row: Mapping[str, Any], peers: Sequence[Mapping[str, Any]], more: str = "--report-size") -> str | None:
    """The row's 99th percentile against the lowest of the ``peers``', in :func:`versus`'s convention (> 1: this
    one's p99 is lower), with the paired-bootstrap 95 % interval of that ratio and whether the set decides it: a
    schedule that fails on about 1 % of the noises (gmm64's mode switches) has its p99 on that cliff, and one set
    of 1024 noises can put it on either side (``more``: the command's option for a larger set). None without
    per-sample errors on the same noise."""
    named = [p for p in peers if _finite(p.get("mse_ref_p99")) and isinstance(p.get(PER_SAMPLE), str)]
    if not named:
        return None
    best = min(named, key=lambda p: float(p["mse_ref_p99"]))
    v = versus(row, best, p99=True)
    if v.diverged or v.low is None or v.high is None:
        return None
    low, high = v.low, v.high
    verdict = ("lower" if low > 1 else "higher" if high < 1
               else f"not decided by these {len(decode_errors(row[PER_SAMPLE]))} noises ({more})")
    shown = v.text() if v.ratio >= 0.0995 else f"{fig(v.ratio)}x (worse)"  # 2 decimals would read 0.00x
    return (f"tail: {row['name']}'s p99 {sci(row['mse_ref_p99'])} vs {best['name']}'s {sci(best['mse_ref_p99'])}, "
            f"the lowest named: {shown}, 95% CI {interval(low, high, fmt=fig)}: {verdict}")


def dist_lines(row: Mapping[str, Any], peers: Sequence[Mapping[str, Any]], more: str = "--report-size") -> list[str]:
    """The row's distribution metrics against the best named schedule's (lowest mean, as :func:`versus_table`),
    one line each: better or worse on the figure, and, where both rows carry bootstrap draws of the metric on the
    same resamples (``DATA_DRAWS``: report sets), the paired 95 % interval of how much worse it is and whether the
    set decides that (``more``: the command's option for a larger set). A metric a few-step schedule beats the
    converged ODE's own samples on (digits' class accuracy) is printed all the same: the reference line says."""
    best = best_row(peers)
    if best is None or best is row or row.get("diverged"):
        return []
    lines = []
    for key in data_metric_names([row, best]):
        a, b = row.get(key), best.get(key)
        if not (_finite(a) and _finite(b)):
            continue
        worse_by = excess(key, float(a), float(b))
        said = "the same" if fig(a) == fig(b) else f"worse by {fig(abs(worse_by))}" if worse_by > 0 \
            else f"better by {fig(abs(worse_by))}"
        lines.append(f"{DATA_METRICS[key]}: {row['name']} {fig(a)} vs {best['name']} {fig(b)}, the best named "
                     f"({'higher' if direction(key) == 'maximize' else 'lower'} is better): {said}"
                     + _paired_dist_verdict(key, row, best, more))
    return lines


def _paired_dist_verdict(key: str, row: Mapping[str, Any], best: Mapping[str, Any], more: str) -> str:
    """``; paired 95% CI of how much worse [lo, hi]: worse | better | not decided ...``, or "" without draws."""
    a, b = (r.get(DATA_DRAWS, {}).get(key) for r in (row, best))
    if not (isinstance(a, str) and isinstance(b, str)):
        return ""
    da, db = decode_errors(a), decode_errors(b)
    if da.shape != db.shape or da.size < 2:
        return ""
    low, high = excess_interval(key, da, db)
    n = len(decode_errors(row[PER_SAMPLE])) if isinstance(row.get(PER_SAMPLE), str) else None
    noises = f"these {n} noises" if n else "this set"
    verdict = "worse" if low > 0 else "better" if high < 0 else f"not decided by {noises} ({more})"
    return f"; paired 95% CI of how much worse {interval(low, high, fmt=fig)}: {verdict}"


def best_row(rows: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The row with the lowest finite mse_ref, or None."""
    finite = [r for r in rows if _finite(r.get("mse_ref"))]
    return min(finite, key=lambda r: float(r["mse_ref"])) if finite else None


# ----------------------------------------------------------------------------------------------- builders


def _num(header: str, justify: str = "right") -> Column:
    return Column(header, no_wrap=True, justify=justify)


def _name(header: str = "schedule") -> Column:
    return Column(header, overflow="fold")  # a long name folds onto a second line, whole


def error_table(rows: Sequence[Mapping[str, Any]], title: str) -> Table:
    """Per schedule (rows: {"name", **metrics}): the mean per-sample mse_ref with its bootstrap 95 %
    interval, the median and the 99th percentile."""
    table = Table(_name(), _num("mean"), _num("95% CI of mean"), _num("median"), _num("p99"),
                  title=title, title_justify="left")
    for r in rows:
        table.add_row(str(r["name"]), sci(r.get("mse_ref")), mean_interval_text(r), sci(r.get("mse_ref_median")),
                      sci(r.get("mse_ref_p99")))
    return table


def data_metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distribution metrics (``DATA_METRICS``) some row carries, in display order."""
    return [k for k in DATA_METRICS if any(k in r for r in rows)]


def versus_table(rows: Sequence[Mapping[str, Any]], peers: Sequence[Mapping[str, Any]], title: str) -> Table | None:
    """Per schedule: :func:`versus` the best of ``peers`` (with its interval) and the model's distribution
    metrics; None when there is neither a peer nor a distribution metric."""
    best = best_row(peers)
    extra = data_metric_names(rows)
    if best is None and not extra:
        return None
    columns = [_name()]
    if best is not None:
        columns += [_num(f"vs {best['name']}", "left"), _num("95% CI")]
    columns += [_num(DATA_METRICS[k]) for k in extra]
    table = Table(*columns, title=title, title_justify="left")
    for r in rows:
        cells = [str(r["name"])]
        if best is not None:
            v = versus(r, best)
            cells += [v.text(), v.interval_text()]
        cells += [fig(r.get(k)) for k in extra]
        table.add_row(*cells)
    return table


def reference_metrics_line(metrics: Mapping[str, float], steps: int, guidance: float | None = None) -> str:
    """The distribution metrics of a reference solution (its ODE solved in ``steps`` steps, at ``guidance`` when
    one is set), as the line under a closing or compare table."""
    shown = ", ".join(f"{DATA_METRICS[k]} {fig(metrics[k])}" for k in DATA_METRICS if k in metrics)
    at = "" if guidance is None else f", guidance {guidance:g}"
    return f"reference solution (the ODE solved in {steps} steps{at}): {shown}"


def report_tables(rows: Sequence[Mapping[str, Any]], peers: Sequence[Mapping[str, Any]], where: str) -> list[Table]:
    """The honest figures of schedules at one NFE (rows include ``peers``, the named schedules): the error
    table and the better/worse table (ratio = best named / this, > 1 better)."""
    tables = [error_table(rows, f"{where}: per-sample mse_ref (lower is better)")]
    vs = versus_table(rows, peers, f"{where}: ratio = best named mean / this mean (> 1: better); "
                                   "paired bootstrap 95% CI")
    if vs is not None:
        tables.append(vs)
    return tables


def nfe_overview_table(rows: Sequence[Mapping[str, Any]], title: str) -> Table:
    """mse_ref means per schedule (rows) and NFE (columns); ``*`` marks the best per NFE."""
    nfes = sorted({int(r["nfe"]) for r in rows})
    best = {n: best_row([r for r in rows if int(r["nfe"]) == n]) for n in nfes}
    table = Table(_name(), *[_num(f"NFE {n}") for n in nfes], title=title, title_justify="left")
    for name in dict.fromkeys(r["name"] for r in rows):
        cells = []
        for n in nfes:
            hit = next((r for r in rows if r["name"] == name and int(r["nfe"]) == n), None)
            if hit is None:
                cells.append("")
                continue
            mark = "*" if best[n] is not None and hit is best[n] else " "
            cells.append(("diverged" if hit.get("diverged") else sci(hit.get("mse_ref"))) + mark)
        table.add_row(str(name), *cells)
    return table


HIDDEN_METRICS = (PER_SAMPLE, DATA_DRAWS, "schedule_hash", "evaluated_schedule")  # not figures: ids and payloads
FIRST_METRICS = ("mse_ref", "mse_ref_ci_low", "mse_ref_ci_high", "mse_ref_median", "mse_ref_p99", "mse_ref_cvar",
                 "traj_err", "nfe", "diverged", "diverged_at", "seconds", "cached")


def metrics_table(metrics: Mapping[str, Any], title: str) -> Table:
    """One evaluation, one metric a line (error figures first; ids and the per-sample payload left out)."""
    table = Table(Column("metric", no_wrap=True), Column("value", overflow="fold"), title=title, title_justify="left")
    keys = [k for k in FIRST_METRICS if k in metrics]
    keys += [k for k in metrics if k not in FIRST_METRICS and k not in HIDDEN_METRICS]
    for key in keys:
        value = metrics.get(key)
        shown = sci(value) if key.startswith("mse_ref") or key == "traj_err" else fig(value)
        table.add_row(key, shown)
    return table


def models_table(models: Sequence[Mapping[str, Any]]) -> Table:
    """Built-in models (dicts from ``describe`` plus ``name``), one short line each; the descriptions go
    below the table (:func:`model_notes`), where they wrap as prose."""
    table = Table(_name("model"), _num("predicts", "left"), _num("noise", "left"), _num("parameters"),
                  _num("shape", "left"), _num("units"))
    for m in models:
        table.add_row(str(m["name"]), str(m["parameterization"]), str(m["noise"]), f"{m['parameters']:,}",
                      "x".join(map(str, m["sample_shape"])), str(m["units"]))
    return table


def model_notes(models: Sequence[Mapping[str, Any]]) -> list[str]:
    """``name: description`` lines to print under :func:`models_table`."""
    return [f"{m['name']}: {m['about']}" for m in models]


def finalists_table(scored: Sequence[Any], chosen: Any, search_values: Sequence[float], set_id: str) -> Table:
    """`autotune search --validate`: every finalist's search-set and held-out validation figures."""
    # the choice is by mean + a share of the worst-5 % mean (search/selection.py), so both are shown
    table = Table(_name("finalist"), _num("search mean"), _num("validation mean"), _num("worst 5%"),
                  title=f"finalists on the held-out validation set ({set_id})", title_justify="left")
    for f, value in zip(scored, search_values):
        # a finalist validation's screen stopped: its figures are on the first noises only
        note = " (chosen)" if f is chosen else f" (first {f.validation['screened']})" if f.screened else ""
        table.add_row(f.label + note, sci(value), sci(f.validation["mse_ref"]), sci(f.validation.get("mse_ref_cvar")))
    return table


def pareto_table(front: Sequence[Any], names: Sequence[str]) -> Table:
    """The Pareto front of a multi-objective search: one row per schedule."""
    table = Table(_num("#"), *[_num(o) for o in names], _num("hash", "left"),
                  title=f"Pareto front on the search set ({len(front)} schedules)", title_justify="left")
    for i, t in enumerate(front):
        table.add_row(str(i), *[fig(float(t.objectives[o])) for o in names], t.hash)
    return table


def cache_stats_table(rows: Mapping[str, int], size: str) -> Table:
    """`autotune cache stats`: rows per table and the size on disk."""
    table = Table(Column("table", no_wrap=True), _num("rows"))
    for name, n in rows.items():
        table.add_row(name, f"{n:,}")
    table.add_row("size on disk", size)
    return table


def bench_table(rows: Sequence[Any], rel: Mapping[tuple[str, int], Mapping[str, float]], title: str) -> Table:
    """`autotune bench`: median latency per (way, batch), speed-up over eager and cost over NFE x bare."""
    table = Table(Column("way", no_wrap=True), _num("batch"), _num("ms"), _num("x vs eager"),
                  _num("/ NFE x bare"), title=title, title_justify="left")
    for r in rows:
        e = rel[(r.way, r.batch)]
        table.add_row(r.way, str(r.batch), f"{1e3 * r.seconds:.2f}",
                      f"{e['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in e else "",
                      f"{e['vs_bare']:.2f}" if "vs_bare" in e else "")
    return table


def compare_tables(rows: Sequence[Mapping[str, Any]], peer_names: Iterable[str], where: str) -> list[Table | Text]:
    """`autotune compare`: the means at every NFE side by side, then per NFE the honest figures
    (:func:`report_tables`) against the best named schedule (``peer_names``) at that NFE, and the
    :func:`tail_line` and :func:`dist_lines` of each schedule that is not a named one."""
    named = set(peer_names)
    title = f"mse_ref (mean) on {where}; lower is better, * best per NFE"
    shown: list[Table | Text] = [nfe_overview_table(rows, title)]
    for n in sorted({int(r["nfe"]) for r in rows}):
        here = [r for r in rows if int(r["nfe"]) == n]
        peers = [r for r in here if r["name"] in named]
        shown += report_tables(here, peers, f"NFE {n}")
        for r in here:
            if r["name"] not in named:
                tail = tail_line(r, peers, "--size")
                shown += [Text(line) for line in ([tail] if tail else []) + dist_lines(r, peers, "--size")]
    return shown
