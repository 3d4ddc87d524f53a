"""Warm starts: the best schedules this model's earlier searches found at neighbouring NFE, moved onto this NFE.

A user who searched NFE 5 and now asks for NFE 6 has, in the cache, every schedule scored on the same search set
at NFE 5. The best of them carries what the search learnt about this model (where in log-SNR the steps belong,
which orders and correctors pay) and is a better start than a named schedule built for no model in particular.
:func:`warm_starts` reads those evaluations from the store and :func:`regrid` moves each onto the new step count:
its step positions in log-SNR (0 at ``t_start``, 1 at the end) are interpolated linearly in the step index
fraction, and every per-step decision comes from the source step at the nearest index fraction; the space's
decoder then repairs what does not fit (an order too high for the first steps, a choice the space lacks).

Only plain schedules are used: same guidance and start time, no skipped or reused units, not stochastic, from NFE
within ``NEIGHBOURS`` of this one (values at different NFE are not compared with each other: each NFE gives its
own best). The job adds them to the strategy's seeds, after the named schedules, and puts their hashes into the
search id (a later run that finds other warm starts is another search; the same run resumed finds its own).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from autotune.space.encoding import ScheduleSpace
from autotune.space.fileformat import loads
from autotune.space.schedule import Schedule

NEIGHBOURS = 2  # NFE at most this far from the searched one lend their best schedule
MOST = 2  # warm starts per search, nearest NFE first


def positions(noise: Any, t_start: float, times: Iterable[float], end: float) -> np.ndarray:
    """Times -> positions in [0, 1] of log-SNR between ``t_start`` (0) and ``end`` (1); t = 0 sits at 1."""
    t = torch.tensor([t_start, end, *times], dtype=torch.float64)
    lam = noise.lambda_(t)
    lo, hi = float(lam[0]), float(lam[1])
    u = ((lam[2:] - lo) / (hi - lo)).numpy()
    return np.clip(np.where(np.isfinite(u), u, 1.0), 0.0, 1.0)


def regrid(schedule: Schedule, space: ScheduleSpace, noise: Any) -> Schedule | None:
    """``schedule`` moved onto ``space``'s step count (see the module doc), or None when the space cannot hold it
    (another start or end time, or a noise schedule without a finite log-SNR at the ends)."""
    if schedule.t_start != space.t_start or schedule.steps[-1].t != space.t_end:
        return None
    end = space.t_end if space.t_end > 0 else float(noise.t_min)
    lam_ends = noise.lambda_(torch.tensor([space.t_start, end], dtype=torch.float64))
    if not bool(torch.isfinite(lam_ends).all()) or float(lam_ends[0]) == float(lam_ends[1]):
        return None
    src = schedule.steps
    k_src, k_dst = len(src), space.n_steps
    u_src = np.concatenate([[0.0], positions(noise, space.t_start, [st.t for st in src[:-1]], end), [1.0]])
    frac_dst = np.arange(1, k_dst) / k_dst  # interior times of the new grid, as fractions of the step index
    u_dst = np.interp(frac_dst, np.arange(k_src + 1) / k_src, u_src)
    lam = lam_ends[0] + torch.from_numpy(u_dst) * (lam_ends[1] - lam_ends[0])
    times = noise.t_of_lambda(lam).clamp(space.t_end, space.t_start).numpy()
    at_source = np.round(frac_dst * k_src)
    for k in np.flatnonzero(np.abs(frac_dst * k_src - at_source) < 1e-9):  # a source time itself: kept exactly
        times[k] = src[int(at_source[k]) - 1].t
    nearest = [src[min(k_src - 1, int(round(k * (k_src - 1) / max(k_dst - 1, 1))))] for k in range(k_dst)]
    vec = np.full(space.dim, np.nan)  # NaN: the decoder's middle of the bounds, for a choice the space lacks
    for i, c in enumerate(space.coords):
        if c.family == "t":
            vec[i] = times[c.step]
        elif c.family in ("solver", "prediction", "corrector"):
            options, value = space.choices(c.family), getattr(nearest[c.step], c.family)
            vec[i] = options.index(value) if value in options else np.nan
        elif c.family in ("order", "corrector_order", "ratio"):
            vec[i] = getattr(nearest[c.step], c.family)
        else:  # skip / reuse masks and the reuse order: a warm start computes every unit
            vec[i] = 0.0
    return space.decode(vec, name=f"warm from NFE {schedule.nfe}",
                        metadata={"warm_start": {"nfe": schedule.nfe, "hash": schedule.hash()}})


def _plain(s: Schedule, guidance: float | None) -> bool:
    return (s.guidance == guidance and not s.stochastic and not s.units_used
            and not any(st.reuse for st in s.steps))


def warm_starts(store: Any, model_fp: str, eval_set: str, space: ScheduleSpace, noise: Any,
                guidance: float | None, exclude: Iterable[str] = ()) -> tuple[Schedule, ...]:
    """The best stored schedule of each neighbouring NFE (within NEIGHBOURS of ``space.n_steps``, nearest first, at
    most MOST), scored on ``eval_set`` for this model, regridded onto ``space``; hashes in ``exclude`` (the named
    seeds) and duplicates are left out. Empty without a store."""
    if store is None:
        return ()
    nfe = space.n_steps + (1 if space.final_denoise else 0)
    rows: dict[int, list[tuple[float, str]]] = {}  # nfe -> [(mse_ref, schedule json)]
    for row in store.iter_evaluations(model_fp=model_fp):
        if not row["eval_set"].startswith(eval_set + "/"):  # the stored key adds the reference's version
            continue
        metrics, text = row["metrics"], row.get("schedule")
        value, other = metrics.get("mse_ref"), metrics.get("nfe")
        if text is None or metrics.get("diverged") or not all(isinstance(x, (int, float)) for x in (value, other)):
            continue
        if math.isfinite(value) and other != nfe and abs(other - nfe) <= NEIGHBOURS:
            rows.setdefault(int(other), []).append((float(value), text))
    out: list[Schedule] = []
    seen = set(exclude)
    for other in sorted(rows, key=lambda n: (abs(n - nfe), n)):
        for _, text in sorted(rows[other], key=lambda r: r[0]):  # the best plain one of this NFE
            try:
                source = loads(text)
            except Exception:  # a row this version cannot read is no start
                continue
            if _plain(source, guidance):
                moved = regrid(source, space, noise)
                if moved is not None and moved.hash() not in seen and space.contains(moved):
                    seen.add(moved.hash())
                    out.append(moved)
                break
        if len(out) == MOST:
            break
    return tuple(out)
