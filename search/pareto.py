"""Pareto fronts of multi-objective searches: dominance, the front, NSGA-II's non-dominated sorting and crowding.

Every function takes points as mappings ``{objective name: value}`` and the objective names to compare on.
Objectives are minimised, except the few metrics where higher is better (evaluate/ids.py's ``MAXIMIZED``,
e.g. ``class_acc``), which are compared negated; pass ``directions`` to override. A non-finite value (a
diverged schedule's inf or NaN) is worse than any finite one, so a diverged point never dominates a finite one.

Example:
    >>> pts = [{"mse_ref": 0.1, "nfe": 8}, {"mse_ref": 0.3, "nfe": 4}, {"mse_ref": 0.2, "nfe": 8}]
    >>> pareto_front(pts, ["mse_ref", "nfe"])
    [0, 1]
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from autotune.evaluate.ids import direction  # one place for which metrics rise

DIRECTIONS = ("minimize", "maximize")


def _keys(points: Sequence[Mapping[str, float]], objectives: Sequence[str],
          directions: Sequence[str] | None) -> list[tuple[float, ...]]:
    """Each point as a tuple to minimise (maximised objectives negated, non-finite values as +inf)."""
    dirs = list(directions) if directions is not None else [direction(o) for o in objectives]
    if len(dirs) != len(objectives) or any(d not in DIRECTIONS for d in dirs):
        raise ValueError(f"directions must be one of {DIRECTIONS} per objective, got {dirs!r}")
    out = []
    for p in points:
        row = []
        for o, d in zip(objectives, dirs):
            v = float(p[o])
            row.append(math.inf if not math.isfinite(v) else (-v if d == "maximize" else v))
        out.append(tuple(row))
    return out


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether minimisation key ``a`` Pareto-dominates ``b`` (no worse anywhere, better somewhere)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Mapping[str, float]], objectives: Sequence[str],
                 directions: Sequence[str] | None = None) -> list[int]:
    """Indices (ascending) of the non-dominated points. Duplicates of a front point are all on the front."""
    keys = _keys(points, objectives, directions)
    return [i for i, k in enumerate(keys) if not any(dominates(o, k) for o in keys)]


def nondominated_sort(points: Sequence[Mapping[str, float]], objectives: Sequence[str],
                      directions: Sequence[str] | None = None) -> list[list[int]]:
    """NSGA-II's fronts (Deb et al., 2002): front 0 is the Pareto front, front 1 the front of the rest, ..."""
    keys = _keys(points, objectives, directions)
    n = len(keys)
    dominated_by = [[j for j in range(n) if dominates(keys[i], keys[j])] for i in range(n)]
    count = [sum(dominates(keys[j], keys[i]) for j in range(n)) for i in range(n)]
    fronts: list[list[int]] = []
    current = [i for i in range(n) if count[i] == 0]
    while current:
        fronts.append(current)
        nxt = []
        for i in current:
            for j in dominated_by[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        current = sorted(nxt)
    return fronts


def crowding_distance(points: Sequence[Mapping[str, float]], objectives: Sequence[str],
                      directions: Sequence[str] | None = None) -> list[float]:
    """NSGA-II's crowding distance of each point within ``points`` (one front): inf at each objective's ends."""
    keys = _keys(points, objectives, directions)
    n = len(keys)
    dist = [0.0] * n
    if n <= 2:
        return [math.inf] * n
    for m in range(len(objectives)):
        order = sorted(range(n), key=lambda i: keys[i][m])
        lo, hi = keys[order[0]][m], keys[order[-1]][m]
        dist[order[0]] = dist[order[-1]] = math.inf
        span = hi - lo
        if not math.isfinite(span) or span <= 0:
            continue
        for a, i, b in zip(order, order[1:], order[2:]):
            dist[i] += (keys[b][m] - keys[a][m]) / span
    return dist
