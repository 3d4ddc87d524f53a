"""The named schedules on Karras sigmas (diffusers' use_karras_sigmas): their grid, the training steps the network
hears, where they apply. Their samples equal diffusers' DPMSolverMultistepScheduler(use_karras_sigmas=True) to
1e-4 in tests/test_peers.py (DIFFUSERS_PEERS names them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autotune.errors import ScheduleError
from autotune.sampling.coefficients import model_times
from autotune.sampling.named import DIFFUSERS_PEERS, KARRAS_NAMED, KARRAS_RHO, build, karras_grid, names_for
from autotune.sampling.noise import FlowMatching, VPDiscrete, VPLinear

NOISES = {"vp_discrete_linear": VPDiscrete.from_diffusers_config({}),
          "vp_discrete_sd": VPDiscrete.from_diffusers_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                              "beta_end": 0.012}),
          "vp_linear": VPLinear()}


def _sigma(noise, t: float) -> float:
    return float(torch.exp(-noise.lambda_(torch.tensor(t, dtype=torch.float64))))


@pytest.mark.parametrize("noise", list(NOISES.values()), ids=list(NOISES))
@pytest.mark.parametrize("nfe", [2, 5, 10])
def test_the_grid_is_karras_sigmas_from_sigma_max_to_sigma_min_then_zero(noise, nfe):
    times, shifts = karras_grid(noise, nfe)
    assert len(times) == nfe + 1 and len(shifts) == nfe and times[0] == noise.T and times[-1] == 0.0
    assert all(a > b for a, b in zip(times, times[1:]))
    sigmas = [_sigma(noise, t) for t in times[1:nfe - 1]]  # between sigma_max and sigma_min
    hi, lo = _sigma(noise, noise.T), _sigma(noise, noise.t_min)
    ramp = np.linspace(0.0, 1.0, nfe)[1:-1]
    karras = (hi ** (1 / KARRAS_RHO) + ramp * (lo ** (1 / KARRAS_RHO) - hi ** (1 / KARRAS_RHO))) ** KARRAS_RHO
    # a discrete model's ends come from float32 alphas_cumprod, as diffusers' do (1e-4 relative at sigma_min)
    assert np.allclose(sigmas, karras, rtol=2e-4)
    for name in KARRAS_NAMED:
        s = build(name, noise, nfe)
        assert s.times == tuple(times) and s.nfe == nfe and s.name == name and s.metadata == {"named": name}
        assert [st.shift for st in s.steps] == shifts


def test_a_discrete_model_hears_the_training_step_diffusers_rounds_to():
    """The solver steps between the Karras sigmas; each call tells the network the integer training step nearest
    its sigma (diffusers' _sigma_to_t, rounded), through the step's model-time shift; a continuous model's shifts
    are 0."""
    noise = NOISES["vp_discrete_sd"]
    times, shifts = karras_grid(noise, 10)
    t = torch.tensor(times, dtype=torch.float64)
    told = noise.model_time(model_times(noise, t, noise.lambda_(t), torch.tensor(shifts, dtype=torch.float64)))
    assert torch.allclose(told, told.round(), atol=1e-4)
    assert told.round().tolist() == [999, 916, 815, 687, 523, 327, 146, 41, 7, 0]  # diffusers' timesteps here
    assert any(s != 0.0 for s in shifts) and shifts[0] == 0.0
    assert karras_grid(NOISES["vp_linear"], 10)[1] == [0.0] * 10


def test_karras_schedules_are_named_where_they_apply():
    for noise in NOISES.values():
        assert set(KARRAS_NAMED) <= set(names_for(noise))
    assert not set(KARRAS_NAMED) & set(names_for(FlowMatching()))
    with pytest.raises(ScheduleError, match="flow-matching model's is infinite"):
        build("dpmsolver++2m-karras", FlowMatching(), 5)
    with pytest.raises(ScheduleError, match="ends at 0"):
        build("dpmsolver++2m-karras", VPLinear(), 5, final="sigma_min")
    for name in KARRAS_NAMED:
        cls, kwargs = DIFFUSERS_PEERS[name]
        assert cls == "DPMSolverMultistepScheduler" and kwargs["use_karras_sigmas"] is True


def test_orders_follow_diffusers_lower_order_warm_up_and_final():
    s2 = build("dpmsolver++2m-karras", VPLinear(), 6)
    s3 = build("dpmsolver++3m-karras", VPLinear(), 6)
    assert [st.order for st in s2.steps] == [1, 2, 2, 2, 2, 1]
    assert [st.order for st in s3.steps] == [1, 2, 3, 3, 2, 1]
    assert all(st.solver == "dpm" and st.prediction == "data" for st in s2.steps + s3.steps)
