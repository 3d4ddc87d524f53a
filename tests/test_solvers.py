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


# --- heun: EDM's two-call step ---------------------------------------------------------------------------------


def _diffusers_heun(model, noise: torch.Tensor, n_steps: int, exact_sigmas: bool) -> torch.Tensor:
    """HeunDiscreteScheduler's loop; ``exact_sigmas`` replaces its float32 sigma table (from a float32 cumprod of
    the betas) by the same sigmas computed in float64 from the same betas, to compare the algorithms alone."""
    import diffusers

    from peers import SOLVER_PEERS

    cls_name, kwargs = SOLVER_PEERS["heun"]
    sched = getattr(diffusers, cls_name).from_config(model.scheduler_config, **kwargs)
    sched.set_timesteps(n_steps)
    # its init_noise_sigma on trailing spacing is sigma_max (k-diffusion's VE convention), not the sqrt(sigma_max^2
    # + 1) of the VP prior x_T ~ N(0, 1) every other peer and our executor start from (2e-5 apart at sigma_max 157):
    # both start from the same state here
    if exact_sigmas:
        t = (sched.timesteps.double() + 1) / model.noise.num_train_timesteps
        ve = model.noise.sigma(t) / torch.exp(model.noise.log_alpha(t))
        sched.sigmas = torch.cat([ve, torch.zeros(1, dtype=torch.float64)])
    x = noise * (sched.sigmas[0].double() ** 2 + 1) ** 0.5
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model.unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_heun_equals_diffusers_heun(pipeline_dirs, prediction):
    """HeunDiscreteScheduler(timestep_spacing="trailing") at n steps makes 2n - 1 calls: the named heun at that NFE.
    From the same initial state: in float64 with diffusers' sigma table computed in float64 they are the same
    algorithm (<= 1e-9), and with its own float32 table (sigmas ~1e-7 relative apart) within TOL."""
    model = load_pipeline_dir(pipeline_dirs[prediction], dtype=torch.float64)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for nfe in (5, 9):
        ours = sample(model, build("heun", model.noise, nfe), noise)
        assert ours.nfe == nfe
        exact = _diffusers_heun(model, noise, (nfe + 1) // 2, exact_sigmas=True)
        assert (ours.sample - exact).abs().max().item() <= 1e-9
        table = _diffusers_heun(model, noise, (nfe + 1) // 2, exact_sigmas=False)
        assert (ours.sample - table).abs().max().item() <= TOL


def test_heun_is_second_order(gmm_problem):
    slope, errs = global_order(gmm_problem, lambda k, t: Step(t, order=2, solver="heun"))
    assert 1.7 < slope < 2.5, f"heun: error ~ NFE^-{slope:.2f} ({errs})"
    assert Schedule(1.0, (Step(0.5, order=2, solver="heun"), Step(0.0, solver="heun"))).nfe == 3


def test_heun_refuses_an_even_nfe_and_a_second_order_step_onto_the_data():
    with pytest.raises(ScheduleError, match="odd"):
        build("heun", VPLinear(), 4)
    with pytest.raises(ScheduleError, match="first order"):
        Schedule(1.0, (Step(0.0, order=2, solver="heun"),))


# --- dpm-single: DPM-Solver++ 2S on the grid -------------------------------------------------------------------
# its diffusers peer (DPMSolverSinglestepScheduler) is in DIFFUSERS_PEERS: tests/test_peers.py runs it through
# `autotune baseline` + `autotune sample` with every other same-NFE peer


def test_singlestep_is_second_order(gmm_problem):
    """Orders 1, 2, 1, 2, ...: each order-2 step restarts from the state before the order-1 step."""
    slope, errs = global_order(gmm_problem, lambda k, t: Step(t, order=1 if k % 2 == 0 else 2, solver="dpm-single"))
    assert 1.7 < slope < 2.5, f"dpm-single: error ~ NFE^-{slope:.2f} ({errs})"


def test_singlestep_reads_the_older_state():
    """Changing the step before an order-2 singlestep step changes only where its intermediate call is made: the
    update itself starts from the state before that step (with a zero model, exactly the DDIM map from there)."""
    from autotune.sampling.denoiser import TorchDenoiser

    ns = VPLinear()
    model = TorchDenoiser(lambda x, t: torch.zeros_like(x), ns, "sample")
    x = torch.randn(3, 2, dtype=torch.float64)
    two = sample(model, Schedule(1.0, (Step(0.6, solver="dpm-single"), Step(0.3, order=2, solver="dpm-single"))), x)
    one = sample(model, Schedule(1.0, (Step(0.3, solver="dpm"),)), x)
    assert two.nfe == 2 and torch.allclose(two.sample, one.sample, rtol=1e-12, atol=0)
