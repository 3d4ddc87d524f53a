"""Noise schedules: diffusers' betas, lambda and its inverse, t = 0 as the data, differentiability."""

import numpy as np
import pytest
import torch

from autotune.errors import ModelError
from autotune.sampling.noise import EDM, FlowMatching, VPDiscrete, VPLinear

ALL = [VPDiscrete.from_diffusers_config({}), VPDiscrete.from_diffusers_config({"beta_schedule": "scaled_linear",
       "beta_start": 0.00085, "beta_end": 0.012}), VPDiscrete.from_diffusers_config(
       {"beta_schedule": "squaredcos_cap_v2"}), VPLinear(), EDM(), FlowMatching()]


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_matches_diffusers_alphas_cumprod(beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_schedule=beta_schedule)
    ns = VPDiscrete.from_diffusers_config(dict(sched.config))
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    # diffusers keeps betas and their product in float32; redo the product in float64 from its betas
    acp = torch.cumprod(1 - sched.betas.double(), 0)
    assert torch.allclose(sched.alphas_cumprod.double(), acp, rtol=1e-4)
    assert torch.allclose(torch.exp(2 * ns.log_alpha(t)), acp, rtol=1e-4, atol=0)  # betas: float32 there
    assert torch.allclose(ns.sigma(t), (1 - acp).sqrt(), rtol=1e-6)


@pytest.mark.parametrize("ns", ALL, ids=lambda n: n.kind)
def test_lambda_inverse_and_consistency(ns):
    t = torch.linspace(ns.t_min * 2, ns.T * 0.999, 50, dtype=torch.float64)
    lam = ns.lambda_(t)
    assert torch.all(lam[1:] < lam[:-1]), "lambda must decrease in t"
    assert torch.allclose(ns.t_of_lambda(lam), t, rtol=1e-7, atol=1e-9)
    assert torch.allclose(lam, ns.log_alpha(t) - torch.log(ns.sigma(t)), atol=1e-10)


@pytest.mark.parametrize("ns", ALL, ids=lambda n: n.kind)
def test_t_zero_is_the_data(ns):
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert float(ns.sigma(zero)) == 0.0 and float(torch.exp(ns.log_alpha(zero))) == 1.0
    assert float(ns.lambda_(zero)) == float("inf")


@pytest.mark.parametrize("ns", ALL, ids=lambda n: n.kind)
def test_differentiable_in_t(ns):
    t = torch.tensor([0.3 * ns.T, 0.6 * ns.T], dtype=torch.float64, requires_grad=True)
    ns.lambda_(t).sum().backward()
    assert torch.all(t.grad < 0)  # lambda decreases


def test_vp_is_variance_preserving():
    for ns in ALL[:4]:
        t = torch.linspace(0.01, 1.0, 20, dtype=torch.float64)
        assert torch.allclose(torch.exp(2 * ns.log_alpha(t)) + ns.sigma(t) ** 2, torch.ones_like(t))


def test_bad_configs_are_model_errors():
    with pytest.raises(ModelError, match="beta_schedule"):
        VPDiscrete.from_diffusers_config({"beta_schedule": "cubic"})
    with pytest.raises(ModelError, match="alphas_cumprod"):
        VPDiscrete(np.array([0.5, 0.9]))
