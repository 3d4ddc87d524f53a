"""The solvers that joined through the registry (space/solvers.py): each one module under sampling/solvers/.

Per solver: its named schedule equals diffusers' scheduler where diffusers has one (max abs <= 1e-4, fp32), and its
measured convergence order on an exact model. Orders are minus the least-squares slope of log(error) against
log(steps): the global error against the exact probability-flow ODE solution of gmm2d (float64) for the ODE
solvers; for the SDE solver the weak error, the variance of the samples against the exact marginal variance,
computed exactly on 1-D Gaussian data (every update is linear, so a sample is a * x_T + sum_i c_i z_i and its
variance is a^2 + sum_i c_i^2, read off runs with unit inputs).
"""

from __future__ import annotations

import math

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


# --- dpm-sde: DPM-Solver++ 2M SDE ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sde_equals_diffusers_with_the_same_generator(pipeline_dirs, prediction):
    """DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") draws its noise in step() on the pipeline's
    generator; the executor draws on the same generator in the same order."""
    model = load_pipeline_dir(pipeline_dirs[prediction])
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for nfe in (5, 10):
        schedule = build("dpmsolver++2m-sde", model.noise, nfe)
        ours = sample(model, schedule, noise, generator=torch.Generator().manual_seed(7))
        ref = run_peer("dpmsolver++2m-sde", model.unet, model.scheduler_config, noise, nfe,
                       generator=torch.Generator().manual_seed(7))
        assert schedule.stochastic and ours.nfe == nfe
        assert (ours.sample - ref).abs().max().item() <= TOL
        other = sample(model, schedule, noise, generator=torch.Generator().manual_seed(8)).sample
        assert (other - ref).abs().max().item() > 1e-2  # the draws matter: a different generator, other samples


def test_sde_executor_takes_its_draws_as_an_input():
    """The draws can be given (as an engine takes them): the same draws give the same samples; a wrong count is
    one error naming it."""
    ns = VPLinear()
    from autotune.sampling.denoiser import TorchDenoiser

    model = TorchDenoiser(lambda x, t: 0.3 * x, ns, "epsilon")
    schedule = build("dpmsolver++2m-sde", ns, 4)
    x = torch.randn(2, 3)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([torch.randn(2, 3, generator=g) for _ in range(4)], dim=1)  # (batch, draws, ...)
    a = sample(model, schedule, x, generator=torch.Generator().manual_seed(0)).sample
    b = sample(model, schedule, x, step_noise=draws).sample
    assert torch.equal(a, b)
    with pytest.raises(SamplingError, match="draws noise 4 times"):
        sample(model, schedule, x, step_noise=draws[:, :3])


class GaussianData:
    """The exact denoiser of 1-D data N(0, std^2) on VPLinear: eps(x, t) = sigma x / (alpha^2 std^2 + sigma^2)."""

    units: tuple[str, ...] = ()
    parameterization = "epsilon"

    def __init__(self, std: float) -> None:
        self.noise, self.std = VPLinear(), std

    def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None):
        alpha, sigma = torch.exp(self.noise.log_alpha(t)), self.noise.sigma(t)
        return sigma * x / (alpha**2 * self.std**2 + sigma**2)

    def fingerprint(self) -> str:
        return f"gaussian-{self.std}"


def _sde_variance(model: GaussianData, schedule: Schedule) -> float:
    """The exact variance of the samples: a^2 + sum_i c_i^2 (see the module docstring). The sampler is linear in
    the noise and the draws, so a and every c_i come out of one batch: row 0 starts at 1 with no draws, row i + 1
    starts at 0 with draw i set to 1."""
    n = len(schedule.steps)
    start = torch.zeros(n + 1, 1, dtype=torch.float64)
    start[0] = 1.0
    draws = torch.cat([torch.zeros(1, n, 1, dtype=torch.float64), torch.eye(n, dtype=torch.float64)[:, :, None]])
    responses = sample(model, schedule, start, step_noise=draws).sample.reshape(-1)
    return float((responses**2).sum())


@pytest.mark.parametrize("order,band", [(1, (0.8, 1.3)), (2, (1.7, 2.5))])
def test_sde_weak_order(order, band):
    model = GaussianData(0.5)
    t_min = torch.tensor(model.noise.t_min, dtype=torch.float64)
    exact = float(torch.exp(2 * model.noise.log_alpha(t_min)) * model.std**2 + model.noise.sigma(t_min) ** 2)
    ns_ = (40, 80, 160, 320)
    errs = []
    for n in ns_:
        times = lambda_grid(model.noise, n)
        steps = tuple(Step(t, order=min(order, k + 1), solver="dpm-sde") for k, t in enumerate(times[1:]))
        errs.append(abs(_sde_variance(model, Schedule(times[0], steps)) - exact))
    slope = -float(np.polyfit(np.log(ns_), np.log(errs), 1)[0])
    assert band[0] < slope < band[1], f"dpm-sde order {order}: weak error ~ n^-{slope:.2f} ({errs})"


def test_sde_schedule_replays_in_a_pipeline_with_its_generator(pipeline_dirs):
    """DDPMPipeline draws the initial noise on its generator, then hands the generator to every step(): the
    AutotuneScheduler draws the SDE's noise there, as the executor does continuing on the same generator."""
    from diffusers import DDPMPipeline

    from autotune.diffusers_scheduler import AutotuneScheduler
    from peers import record_prev_samples

    model = load_pipeline_dir(pipeline_dirs["epsilon"])
    schedule = build("dpmsolver++2m-sde", model.noise, 5)
    pipe = DDPMPipeline.from_pretrained(str(pipeline_dirs["epsilon"]))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = AutotuneScheduler.from_schedule(schedule, pipe.scheduler.config)
    finals = record_prev_samples(pipe.scheduler)
    with torch.no_grad():
        pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=5, output_type="pt")
    g = torch.Generator().manual_seed(4)
    noise = torch.randn((2, 3, 8, 8), generator=g)
    ours = sample(model, schedule, noise, generator=g).sample
    assert len(finals) == 5 and (finals[-1] - ours).abs().max().item() <= TOL


def test_sde_engine_takes_its_draws_as_an_input(pipeline_dirs, tmp_path):
    """The ONNX engine of a stochastic schedule has a ``step_noise`` input (batch, draws, ...): given the same
    draws it equals the executor (the build's own parity run checks 4 noises, this one 3 at another batch)."""
    pytest.importorskip("onnxruntime")
    from autotune.compile import build_engine, load_engine
    from autotune.compile.engine import engine_io

    model = load_pipeline_dir(pipeline_dirs["epsilon"])
    schedule = build("dpmsolver++2m-sde", model.noise, 5)
    inputs, _ = engine_io(model, schedule)
    assert [(s.name, s.shape[1:]) for s in inputs][-1] == ("step_noise", (5, 3, 8, 8))
    manifest = build_engine(model, schedule, tmp_path / "engine", "onnxruntime")
    assert manifest.parity["engine_vs_executor_max_abs"] <= 1e-3
    engine = load_engine(tmp_path / "engine", model)
    g = torch.Generator().manual_seed(5)
    noise, draws = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 5, 3, 8, 8, generator=g)
    out = engine(noise=noise.numpy(), step_noise=draws.numpy())
    ref = sample(model, schedule, noise, step_noise=draws).sample
    assert np.abs(out - ref.numpy()).max() <= 1e-3


# --- afs: USF's analytic first step ----------------------------------------------------------------------------


def test_afs_saves_the_first_call_and_converges(gmm_problem):
    """The analytic estimate replaces one call; the error it makes is one DDIM step's worth of alpha_T E[x0 | x_T]
    (alpha_T = 6.6e-3 on VPLinear), so the run still converges at the order of the solver after it on this range
    (asymptotically first order, with that small constant)."""
    assert Schedule(1.0, (Step(0.5, solver="afs"), Step(0.0))).nfe == 1
    slope, errs = global_order(gmm_problem, lambda k, t: Step(t, order=1 if k < 2 else 2,
                                                             solver="afs" if k == 0 else "dpm"))
    assert 1.7 < slope < 2.5, f"afs + dpm 2M: error ~ NFE^-{slope:.2f} ({errs})"


def test_afs_named_schedule_and_rules():
    ns = VPLinear()
    s = build("dpmsolver++2m-afs", ns, 5)
    assert s.nfe == 5 and len(s.steps) == 6 and s.steps[0].solver == "afs"
    with pytest.raises(ScheduleError, match="first step"):
        Schedule(1.0, (Step(0.5), Step(0.0, solver="afs")))


class ShiftedGaussian:
    """The exact denoiser of data N(mu, std^2) per channel on VPLinear: eps = sigma (x - alpha mu) /
    (alpha^2 std^2 + sigma^2); its exact ODE keeps z = (x_t - alpha_t mu) / sqrt(alpha_t^2 std^2 + sigma_t^2)."""

    units: tuple[str, ...] = ()
    parameterization = "epsilon"

    def __init__(self, mu: float, std: float) -> None:
        self.noise, self.mu, self.std = VPLinear(), mu, std

    def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None):
        alpha, sigma = torch.exp(self.noise.log_alpha(t)), self.noise.sigma(t)
        return sigma * (x - alpha * self.mu) / (alpha**2 * self.std**2 + sigma**2)

    def fingerprint(self) -> str:
        return f"shifted-gaussian-{self.mu}-{self.std}"

    def exact_at(self, x: torch.Tensor, t: float, to: float) -> torch.Tensor:
        """The exact ODE solution at time ``to`` from state ``x`` at ``t``: alpha mu + scale * z, z fixed."""
        def coefficients(time: float):
            time = torch.tensor(time, dtype=torch.float64)
            alpha = torch.exp(self.noise.log_alpha(time))
            return alpha, torch.sqrt(alpha**2 * self.std**2 + self.noise.sigma(time) ** 2)

        (a, s), (a_to, s_to) = coefficients(t), coefficients(to)
        return a_to * self.mu + s_to * (x - a * self.mu) / s


def test_afs_takes_the_data_mean_as_its_estimate():
    """With ``data_mean`` the analytic step's x0 is that mean per channel (dimension 1) and eps = (x - alpha_T x0)
    / sigma_T: one step lands on alpha_1 x0 + sigma_1 eps exactly; a mean of the wrong length is refused by name."""
    ns = VPLinear()
    mean = (0.5, -1.0, 2.0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    schedule = Schedule(1.0, (Step(0.4, solver="afs", data_mean=mean),))
    assert schedule.nfe == 0
    out = sample(ShiftedGaussian(0.0, 1.0), schedule, x).sample
    t = torch.tensor([1.0, 0.4], dtype=torch.float64)
    alpha, sigma = torch.exp(ns.log_alpha(t)), ns.sigma(t)
    x0 = torch.tensor(mean, dtype=torch.float64).reshape(1, 3, 1, 1)
    expected = alpha[1] * x0 + sigma[1] * (x - alpha[0] * x0) / sigma[0]
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    zero = sample(ShiftedGaussian(0.0, 1.0), Schedule(1.0, (Step(0.4, solver="afs"),)), x).sample
    assert torch.allclose(zero, sigma[1] / sigma[0] * x, rtol=0, atol=1e-12)  # USF's x0 = 0
    with pytest.raises(ScheduleError, match=r"steps\[0\]\.data_mean.*3 values.*4 channels"):
        sample(ShiftedGaussian(0.0, 1.0), schedule, torch.randn(2, 4, 4, 4, dtype=torch.float64))


def test_afs_with_the_data_mean_has_a_far_smaller_local_error_on_non_centred_data():
    """On data N(3, 0.5^2) the estimate x0 = 0 is far from E[x0 | x_T] (about 3): the analytic step to t = 0.8 with
    the mean lands over 20x closer to the exact ODE state there than with 0 (with 0 it is off by about alpha(0.8) *
    3). Globally it hardly shows here: afs + DPM-Solver++ 2M, 5 calls, ends at 4.05e-2 with either (measured; the
    exact denoiser's later calls pull the state back), which is why the job scores both rather than assume one."""
    model = ShiftedGaussian(3.0, 0.5)
    x = torch.randn(256, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = model.exact_at(x, 1.0, 0.8)
    local = {mean: float(((sample(model, Schedule(1.0, (Step(0.8, solver="afs", data_mean=mean),)), x).sample
                           - exact) ** 2).mean()) for mean in ((), (3.0,))}
    assert local[(3.0,)] * 20 < local[()], local


def test_a_data_mean_belongs_to_an_analytic_step_and_is_kept_by_the_file():
    from autotune.space.fileformat import dumps, loads

    with pytest.raises(ScheduleError, match="data_mean.*analytic first step"):
        Schedule(1.0, (Step(0.5, data_mean=(0.1,)), Step(0.0)))
    with pytest.raises(ScheduleError, match="data_mean.*finite"):
        Schedule(1.0, (Step(0.5, solver="afs", data_mean=(float("nan"),)), Step(0.0)))
    plain = build("dpmsolver++2m-afs", VPLinear(), 5)
    assert "data_mean" not in dumps(plain)  # files and hashes without a mean stay as they were
    with_mean = plain.with_steps((Step(plain.steps[0].t, solver="afs", data_mean=[-0.25, 1]),) + plain.steps[1:])
    assert with_mean.steps[0].data_mean == (-0.25, 1.0) and with_mean.hash() != plain.hash()
    again = loads(dumps(with_mean))
    assert again == with_mean and again.hash() == with_mean.hash()
    with pytest.raises(ScheduleError, match=r"data_mean\[0\]"):
        loads(dumps(with_mean).replace('"data_mean": [', '"data_mean": ["a", '))


def test_afs_with_a_data_mean_compiles_with_parity(pipeline_dirs, tmp_path):
    """The mean is a constant of the engine's graph: the ONNX engine equals the executor."""
    pytest.importorskip("onnxruntime")
    from autotune.compile import build_engine
    from autotune.sampling.named import with_analytic_first

    model = load_pipeline_dir(pipeline_dirs["epsilon"])
    schedule = with_analytic_first("unipc-bh2-o2", model.noise, 4, data_mean=(0.3, -0.2, 0.1))
    assert schedule.name == "unipc-bh2-o2+afs-mean" and schedule.nfe == 4
    manifest = build_engine(model, schedule, tmp_path / "engine", "onnxruntime")
    assert manifest.parity["engine_vs_executor_max_abs"] <= 1e-3


def test_a_stochastic_schedule_is_scored_by_a_distribution_metric(gmm):
    """The evaluator says which figure judges a schedule: mse_ref for an ODE schedule, the sliced Wasserstein
    distance to the reference samples for an SDE one (no per-sample figure: a draw is not the ODE's solution);
    every schedule gets sliced_w, so both kinds compare on it. The SDE's draws are seeded from the set."""
    from autotune.evaluate.evaluator import Evaluator

    ev = Evaluator(gmm, "search", size=64)
    sde = ev.evaluate(build("dpmsolver++2m-sde", gmm.noise, 10))
    ode = ev.evaluate(build("dpmsolver++2m", gmm.noise, 10))
    assert sde["scored_by"] == "sliced_w" and np.isnan(sde["mse_ref"]) and 0 < sde["sliced_w"] < 1
    assert ode["scored_by"] == "mse_ref" and ode["mse_ref"] > 0 and 0 < ode["sliced_w"] < 1
    again = Evaluator(gmm, "search", size=64).evaluate(build("dpmsolver++2m-sde", gmm.noise, 10))
    assert again["sliced_w"] == sde["sliced_w"]


@pytest.mark.parametrize("steps, refused_at", [
    # DPM-Solver++ 2M: its order-2 step divides by the gap between the two earlier times (no solve to fail)
    ((Step(math.nextafter(1.0, 0.0), order=1), Step(0.5, order=2), Step(0.0, order=1)), 1),
    # UniP-1 steps; step 2's UniC-2 corrector reads times 1 to 3, and 2 and 3 are an ulp apart
    ((Step(0.7, solver="unip-bh2"), Step(0.6, solver="unip-bh2"),
      Step(math.nextafter(0.6, 0.0), solver="unip-bh2", corrector="bh2", corrector_order=2),
      Step(0.0, solver="unip-bh2")), 2),
])
def test_a_multistep_update_on_times_an_ulp_apart_is_refused_before_any_coefficient(steps, refused_at):
    """coefficients.py's NODES_APART: times equal in log-SNR up to rounding give a singular multistep update; the
    plan refuses it, naming the step, whatever LAPACK would have said. The same grid at order 1 is fine."""
    from autotune.sampling.coefficients import make_plan

    noise = VPLinear()
    s = Schedule(1.0, steps)
    with pytest.raises(ScheduleError, match=rf"steps\[{refused_at}\]\.t.*singular"):
        make_plan(s, noise)
    first_order = Schedule(1.0, tuple(Step(st.t, solver=st.solver) for st in steps))
    make_plan(first_order, noise)  # no multistep update: nothing to refuse
