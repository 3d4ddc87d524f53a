"""The solvers that joined through the registry (space/solvers.py): each one module under sampling/solvers/.

Per solver: its named schedule equals diffusers' scheduler where diffusers has one (max abs <= 1e-4, fp32), and its
measured convergence order on an exact model. Orders are minus the least-squares slope of log(error) against
log(steps): the global error against the exact probability-flow ODE solution of gmm2d (float64) for the ODE
solvers; for the SDE solver the weak error, the variance of the samples against the exact marginal variance,
computed exactly on 1-D Gaussian data (every update is linear, so a sample is a * x_T + sum_i c_i z_i and its
variance is a^2 + sum_i c_i^2, read off runs with unit inputs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autotune.models.analytic  # noqa: F401  (registers gmm2d)
from autotune.errors import SamplingError, ScheduleError
from autotune.models.diffusers_dir import load_pipeline_dir
from autotune.models.registry import load_model
from autotune.sampling.executor import sample
from autotune.sampling.named import build
from autotune.sampling.noise import VPLinear
from autotune.sampling.solvers import implementation
from autotune.space.schedule import Schedule, Step
from autotune.space.solvers import REGISTRY
from peers import run_peer

TOL = 1e-4
NFES = (57, 80, 113, 160, 226)


def test_every_registered_solver_has_its_module():
    for name, info in REGISTRY.items():
        module = implementation(name)
        assert callable(module.advance), name
        assert info.calls(1) in (0, 1) and all(info.calls(p) >= 1 for p in range(2, info.max_order + 1)), name


@pytest.fixture(scope="module")
def gmm_problem():
    model = load_model("gmm2d", torch.float64)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, noise, model.exact_ode_solution(noise, t_end=model.noise.t_min)


def lambda_grid(ns, n: int) -> list[float]:
    """n + 1 times from T to t_min, uniform in lambda (no step onto the singular t = 0)."""
    ends = torch.tensor([ns.T, ns.t_min], dtype=torch.float64)
    lam0, lam1 = ns.lambda_(ends).tolist()
    times = [float(t) for t in ns.t_of_lambda(torch.linspace(lam0, lam1, n + 1, dtype=torch.float64))]
    times[0], times[-1] = ns.T, ns.t_min
    return times


def global_order(problem, steps_for) -> tuple[float, list[float]]:
    model, noise, ref = problem
    errs = []
    for n in NFES:
        times = lambda_grid(model.noise, n)
        schedule = Schedule(times[0], tuple(steps_for(k, t) for k, t in enumerate(times[1:])))
        errs.append(float((sample(model, schedule, noise).sample - ref).abs().max()))
    return -float(np.polyfit(np.log(NFES), np.log(errs), 1)[0]), errs
