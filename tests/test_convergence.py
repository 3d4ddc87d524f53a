"""Convergence orders of the solvers: local truncation order on smooth model outputs, and the empirical global
order on the exact gmm2d denoiser (float64) against the exact probability-flow ODE solution.

Global order: error(NFE) ~ C NFE^-p, so p is minus the slope of log(max error) against log(NFE). The grids are
uniform in lambda (every step ratio r = 1) or EDM's rho = 7 grid (smoothly varying ratios), from T to t_min,
so no step lands on the singular t = 0. NFE 57..226: below about 50 the sharp ring (std 0.1) is still
pre-asymptotic and every method looks lower-order than it is.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import autotune.models.analytic  # noqa: F401  (registers gmm2d)
from autotune.models.registry import load_model

from autotune.sampling.executor import sample
from autotune.sampling.named import build
from autotune.sampling.noise import VPLinear
from autotune.space.schedule import Schedule, Step

NFES = (57, 80, 113, 160, 226)
ORDER_BANDS = {1: (0.8, 1.3), 2: (1.7, 2.5), 3: (2.6, 3.6)}

# Known and kept on purpose: `dpm` order 3 is diffusers' (and the DPM-Solver reference code's) multistep
# third-order update, which our named `dpmsolver++3m` must reproduce exactly. It uses
# D2 = (D1_0 - D1_1)/(r0 + r1) ~ h^2 x0''/2 with the phi_3 weight that needs D2 ~ h^2 x0'': the x0'' term is
# halved, so its local error is O(h^3) and its global order 2, not 3. The space's true third-order
# multistep predictor is UniP-3 (`unip-bh1` / `unip-bh2` order 3), tested at order 3 below.
DPM3_NOTE = "dpm order 3 = diffusers' 3M form: x0'' term halved (see above)"


# --- local truncation order on a smooth, state-independent model output ---------------------------------------


class SmoothOutput:
    """A Denoiser whose output f(lambda) = sin(1.3 lambda + 0.4) ignores x: each step's exact result is a quadrature."""

    units: tuple[str, ...] = ()

    def __init__(self, parameterization: str) -> None:
        self.noise = VPLinear()
        self.parameterization = parameterization

    def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None):
        return torch.sin(1.3 * self.noise.lambda_(t) + 0.4) * torch.ones_like(x)

    def fingerprint(self) -> str:
        return "smooth-output"


_GL_X, _GL_W = np.polynomial.legendre.leggauss(40)


def _exact_step(x_s: float, lam_s: float, lam_t: float, prediction: str, ns: VPLinear) -> float:
    """Exact exponential-integrator step with f(lambda) = sin(1.3 lambda + 0.4), by 40-point Gauss-Legendre."""
    u = 0.5 * (lam_t - lam_s) * _GL_X + 0.5 * (lam_s + lam_t)
    f = np.sin(1.3 * u + 0.4)
    lam = torch.tensor([lam_s, lam_t], dtype=torch.float64)
    t = ns.t_of_lambda(lam)
    a, s = torch.exp(ns.log_alpha(t)).tolist(), ns.sigma(t).tolist()
    if prediction == "data":  # x_t = sigma_t/sigma_s x_s + sigma_t int e^lam x0 dlam
        return s[1] / s[0] * x_s + s[1] * 0.5 * (lam_t - lam_s) * float(np.sum(_GL_W * np.exp(u) * f))
    # x_t = alpha_t/alpha_s x_s - alpha_t int e^-lam eps dlam
    return a[1] / a[0] * x_s - a[1] * 0.5 * (lam_t - lam_s) * float(np.sum(_GL_W * np.exp(-u) * f))


def _local_error(h: float, solver: str, prediction: str, order: int, corrector: str, corrector_order: int) -> float:
    """|x_4 - exact step from x_3| on a lambda grid with uneven steps (ratios != 1) scaled by h, x_3 at lambda = 0."""
    ns = VPLinear()
    nodes = np.concatenate([[0.0], np.cumsum([1.0, 1.3, 0.8, 1.15, 1.0])])
    lams = h * (nodes - nodes[3])
    times = [float(t) for t in ns.t_of_lambda(torch.tensor(lams, dtype=torch.float64))]
    n = len(times) - 1
    steps = []
    for k in range(n):
        c = corrector if k < n - 1 else "none"
        co = min(corrector_order, k + 1) if c != "none" else 0
        steps.append(Step(times[k + 1], order=min(order, k + 1), solver=solver, prediction=prediction,
                          corrector=c, corrector_order=co))
    model = SmoothOutput("sample" if prediction == "data" else "epsilon")
    states = sample(model, Schedule(times[0], tuple(steps)), torch.full((1, 1), 0.7, dtype=torch.float64),
                    keep_states=True).states
    lam = ns.lambda_(torch.tensor(times, dtype=torch.float64)).tolist()
    return abs(float(states[4]) - _exact_step(float(states[3]), lam[3], lam[4], prediction, ns))


def _local_order(**kw) -> float:
    hs = (0.1, 0.05, 0.025, 0.0125)
    errs = [_local_error(h, **kw) for h in hs]
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


PREDICTOR_CASES = [
    (solver, pred, p)
    for solver in ("dpm", "unip-bh1", "unip-bh2")
    for pred in ("data", "noise")
    for p in (1, 2, 3)
]


@pytest.mark.parametrize("solver,prediction,order", PREDICTOR_CASES)
def test_predictor_local_error_is_order_plus_one(solver, prediction, order):
    """A p-th order multistep step has local error O(h^(p+1)) (exponential multistep / UniP theory)."""
    slope = _local_order(solver=solver, prediction=prediction, order=order, corrector="none", corrector_order=0)
    if (solver, order) == ("dpm", 3):  # diffusers' 3M form: local order 3, not 4 (DPM3_NOTE)
        assert order - 0.3 < slope < order + 0.3, f"{DPM3_NOTE}: local error ~ h^{slope:.2f}"
        return
    assert slope > order + 1 - 0.3, f"{solver} {prediction} order {order}: local error ~ h^{slope:.2f}"


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unic_corrected_local_error_is_order_plus_two(variant, prediction, order):
    """UniC-p after UniP-p raises the local error to O(h^(p+2)) (UniPC, Zhao et al. 2023, Thm 3.1)."""
    slope = _local_order(solver=f"unip-{variant}", prediction=prediction, order=order, corrector=variant,
                         corrector_order=order)
    assert slope > order + 2 - 0.3, f"UniC-{order} {variant} {prediction}: local error ~ h^{slope:.2f}"


# --- global order on gmm2d ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problem():
    """gmm2d in float64, 64 fixed noises, and the exact ODE solution at t_min."""
    model = load_model("gmm2d", torch.float64)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, noise, model.exact_ode_solution(noise, t_end=model.noise.t_min)


def lambda_grid(ns, n: int, kind: str) -> list[float]:
    """n + 1 times from T to t_min, uniform in lambda ('lambda') or EDM's rho = 7 spacing of e^-lambda ('karras')."""
    lam0 = float(ns.lambda_(torch.tensor(ns.T, dtype=torch.float64)))
    lam1 = float(ns.lambda_(torch.tensor(ns.t_min, dtype=torch.float64)))
    if kind == "lambda":
        lam = torch.linspace(lam0, lam1, n + 1, dtype=torch.float64)
    else:
        rho = 7.0
        lam = -rho * torch.log(torch.linspace(math.exp(-lam0 / rho), math.exp(-lam1 / rho), n + 1, dtype=torch.float64))
    times = [float(t) for t in ns.t_of_lambda(lam)]
    times[0], times[-1] = ns.T, ns.t_min
    return times


def own(order: int, solver: str = "dpm", prediction: str = "data", corrector: str = "none"):
    """Schedule maker: warm-up orders min(k + 1, order), optional UniC of the same order on all but the last step."""

    def make(ns, n: int, kind: str) -> Schedule:
        times = lambda_grid(ns, n, kind)
        steps = []
        for k in range(n):
            o = min(order, k + 1)
            c = corrector if k < n - 1 else "none"
            steps.append(Step(times[k + 1], order=o, solver=solver, prediction=prediction, corrector=c,
                              corrector_order=o if c != "none" else 0))
        return Schedule(times[0], tuple(steps))

    return make


def named(name: str):
    """Schedule maker: a named schedule's per-step decisions (warm-up, lower-order final) moved onto our grid."""

    def make(ns, n: int, kind: str) -> Schedule:
        s = build(name, ns, n, final="sigma_min")
        times = lambda_grid(ns, n, kind)
        return s.with_steps([replace(st, t=times[k + 1]) for k, st in enumerate(s.steps)], t_start=times[0])

    return make


def global_order(problem, make, kind: str) -> tuple[float, list[float]]:
    """Minus the least-squares slope of log(max |x_N - x_exact|) against log(NFE)."""
    model, noise, ref = problem
    errs = [float((sample(model, make(model.noise, n, kind), noise).sample - ref).abs().max()) for n in NFES]
    return -float(np.polyfit(np.log(NFES), np.log(errs), 1)[0]), errs


GLOBAL_CASES = [
    # id, schedule maker, grid, theoretical global order (checked against ORDER_BANDS)
    ("ddim", named("ddim"), "lambda", 1),
    ("dpmsolver-1-noise", own(1, prediction="noise"), "lambda", 1),
    ("dpmsolver++2m", named("dpmsolver++2m"), "lambda", 2),
    ("dpmsolver++2m-karras", named("dpmsolver++2m"), "karras", 2),
    ("dpmsolver-2m-noise", own(2, prediction="noise"), "lambda", 2),
    ("unip-bh2-3", own(3, "unip-bh2"), "lambda", 3),
    ("unip-bh1-3-karras", own(3, "unip-bh1"), "karras", 3),
    ("unipc-bh2-2", own(2, "unip-bh2", corrector="bh2"), "lambda", 3),
    ("unipc-bh2-2-noise", own(2, "unip-bh2", "noise", "bh2"), "lambda", 3),
    ("unipc-bh2-2-karras", own(2, "unip-bh2", corrector="bh2"), "karras", 3),
    ("unipc-bh1-2", own(2, "unip-bh1", corrector="bh1"), "lambda", 3),
]


@pytest.mark.parametrize("make,kind,order", [c[1:] for c in GLOBAL_CASES], ids=[c[0] for c in GLOBAL_CASES])
def test_global_order(problem, make, kind, order):
    """Empirical global order within the band of the theoretical one (UniPC-p with UniC reaches p + 1)."""
    lo, hi = ORDER_BANDS[order]
    p, errs = global_order(problem, make, kind)
    assert lo <= p <= hi, f"order {p:.2f} outside [{lo}, {hi}]; max errors {errs}"


def test_named_unipc_bh2_o2_is_at_least_second_order(problem):
    """Named unipc-bh2-o2 ends with an uncorrected order-1 step (lower_order_final), so order >= 2 is promised."""
    p, errs = global_order(problem, named("unipc-bh2-o2"), "lambda")
    assert 1.7 <= p <= 3.6, f"order {p:.2f}; max errors {errs}"


@pytest.mark.parametrize("make", [named("dpmsolver++3m"), own(3, prediction="noise")], ids=["data", "noise"])
def test_dpmsolver_3m_global_order(problem, make):
    """diffusers' DPM-Solver(++) 3M form is globally second order (measured: 2.36 data, 2.27 noise, tending
    to 2), see DPM3_NOTE; a true third-order method would land in ORDER_BANDS[3] and fail here."""
    lo, hi = 1.8, 2.55
    p, errs = global_order(problem, make, "lambda")
    assert lo <= p <= hi, f"order {p:.2f} outside [{lo}, {hi}]; max errors {errs}"
