"""Cascade polynomial regression (CPR, DC-Solver Sec. 3.4): compensation ratios for unseen NFE and guidance.

Ratios fitted on a grid of configurations (number of steps N, guidance scale g) are regressed by one model:
the ratio of step k is a polynomial in the step position ``x = (k + 1) / N`` whose coefficients are
polynomials in the guidance, whose coefficients are in turn polynomials in N::

    ratio(k; N, g) = sum_i x^i * sum_j (g / g_scale)^j * sum_l C[i][j][l] * (N / n_scale)^l

As in the paper's code (step degree 3, guidance and NFE degree 2 in its Stable Diffusion file; guidance /
12, NFE / 50) all coefficients are fitted together by least squares over every (configuration, step)
sample — the model is linear in C, so the least-squares optimum is solved directly instead of by their
``curve_fit``; we scale by the grid's largest guidance and N. Steps before ``dc_order`` have ratio 1.
A degree larger than the grid can support (fewer distinct values than degree + 1) is lowered, and the
file records the degrees used.

File (``schema_version`` 1, strict reader)::

    {"schema_version": 1, "kind": "autotune.cpr", "model_fingerprint": "...", "solver": "unipc-bh2-o2",
     "dc_order": 2, "degrees": {"step": 3, "guidance": 2, "nfe": 2},
     "scales": {"guidance": 8.0, "nfe": 10.0}, "grid": {"nfe": [4, 6, 8, 10], "guidance": [1.0, 2.0]},
     "coefficients": [[[...], ...], ...], "fit": {...}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from autotune.errors import AutotuneError
from autotune.space.schedule import Schedule

SCHEMA_VERSION = 1
KIND = "autotune.cpr"
DEFAULT_DEGREES = (3, 2, 2)  # step position, guidance, NFE: the paper's
MAX_RATIO = 10.0  # fitted DC ratios sit near 1; a prediction outside (0, MAX_RATIO] is an extrapolation gone wild
_KEYS = {"schema_version", "kind", "model_fingerprint", "solver", "dc_order", "degrees", "scales", "grid",
         "coefficients", "fit"}


class CPRError(AutotuneError, ValueError):
    """A CPR file or a CPR prediction request is invalid; names the file or field."""


@dataclass(frozen=True)
class RatioSample:
    """Ratios fitted directly for one configuration: N steps (one ratio each) at a guidance (None: unguided)."""

    nfe: int
    guidance: float | None
    ratios: tuple[float, ...]


@dataclass(frozen=True)
class CPR:
    """A fitted cascade polynomial regression; ``predict(nfe, guidance)`` gives one ratio per step.

    Example:
        >>> samples = [RatioSample(n, g, tuple([1.0, 1.0] + [1.0 + 0.01 * g * (k + 1) / n for k in range(2, n)]))
        ...            for n in (4, 6, 8) for g in (1.0, 3.0, 5.0)]
        >>> cpr = fit_cpr(samples, "fp", "unipc-bh2-o2")
        >>> [round(r, 3) for r in cpr.predict(5, 2.0)]
        [1.0, 1.0, 1.012, 1.016, 1.02]
    """

    model_fingerprint: str
    solver: str
    dc_order: int
    degrees: tuple[int, int, int]  # (step position, guidance, NFE)
    scales: tuple[float, float]  # (guidance, NFE) divisors
    grid_nfe: tuple[int, ...]
    grid_guidance: tuple[float | None, ...]
    coefficients: np.ndarray  # (step + 1, guidance + 1, NFE + 1)
    fit: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def conditional(self) -> bool:
        return any(g is not None for g in self.grid_guidance)

    def _check_guidance(self, guidance: float | None) -> float:
        if self.conditional and guidance is None:
            raise CPRError("guidance: this CPR was fitted on guided configurations; give a guidance scale")
        if not self.conditional and guidance is not None:
            raise CPRError("guidance: this CPR was fitted without guidance; give none")
        return 0.0 if guidance is None else float(guidance)

    def _fitted_point(self, nfe: int, guidance: float | None) -> tuple[float, int]:
        """(guidance, NFE) clamped into the grid the CPR was fitted on: a polynomial is only trusted there
        (outside, the issue saw ratios from -168 to 19); ``outside_grid`` says when this moved a value."""
        g = self._check_guidance(guidance)
        if self.conditional:
            gs = [x for x in self.grid_guidance if x is not None]
            g = min(max(g, min(gs)), max(gs))
        return g, min(max(nfe, min(self.grid_nfe)), max(self.grid_nfe))

    def outside_grid(self, nfe: int, guidance: float | None = None) -> list[str]:
        """What ``predict(nfe, guidance)`` clamps into the fitted grid, one sentence each (empty: nothing)."""
        g, n = self._fitted_point(nfe, guidance)
        notes = []
        if n != nfe:
            notes.append(f"NFE {nfe} is outside the NFE grid {min(self.grid_nfe)}..{max(self.grid_nfe)} this CPR "
                         f"was fitted on; ratios predicted as at NFE {n}")
        if guidance is not None and g != guidance:
            gs = [x for x in self.grid_guidance if x is not None]
            notes.append(f"guidance {guidance:g} is outside the guidance grid {min(gs):g}..{max(gs):g} this CPR was "
                         f"fitted on; ratios predicted as at guidance {g:g}")
        return notes

    def predict(self, nfe: int, guidance: float | None = None) -> tuple[float, ...]:
        """One ratio per step of an N-step schedule (the first ``dc_order`` are 1); N and the guidance are
        clamped into the fitted grid (see ``outside_grid``).

        Raises:
            CPRError: a bad request, or a predicted ratio outside (0, MAX_RATIO] (a broken file).
        """
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
            raise CPRError(f"nfe: must be an integer >= 1, got {nfe!r}")
        if guidance is not None and not math.isfinite(guidance):
            raise CPRError(f"guidance: must be a finite number, got {guidance!r}")
        g, n = self._fitted_point(nfe, guidance)
        ratios = [1.0] * min(self.dc_order, nfe)
        with np.errstate(all="ignore"):  # an overflow shows as a non-finite ratio, refused below
            ratios += [float(features(((k + 1) / nfe, g, n), self.degrees, self.scales) @ self.coefficients.ravel())
                       for k in range(self.dc_order, nfe)]
        for k, r in enumerate(ratios):
            if not 0.0 < r <= MAX_RATIO:
                raise CPRError(f"ratio of step {k}: the CPR predicts {r:g} at NFE {nfe}, guidance {guidance}, "
                               f"outside (0, {MAX_RATIO:g}]: the CPR file does not fit this configuration")
        return tuple(ratios)

    def apply(self, schedule: Schedule) -> Schedule:
        """The schedule (its step count and guidance decide the configuration) with predicted ratios."""
        if schedule.dc_order != self.dc_order:
            raise CPRError(f"dc_order: the schedule has {schedule.dc_order}, this CPR was fitted for {self.dc_order}")
        ratios = self.predict(len(schedule.steps), schedule.guidance)
        return schedule.with_steps(replace(s, ratio=r) for s, r in zip(schedule.steps, ratios))

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.model_fingerprint:
            raise CPRError(f"model: this CPR was fitted on model {self.model_fingerprint[:12]}, "
                           f"not on {fingerprint[:12]}")


def grid_scales(grid_nfe: Sequence[int], grid_guidance: Sequence[float | None]) -> tuple[float, float]:
    """(guidance, NFE) divisors of a grid: its largest |guidance| (1 when unguided or all 0) and largest N."""
    g_max = max((abs(g) for g in grid_guidance if g is not None), default=0.0)
    return (float(g_max) if g_max > 0 else 1.0, float(max(grid_nfe)))


def features(point: tuple[float, float, int], degrees: Sequence[int], scales: Sequence[float]) -> np.ndarray:
    """Monomials x^i g^j n^l of one (step position, guidance, N) point, laid out like the coefficients."""
    x, g, n = point
    gs, ns = g / scales[0], n / scales[1]
    return np.array([x**i * gs**j * ns**l for i in range(degrees[0] + 1) for j in range(degrees[1] + 1)
                     for l in range(degrees[2] + 1)], dtype=np.float64)


def fit_cpr(samples: Iterable[RatioSample], model_fingerprint: str, solver: str, dc_order: int = 2,
            degrees: Sequence[int] = DEFAULT_DEGREES, fit: dict[str, Any] | None = None) -> CPR:
    """Least-squares CPR over every compensable step of every sample (see the module docstring)."""
    samples = list(samples)
    if not samples:
        raise CPRError("fit: no fitted configurations to regress")
    guided = {s.guidance is not None for s in samples}
    if len(guided) > 1:
        raise CPRError("fit: the configurations mix guided and unguided ones")
    if len(degrees) != 3 or any(not isinstance(d, int) or d < 0 for d in degrees):
        raise CPRError(f"degrees: expected three integers >= 0 (step, guidance, nfe), got {tuple(degrees)!r}")
    nfes = sorted({s.nfe for s in samples})
    gs = sorted({s.guidance for s in samples}, key=lambda g: -1.0 if g is None else g)
    rows, targets = [], []
    for s in samples:
        if len(s.ratios) != s.nfe:
            raise CPRError(f"fit: configuration N={s.nfe} has {len(s.ratios)} ratios")
        for k in range(dc_order, s.nfe):
            rows.append(((k + 1) / s.nfe, 0.0 if s.guidance is None else float(s.guidance), s.nfe))
            targets.append(float(s.ratios[k]))
    if not rows:
        raise CPRError(f"fit: no configuration has more than dc_order={dc_order} steps")
    steps_seen = len({round(r[0], 12) for r in rows})
    used = (min(degrees[0], steps_seen - 1), min(degrees[1], len(gs) - 1), min(degrees[2], len(nfes) - 1))
    scales = grid_scales(nfes, gs)
    design = np.stack([features(r, used, scales) for r in rows])
    y = np.array(targets)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)  # minimum-norm solution where the grid is thin
    residual = y - design @ coef
    info = {"samples": len(rows), "rms_residual": float(np.sqrt(np.mean(residual**2))),
            "requested_degrees": list(degrees), **(fit or {})}
    return CPR(model_fingerprint, solver, dc_order, used, scales, tuple(nfes), tuple(gs),
               coef.reshape(used[0] + 1, used[1] + 1, used[2] + 1), info)


# ---------------------------------------------------------------------------------------------- file format


def to_dict(cpr: CPR) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "model_fingerprint": cpr.model_fingerprint,
        "solver": cpr.solver,
        "dc_order": cpr.dc_order,
        "degrees": {"step": cpr.degrees[0], "guidance": cpr.degrees[1], "nfe": cpr.degrees[2]},
        "scales": {"guidance": cpr.scales[0], "nfe": cpr.scales[1]},
        "grid": {"nfe": list(cpr.grid_nfe), "guidance": list(cpr.grid_guidance)},
        "coefficients": cpr.coefficients.tolist(),
        "fit": cpr.fit,
    }


def dumps(cpr: CPR) -> str:
    return json.dumps(to_dict(cpr), indent=2, allow_nan=False) + "\n"


def save_cpr(cpr: CPR, path: str | Path) -> Path:
    """Write a CPR file atomically."""
    from autotune.space.fileformat import write_atomically

    return write_atomically(path, dumps(cpr))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def from_dict(doc: Any, source: str = "cpr") -> CPR:
    """Parse a CPR document; every problem raises CPRError naming the source and the field."""
    def bad(where: str, why: str) -> CPRError:
        return CPRError(f"{source}: {where}: {why}")

    if not isinstance(doc, dict):
        raise bad("document", "must be a JSON object")
    if doc.get("kind") != KIND:
        raise bad("kind", f"must be {KIND!r}, got {doc.get('kind')!r} (not a CPR file)")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise bad("schema_version", f"{doc.get('schema_version')!r} is not supported (this reader knows {SCHEMA_VERSION})")
    missing, unknown = _KEYS - set(doc), set(doc) - _KEYS
    if missing:
        raise bad(sorted(missing)[0], "missing")
    if unknown:
        raise bad(sorted(unknown)[0], "unknown field")
    if not isinstance(doc["model_fingerprint"], str) or not doc["model_fingerprint"]:
        raise bad("model_fingerprint", "must be a non-empty string")
    if not isinstance(doc["solver"], str):
        raise bad("solver", "must be a string")
    if not _int(doc["dc_order"], 1) or doc["dc_order"] > 3:
        raise bad("dc_order", f"must be an integer in 1..3, got {doc['dc_order']!r}")
    deg = doc["degrees"]
    if not isinstance(deg, dict) or set(deg) != {"step", "guidance", "nfe"} or not all(_int(v) for v in deg.values()):
        raise bad("degrees", "must be {step, guidance, nfe} integers >= 0")
    sc = doc["scales"]
    if not isinstance(sc, dict) or set(sc) != {"guidance", "nfe"} or not all(_number(v) and v > 0 for v in sc.values()):
        raise bad("scales", "must be {guidance, nfe} numbers > 0")
    grid = doc["grid"]
    if not isinstance(grid, dict) or set(grid) != {"nfe", "guidance"}:
        raise bad("grid", "must be {nfe, guidance}")
    if not isinstance(grid["nfe"], list) or not grid["nfe"] or not all(_int(n, 1) for n in grid["nfe"]):
        raise bad("grid.nfe", "must be a non-empty list of integers >= 1")
    gl = grid["guidance"]
    if not isinstance(gl, list) or not gl or not (all(g is None for g in gl) or all(_number(g) for g in gl)):
        raise bad("grid.guidance", "must be a non-empty list of numbers, or of nulls for an unguided model")
    shape = (deg["step"] + 1, deg["guidance"] + 1, deg["nfe"] + 1)
    try:
        coef = np.array(doc["coefficients"], dtype=np.float64)
    except (TypeError, ValueError):
        raise bad("coefficients", "must be a nested list of numbers") from None
    if coef.shape != shape:
        raise bad("coefficients", f"shape {coef.shape} does not match the degrees (expected {shape})")
    if not np.isfinite(coef).all():
        raise bad("coefficients", "must be finite")
    if not isinstance(doc["fit"], dict):
        raise bad("fit", "must be an object")
    expected = grid_scales(grid["nfe"], gl)
    if not all(math.isclose(sc[k], e, rel_tol=1e-9) for k, e in zip(("guidance", "nfe"), expected)):
        raise bad("scales", f"{sc} do not match the grid (expected guidance {expected[0]:g}, nfe {expected[1]:g}: "
                            "its largest values)")
    return CPR(doc["model_fingerprint"], doc["solver"], doc["dc_order"], (deg["step"], deg["guidance"], deg["nfe"]),
               (float(sc["guidance"]), float(sc["nfe"])), tuple(grid["nfe"]),
               tuple(None if g is None else float(g) for g in gl), coef, doc["fit"])


def loads(text: str, source: str = "cpr") -> CPR:
    from autotune.space.fileformat import parse_json

    return from_dict(parse_json(text, CPRError, source), source)


def load_cpr(path: str | Path) -> CPR:
    """Read a CPR file strictly."""
    from autotune.space.fileformat import read_json_file

    return from_dict(read_json_file(path, CPRError, "CPR file"), str(path))


def with_fit_info(cpr: CPR, **info: Any) -> CPR:
    return replace(cpr, fit={**cpr.fit, **info})
