"""The analytic Gaussian-mixture models: exact denoiser, exact densities, exact ODE solutions, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import autotune.models.analytic as analytic  # registers gmm2d, gmm64, gmm2d-flow
from autotune.errors import ModelError, SamplingError
from autotune.models.analytic import GaussianMixtureDenoiser, gaussian_ode_solution
from autotune.models.registry import builtin_names, describe, load_model
from autotune.sampling.denoiser import Denoiser, to_data_and_noise
from autotune.sampling.executor import sample
from autotune.sampling.noise import EDM, FlowMatching, VPLinear, alpha
from autotune.space.schedule import Schedule, Step

F64 = torch.float64


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


def _posterior(model, x, t):
    """(x0, eps) recovered from the model's raw output, as the executor sees them."""
    a, s = alpha(model.noise, _t(t)), model.noise.sigma(_t(t))
    return to_data_and_noise(model(x, _t(t)).to(F64), x, a, s, model.parameterization)


# --- the exact denoiser -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.05, 0.2, 0.5, 1.0])
def test_denoiser_matches_brute_force_quadrature(t):
    """E[x0|x_t] on gmm2d equals the ratio of two 2-D integrals over x0 on a fine grid (to 1e-9)."""
    model = analytic.gmm2d(F64)
    a, s = float(alpha(model.noise, _t(t))), float(model.noise.sigma(_t(t)))
    g = torch.linspace(-1.8, 1.8, 361, dtype=F64)  # spacing 0.01, 8x below the narrowest posterior width
    x0 = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mu, sd, w = model.means, model.stds[:, 0], model.weights
    prior = (w / (2 * math.pi * sd**2) * torch.exp(-((x0[:, None, :] - mu) ** 2).sum(-1) / (2 * sd**2))).sum(-1)
    queries = torch.tensor([[0.0, 0.0], [a * 1.0, 0.0], [0.3 * a, 0.5 * a], [a * 0.7, -a * 0.7]], dtype=F64)
    queries = queries + s * torch.tensor([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.2, 0.2]], dtype=F64)
    like = torch.exp(-((queries[:, None, :] - a * x0) ** 2).sum(-1) / (2 * s * s))  # (Q, grid)
    weight = like * prior
    expected = weight @ x0 / weight.sum(-1, keepdim=True)
    got, _ = _posterior(model, queries, t)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_denoiser_passes_monte_carlo_orthogonality_on_gmm64():
    """x0 - E[x0|x_t] has mean zero and is uncorrelated with x_t (checked within 5 standard errors)."""
    model = analytic.gmm64(F64)
    gen = torch.Generator().manual_seed(1)
    n, t = 8000, 0.4
    x0 = model.sample_data(n, gen)
    a, s = alpha(model.noise, _t(t)), model.noise.sigma(_t(t))
    xt = a * x0 + s * torch.randn(x0.shape, generator=gen, dtype=F64)
    resid = x0 - _posterior(model, xt, t)[0]
    for stat in (resid, resid * (xt - xt.mean(0))):
        z = stat.mean(0) / (stat.std(0) / math.sqrt(n))
        assert z.abs().max() < 5.0, f"max |z| = {z.abs().max():.2f}"
    # and it beats a slightly wrong denoiser (the responsibility temperature off by 10 %)
    wrong = GaussianMixtureDenoiser(model.weights, model.means, model.stds * 1.1, model.noise, dtype=F64)
    assert resid.pow(2).mean() < (x0 - _posterior(wrong, xt, t)[0]).pow(2).mean()


def test_single_gaussian_denoiser_is_the_shrinkage_formula():
    """Data N(0, C^2 I): E[x0|x_t] = alpha C^2 / (alpha^2 C^2 + sigma^2) x (MISSION's oracle, VE: C^2/(C^2+s^2) x)."""
    c = 0.7
    for ns in (EDM(), VPLinear(), FlowMatching()):
        model = GaussianMixtureDenoiser([1.0], [[0.0, 0.0, 0.0]], c, ns, dtype=F64)
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
        for t in (0.3 * ns.T, 0.8 * ns.T):
            a, s = alpha(ns, _t(t)), ns.sigma(_t(t))
            torch.testing.assert_close(_posterior(model, x, t)[0], a * c * c / (a * a * c * c + s * s) * x)


@pytest.mark.parametrize("name", ["gmm2d", "gmm64"])
def test_tweedie_score_matches_gradient_of_marginal_density(name):
    """Tweedie: grad_x log p_t(x) = (alpha E[x0|x] - x) / sigma^2 = -E[eps|x] / sigma."""
    model = load_model(name, F64)
    x = torch.randn(8, model.sample_shape[0], generator=torch.Generator().manual_seed(2), dtype=F64)
    for t in (0.1, 0.6):
        xr = x.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(model.marginal_log_prob(xr, _t(t)).sum(), xr)
        x0, eps = _posterior(model, x, t)
        a, s = alpha(model.noise, _t(t)), model.noise.sigma(_t(t))
        torch.testing.assert_close(score, (a * x0 - x) / s**2, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(score, -eps / s, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("parameterization", ["sample", "epsilon", "v_prediction", "flow"])
@pytest.mark.parametrize("noise", [VPLinear(), FlowMatching()], ids=["vp", "flow"])
def test_every_parameterization_decodes_to_the_same_posterior(parameterization, noise):
    """to_data_and_noise(output) recovers (E[x0|x], E[eps|x]) whatever the declared parameterisation."""
    w, mu, sd = analytic.ring_mixture()
    ref = GaussianMixtureDenoiser(w, mu, sd, noise, "sample", dtype=F64)
    model = GaussianMixtureDenoiser(w, mu, sd, noise, parameterization, dtype=F64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    for t in (0.2, 0.7):
        x0, eps = model.posterior(x, _t(t))
        got = _posterior(model, x, t)
        torch.testing.assert_close(got[0], x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], eps, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x0, ref.posterior(x, _t(t))[0])
        a, s = alpha(noise, _t(t)), noise.sigma(_t(t))
        torch.testing.assert_close(a * x0 + s * eps, x)  # the posterior means satisfy x = alpha x0 + sigma eps


def test_finite_and_correct_at_the_ends_of_time():
    """At t = 0 the data prediction is x itself; on flow matching at t = 1 (alpha = 0) it is the data mean."""
    vp, flow = analytic.gmm2d(F64), analytic.gmm2d_flow(F64)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(vp(x, _t(0.0)), x)
    torch.testing.assert_close(flow(x, _t(0.0)), -x)  # u = eps - x0 with eps = 0, x0 = x
    mean = (flow.weights[:, None] * flow.means).sum(0)
    torch.testing.assert_close(flow(x, _t(1.0)), x - mean)  # u = eps - x0 with eps = x, x0 = data mean
    assert torch.isfinite(analytic.gmm64(F64)(torch.randn(3, 64, dtype=F64), _t(0.0))).all()


def test_float32_agrees_with_float64():
    for name in ("gmm2d", "gmm64", "gmm2d-flow"):
        m32, m64 = load_model(name, torch.float32), load_model(name, F64)
        x = torch.randn(16, m64.sample_shape[0], generator=torch.Generator().manual_seed(5), dtype=F64)
        for t in (0.01, 0.3, 0.9):
            out32 = m32(x.float(), torch.tensor(t, dtype=F64))
            assert out32.dtype == torch.float32
            torch.testing.assert_close(out32.double(), m64(x, _t(t)), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["gmm2d", "gmm2d-flow"])
def test_differentiable_in_x_and_t(name):
    model = load_model(name, F64)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(6), dtype=F64, requires_grad=True)
    t = torch.tensor(0.35, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: model(x, t), (x, t))


def test_batched_times():
    """t may also be one time per batch row."""
    model = analytic.gmm2d(F64)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    ts = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    rows = torch.cat([model(x[i : i + 1], ts[i]) for i in range(3)])
    torch.testing.assert_close(model(x, ts), rows)
    logp = torch.cat([model.marginal_log_prob(x[i : i + 1], ts[i]) for i in range(3)])
    torch.testing.assert_close(model.marginal_log_prob(x, ts), logp)


# --- exact data density and samples ---------------------------------------------------------------------------------


def test_log_prob_integrates_to_one_and_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    model = analytic.gmm2d(F64)
    g = torch.linspace(-2.0, 2.0, 401, dtype=F64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    assert abs(float(model.log_prob(grid).exp().sum()) * (4.0 / 400) ** 2 - 1.0) < 1e-9
    m64 = analytic.gmm64(F64)
    x = m64.sample_data(5, torch.Generator().manual_seed(8))
    expected = np.log(sum(
        float(w) * stats.multivariate_normal(mean=mu.numpy(), cov=np.diag(sd.numpy() ** 2)).pdf(x.numpy())
        for w, mu, sd in zip(m64.weights, m64.means, m64.stds)
    ))
    np.testing.assert_allclose(m64.log_prob(x).numpy(), expected, rtol=1e-10)


def test_sample_data_has_the_mixture_moments_and_is_reproducible():
    model = analytic.gmm2d(F64)
    x = model.sample_data(40000, torch.Generator().manual_seed(9))
    mean = (model.weights[:, None] * model.means).sum(0)
    second = (model.weights[:, None, None] * (model.means[:, :, None] * model.means[:, None, :]
                                               + torch.diag_embed(model.stds**2))).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.015)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.02)
    again = model.sample_data(40000, torch.Generator().manual_seed(9))
    assert torch.equal(x, again)
    assert analytic.gmm2d(torch.float32).sample_data(3).dtype == torch.float32


# --- exact probability-flow ODE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [VPLinear(), FlowMatching(), EDM()], ids=["vp", "flow", "edm"])
@pytest.mark.parametrize("std", [0.4, [0.3, 1.0, 0.05]], ids=["isotropic", "diagonal"])
def test_numerical_ode_matches_closed_form_for_one_gaussian(noise, std):
    """DOP853 in lambda agrees to 1e-8 with (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) = const."""
    mean = [[0.5, -1.0, 2.0]]
    model = GaussianMixtureDenoiser([1.0], mean, [std], noise, dtype=F64)
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(10), dtype=F64)
    for t_end in (0.0, noise.t_min, 0.3 * noise.T):
        closed = model.exact_ode_solution(z, t_end, method="closed_form")
        numeric = model.exact_ode_solution(z, t_end, method="numerical")
        torch.testing.assert_close(numeric, closed, rtol=0, atol=1e-8)


def test_closed_form_composes_and_inverts():
    """The closed-form flow map from s to u equals s to r then r to u, and runs backwards."""
    ns, mu, sd = VPLinear(), torch.tensor([0.2, -0.4], dtype=F64), torch.tensor([0.5, 0.1], dtype=F64)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(11), dtype=F64)
    direct = gaussian_ode_solution(ns, mu, sd, x, 1.0, 0.01)
    via = gaussian_ode_solution(ns, mu, sd, gaussian_ode_solution(ns, mu, sd, x, 1.0, 0.4), 0.4, 0.01)
    torch.testing.assert_close(direct, via)
    torch.testing.assert_close(gaussian_ode_solution(ns, mu, sd, direct, 0.01, 1.0), x)


def test_exact_ode_lands_on_the_data():
    """The PF-ODE from prior noise ends inside the ring's components (within 5 std of a mean)."""
    model = analytic.gmm2d(F64)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    x = model.exact_ode_solution(z)
    dist = (x[:, None, :] - model.means).norm(dim=-1).min(-1).values
    assert dist.max() < 5 * 0.1


def _lambda_uniform_2m(ns, n: int) -> Schedule:
    """DPM-Solver++ 2M from T on n steps uniform in lambda between +-lambda(t_min), ending at t_min."""
    lam_end = float(ns.lambda_(_t(ns.t_min)))
    lam_start = max(float(ns.lambda_(_t(ns.T))), -lam_end)  # flow matching has lambda(T) = -inf
    times = [float(t) for t in ns.t_of_lambda(torch.linspace(lam_start, lam_end, n, dtype=F64))]
    times = [ns.T] + times[1:-1] + [ns.t_min]
    return Schedule(ns.T, tuple(Step(t, order=min(2, k + 1)) for k, t in enumerate(times[1:])))


@pytest.mark.parametrize("name", ["gmm2d", "gmm2d-flow", "gmm64"])
def test_executor_converges_to_the_exact_solution(name):
    """DPM-Solver++ 2M on the model approaches the exact ODE solution from the same noise at second order."""
    model = load_model(name, F64)
    z = torch.randn(8, model.sample_shape[0], generator=torch.Generator().manual_seed(13), dtype=F64)
    exact = model.exact_ode_solution(z, t_end=model.noise.t_min)
    errs = [float((sample(model, _lambda_uniform_2m(model.noise, n), z).sample - exact).abs().max()) for n in (50, 200)]
    assert errs[1] < 1e-3
    assert errs[0] / errs[1] > 4 ** 1.7, errs


# --- registry, identity, errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,dim,kind,param", [
    ("gmm2d", 2, "vp_linear", "sample"),
    ("gmm64", 64, "vp_linear", "sample"),
    ("gmm2d-flow", 2, "flow", "flow"),
])
def test_registry_loads_builtins(name, dim, kind, param):
    assert name in builtin_names()
    model = load_model(name)
    assert isinstance(model, Denoiser)
    assert model.sample_shape == (dim,) and model.noise.kind == kind and model.parameterization == param
    assert model.dtype == torch.float32 and model.units == () and model.num_classes is None
    info = describe(model)
    assert info["sample_shape"] == [dim] and info["noise"] == kind and info["parameters"] == 0
    assert model(torch.zeros(2, dim), torch.tensor(0.5)).shape == (2, dim)


def test_fingerprint_is_stable_and_discriminating():
    prints = {name: load_model(name).fingerprint() for name in ("gmm2d", "gmm64", "gmm2d-flow")}
    assert len(set(prints.values())) == 3
    assert load_model("gmm2d").fingerprint() == prints["gmm2d"]
    assert load_model("gmm2d", F64).fingerprint() != prints["gmm2d"]
    w, mu, sd = analytic.ring_mixture()
    assert GaussianMixtureDenoiser(w, mu, sd * 1.01, VPLinear()).fingerprint() != prints["gmm2d"]


def test_invalid_models_and_calls_raise_clear_errors():
    ns = VPLinear()
    with pytest.raises(ModelError, match="stds"):
        GaussianMixtureDenoiser([1.0], [[0.0]], 0.0, ns)
    with pytest.raises(ModelError, match="weights"):
        GaussianMixtureDenoiser([1.0, 2.0], [[0.0]], 1.0, ns)
    with pytest.raises(ModelError, match="weights"):
        GaussianMixtureDenoiser([-1.0], [[0.0]], 1.0, ns)
    with pytest.raises(ModelError, match="means"):
        GaussianMixtureDenoiser([1.0], [0.0, 1.0], 1.0, ns)
    with pytest.raises(ModelError, match="parameterization"):
        GaussianMixtureDenoiser([1.0], [[0.0]], 1.0, ns, "score")
    with pytest.raises(ModelError, match="finite"):
        GaussianMixtureDenoiser([1.0], [[float("nan")]], 1.0, ns)
    model = analytic.gmm2d()
    with pytest.raises(SamplingError, match="shape"):
        model(torch.zeros(2, 3), torch.tensor(0.5))
    with pytest.raises(SamplingError, match="cond"):
        model(torch.zeros(2, 2), torch.tensor(0.5), cond=torch.zeros(2))
    with pytest.raises(SamplingError, match="unit"):
        model(torch.zeros(2, 2), torch.tensor(0.5), skip=frozenset({"mid"}))
    with pytest.raises(ModelError, match="closed_form"):
        model.exact_ode_solution(torch.zeros(1, 2), method="closed_form")
    with pytest.raises(ModelError, match="t_end"):
        model.exact_ode_solution(torch.zeros(1, 2), t_end=2.0)
