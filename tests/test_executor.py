"""The executor on its own: NFE counting, float64, DC compensation, correctors, gradients, unit skipping."""

import dataclasses

import pytest
import torch
from torch import nn

from autotune.sampling.coefficients import compensation, make_plan
from autotune.sampling.denoiser import TorchDenoiser, to_data_and_noise
from autotune.sampling.executor import sample
from autotune.sampling.program import Call, Combine, Free
from autotune.sampling.named import KARRAS_NAMED, NAMED, build
from autotune.sampling.noise import FlowMatching, VPDiscrete, VPLinear
from autotune.space.schedule import Schedule, Step


def gaussian_model(noise_schedule, c=0.7, parameterization="sample"):
    """Data ~ N(0, c^2 I): the exact denoiser is x0 = alpha c^2 / (alpha^2 c^2 + sigma^2) x."""

    def fn(x, tm):
        t = tm_to_t(tm)
        a = torch.exp(noise_schedule.log_alpha(t)).to(x.dtype)[:, None]
        s = noise_schedule.sigma(t).to(x.dtype)[:, None]
        x0 = a * c**2 / (a**2 * c**2 + s**2) * x
        eps = (x - a * x0) / s
        return {"sample": x0, "epsilon": eps, "v_prediction": a * eps - s * x0, "flow": eps - x0}[parameterization]

    def tm_to_t(tm):  # invert model_time for the schedules used here
        if isinstance(noise_schedule, VPDiscrete):
            return (tm.double() + 1) / noise_schedule.num_train_timesteps
        if isinstance(noise_schedule, (VPLinear, FlowMatching)):
            return tm.double() / noise_schedule.time_scale
        return tm.double()

    return TorchDenoiser(fn, noise_schedule, parameterization)


def exact_gaussian_solution(noise_schedule, x_T, t_end, c=0.7):
    """Probability-flow ODE solution for N(0, c^2 I) data: x_t scales with sqrt(alpha^2 c^2 + sigma^2)."""
    def std(t):
        t = torch.tensor(t, dtype=torch.float64)
        return float(torch.sqrt(torch.exp(2 * noise_schedule.log_alpha(t)) * c**2 + noise_schedule.sigma(t) ** 2))
    return x_T * std(t_end) / std(noise_schedule.T)


# EDM is left out: the named spacings are uniform in t = sigma there, a grid no one uses at few steps.
# (Convergence orders are asserted in test_convergence.py on lambda-uniform grids.)
@pytest.mark.parametrize("ns", [VPDiscrete.from_diffusers_config({}), VPLinear(), FlowMatching()],
                         ids=lambda n: n.kind)
@pytest.mark.parametrize("parameterization", ["sample", "epsilon", "v_prediction", "flow"])
def test_every_named_schedule_solves_the_gaussian_ode(ns, parameterization):
    model = gaussian_model(ns, parameterization=parameterization)
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_gaussian_solution(ns, noise * ns.init_scale(), 0.0)
    scale = exact.abs().max().item()
    karras = () if isinstance(ns, FlowMatching) else tuple(KARRAS_NAMED)  # a flow model's sigma at T is infinite
    for name in (*NAMED, *karras):
        schedule = build(name, ns, 20)
        result = sample(model, schedule, noise, dtype=torch.float64)
        err = (result.sample - exact).abs().max().item()
        assert result.nfe == 20 and err < 0.15 * scale, (name, err)  # ddim, first order, is the loosest
        # the same schedule in every parameterisation of the same model gives the same samples (not where a step's
        # model-time shift tells the network another time than the solver converts its output at: Karras on DDPM)
        if parameterization != "sample" and not any(st.shift for st in schedule.steps):
            ref = sample(gaussian_model(ns, parameterization="sample"), schedule, noise).sample
            assert (result.sample - ref).abs().max() < 1e-8


def test_float32_and_float64_agree():
    ns = VPDiscrete.from_diffusers_config({})
    model = gaussian_model(ns)
    noise = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    s = build("unipc-bh2-o3", ns, 8)
    a = sample(model, s, noise, dtype=torch.float32).sample
    b = sample(model, s, noise.double(), dtype=torch.float64).sample
    assert a.dtype == torch.float32 and b.dtype == torch.float64
    assert (a.double() - b).abs().max() < 1e-5


def test_compensation_is_lagrange_interpolation_in_t():
    times = torch.tensor([1.0, 0.8, 0.55, 0.3], dtype=torch.float64)
    comp = compensation(3, torch.tensor(1.0, dtype=torch.float64), 2, times)
    assert {j: round(float(w), 12) for j, w in comp.outputs} == {3: 1.0, 2: 0.0, 1: 0.0}
    comp = compensation(3, torch.tensor(0.8, dtype=torch.float64), 2, times)
    # outputs that are a quadratic in t are reproduced exactly at the shifted time
    f = lambda t: 2 * t**2 - t + 0.5  # noqa: E731
    target = 0.8 * 0.3 + 0.2 * 0.55
    assert abs(sum(float(w) * f(float(times[j])) for j, w in comp.outputs) - f(target)) < 1e-12


def _dc_schedule(ns, ratio):
    base = build("unipc-bh2-o2", ns, 6)
    steps = [dataclasses.replace(st, ratio=ratio if k >= 2 else 1.0) for k, st in enumerate(base.steps)]
    return base.with_steps(steps)


def test_ratios_change_the_sample_and_one_means_none():
    ns = VPDiscrete.from_diffusers_config({})
    model = gaussian_model(ns, parameterization="epsilon")
    noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    plain = sample(model, build("unipc-bh2-o2", ns, 6), noise).sample
    assert torch.equal(sample(model, _dc_schedule(ns, 1.0), noise).sample, plain)
    assert (sample(model, _dc_schedule(ns, 0.9), noise).sample - plain).abs().max() > 1e-6


def test_differentiable_in_ratios_times_and_shifts():
    ns = VPDiscrete.from_diffusers_config({})
    model = gaussian_model(ns, parameterization="epsilon")
    noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = _dc_schedule(ns, 1.0)
    ratios = torch.ones(len(s.steps), dtype=torch.float64, requires_grad=True)
    times = torch.tensor(s.times, dtype=torch.float64, requires_grad=True)
    shifts = torch.zeros(len(s.steps), dtype=torch.float64, requires_grad=True)
    out = sample(model, s, noise, differentiable=True, ratios=ratios, times=times, shifts=shifts)
    exact = exact_gaussian_solution(ns, noise, 0.0)
    ((out.sample - exact) ** 2).mean().backward()
    assert torch.isfinite(ratios.grad).all() and ratios.grad[2:].abs().sum() > 0
    assert ratios.grad[:2].abs().sum() == 0  # no compensation before dc_order outputs exist
    assert torch.isfinite(times.grad[1:-1]).all() and times.grad[1:-1].abs().sum() > 0
    assert torch.isfinite(shifts.grad).all() and (shifts.grad != 0).all()  # every step's call moves the result
    with torch.no_grad():
        assert not sample(model, s, noise).sample.requires_grad


def test_corrector_uses_no_extra_model_call():
    ns = VPLinear()
    calls = []
    inner = gaussian_model(ns)
    model = TorchDenoiser(lambda x, tm: calls.append(1) or inner.fn(x, tm), ns, "sample")
    s = build("unipc-bh2-o3", ns, 7)
    assert sum(st.corrector != "none" for st in s.steps) == 6
    assert sample(model, s, torch.randn(4, 2)).nfe == len(calls) == 7


def test_final_denoise_costs_one_call_and_returns_x0():
    ns = VPLinear()
    model = gaussian_model(ns)
    times = [1.0, 0.5, 0.1, 0.01]
    s = Schedule(1.0, tuple(Step(t) for t in times[1:]), final_denoise=True)
    noise = torch.randn(4, 2, dtype=torch.float64)
    result = sample(model, s, noise, keep_states=True)
    assert result.nfe == 4 and len(result.states) == 4
    plain = sample(model, dataclasses.replace(s, final_denoise=False), noise).sample
    x0, _ = to_data_and_noise(model(plain, torch.tensor(0.01)), plain, torch.exp(ns.log_alpha(torch.tensor(0.01))),
                              ns.sigma(torch.tensor(0.01)), "sample")
    assert torch.allclose(result.sample, x0)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.block.autotune_prunable = True
        self.out = nn.Linear(8, 3)

    def forward(self, x, t):
        return self.out(self.block(self.inp(x)) + t[:, None] * 1e-3)


def test_skip_masks_bypass_units_per_step():
    torch.manual_seed(0)
    ns = VPLinear()
    model = TorchDenoiser(TinyNet(), ns, "epsilon")
    assert model.units == ("block",)
    noise = torch.randn(4, 3)
    full = build("dpmsolver++2m", ns, 4)
    pruned = full.with_steps([dataclasses.replace(st, skip=("block",)) if k == 1 else st
                              for k, st in enumerate(full.steps)])
    a, b = sample(model, full, noise), sample(model, pruned, noise)
    assert a.nfe == b.nfe == 4 and (a.sample - b.sample).abs().max() > 1e-4
    # the module is restored after the call
    assert "forward" not in model.module.block.__dict__
    assert torch.equal(sample(model, full, noise).sample, a.sample)


def test_plan_is_shared_and_precomputed():
    ns = VPDiscrete.from_diffusers_config({})
    plan = make_plan(build("dpmsolver++3m", ns, 6), ns)
    predictors = [ins for ins in plan.code if isinstance(ins, Combine)]
    assert len(plan.calls) == 6 and [len(p.outputs) for p in predictors] == [1, 2, 3, 3, 2, 1]
    # every output is freed once no later instruction reads it, so a 3rd-order run holds at most 3
    held, most = set(), 0
    for ins in plan.code:
        if isinstance(ins, Call):
            held.add(ins.slot)
        elif isinstance(ins, Free):
            held -= set(ins.slots)
        most = max(most, len(held))
    assert most == 3 and not held


def test_sampling_in_slices_gives_the_one_batch_run():
    """The evaluator's slices: the same samples, states and divergence step as one batch; conditions, starts
    and an SDE's given draws are sliced with the noise."""
    from autotune.sampling.executor import sample_in_chunks

    ns = VPLinear()
    labels = torch.arange(10)

    def conditional(x, tm, cond):  # a per-sample condition shifts the output, so a mis-sliced one shows
        return 0.5 * x + 0.01 * cond.to(x.dtype)[:, None]

    model = TorchDenoiser(conditional, ns, "epsilon")
    noise = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    schedule = build("unipc-bh2-o3", ns, 5)
    whole = sample(model, schedule, noise, labels, keep_states=True, check_finite=True)
    sliced = sample_in_chunks(model, schedule, noise, labels, chunk=3, keep_states=True, check_finite=True)
    assert torch.equal(whole.sample, sliced.sample) and sliced.nfe == whole.nfe == 5
    assert len(sliced.states) == len(whole.states) and all(torch.equal(a, b) for a, b in zip(whole.states,
                                                                                             sliced.states))
    start = 0.3 * torch.randn(10, 3)
    assert torch.equal(sample(model, schedule, noise, labels, start=start).sample,
                       sample_in_chunks(model, schedule, noise, labels, chunk=4, start=start).sample)

    def blows_up_late(x, tm, cond):  # only the last sample diverges, and only in the third slice
        out = 0.5 * x
        out[cond == 9] = out[cond == 9] * 1e38 * 1e38
        return out

    bad = TorchDenoiser(blows_up_late, ns, "epsilon")
    assert sample_in_chunks(bad, schedule, noise, labels, chunk=4, check_finite=True).diverged_at == \
        sample(bad, schedule, noise, labels, check_finite=True).diverged_at is not None

    sde = build("dpmsolver++2m-sde", ns, 5)
    draws = torch.randn(10, 5, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(model, sde, noise, labels, step_noise=draws).sample,
                       sample_in_chunks(model, sde, noise, labels, chunk=3, step_noise=draws).sample)
    # drawing on a generator, it runs as one batch: the draws are the one-batch run's
    a = sample(model, sde, noise, labels, generator=torch.Generator().manual_seed(2)).sample
    b = sample_in_chunks(model, sde, noise, labels, chunk=3, generator=torch.Generator().manual_seed(2)).sample
    assert torch.equal(a, b)


def test_a_shift_moves_only_the_time_the_network_is_told():
    """A step's shift changes the time its own model call passes to the network (log-SNR + shift, kept in
    [t_min, T]); the state and the solver stay at tau_k. So the shifted schedule is the unshifted one run on a
    model that is told the shifted times, and an unshifted plan calls at tau_k bit for bit."""
    ns = VPDiscrete.from_diffusers_config({})
    inner = gaussian_model(ns, parameterization="epsilon")
    base = build("unipc-bh2-o3", ns, 5)
    shifts = [0.0, 0.4, -0.3, 0.0, 3.9]  # the last one would pass the trained range: it stops at its end
    shifted = base.with_steps(dataclasses.replace(st, shift=v) for st, v in zip(base.steps, shifts))
    assert [c.time.item() for c in make_plan(base, ns).calls] == list(base.times[:-1])
    tau = torch.tensor(base.times[:-1], dtype=torch.float64)
    moved = ns.t_of_lambda(ns.lambda_(tau) + torch.tensor(shifts, dtype=torch.float64)).clamp(ns.t_min, ns.T)
    expected = torch.where(torch.tensor(shifts) != 0, moved, tau)  # an unshifted call: tau_k exactly
    got = torch.stack([c.time for c in make_plan(shifted, ns).calls])
    assert got[0] == tau[0] and got[3] == tau[3]
    assert torch.allclose(got, expected, rtol=0, atol=1e-9) and ns.t_min <= float(got[-1]) < 0.01
    told = iter(ns.model_time(expected))
    model_told_shifted = TorchDenoiser(lambda x, tm: inner.fn(x, next(told).expand_as(tm).to(tm.dtype)), ns,
                                       "epsilon")
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = sample(inner, shifted, noise).sample
    assert torch.allclose(ours, sample(model_told_shifted, base, noise).sample, rtol=0, atol=1e-12)
    assert (ours - sample(inner, base, noise).sample).abs().max() > 1e-4  # and the shift did change the sample


@pytest.mark.parametrize("parameterization", ["epsilon", "v_prediction", "flow"])
def test_a_data_scale_multiplies_that_steps_data_prediction(parameterization):
    """A step's ``data_scale`` is the same run on a model whose data prediction is that much larger at the step's
    own call (the noise prediction following from the state), whichever prediction the step's solver reads; at 1
    the plan has no scaling at all, so every schedule without scales samples bit for bit as before."""
    ns = FlowMatching() if parameterization == "flow" else VPDiscrete.from_diffusers_config({})
    inner = gaussian_model(ns, parameterization=parameterization)
    named = build("unipc-bh2-o3", ns, 5)
    base = named.with_steps(dataclasses.replace(st, prediction="noise") if k % 2 else st
                            for k, st in enumerate(named.steps))
    factors = [1.0, 0.9, 1.0, 1.1, 0.95]
    scaled = base.with_steps(dataclasses.replace(st, data_scale=v) for st, v in zip(base.steps, factors))
    assert all(c.scale is None for c in make_plan(base, ns).calls)
    assert [c.scale is not None for c in make_plan(scaled, ns).calls] == [v != 1.0 for v in factors]
    call_times = [c.time for c in make_plan(base, ns).calls]
    calls = iter(range(len(factors)))

    def scaled_network(x, tm):
        out, k = inner.fn(x, tm), next(calls)
        alpha_t, sigma_t = torch.exp(ns.log_alpha(call_times[k])), ns.sigma(call_times[k])
        x0, _ = to_data_and_noise(out, x, alpha_t, sigma_t, parameterization)
        x0 = factors[k] * x0
        eps = (x - alpha_t * x0) / sigma_t
        return {"epsilon": eps, "v_prediction": alpha_t * eps - sigma_t * x0, "flow": eps - x0}[parameterization]

    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = sample(inner, scaled, noise).sample
    assert torch.allclose(ours, sample(TorchDenoiser(scaled_network, ns, parameterization), base, noise).sample,
                          rtol=0, atol=1e-10)
    assert (ours - sample(inner, base, noise).sample).abs().max() > 1e-4
    # differentiable in the scales, which an override tensor at 1 leaves as they were: every step's call counts
    scales = torch.ones(len(base.steps), dtype=torch.float64, requires_grad=True)
    out = sample(inner, base, noise, differentiable=True, data_scales=scales)
    assert torch.allclose(out.sample.detach(), sample(inner, base, noise).sample, rtol=0, atol=1e-12)
    ((out.sample - exact_gaussian_solution(ns, noise, 0.0)) ** 2).mean().backward()
    assert torch.isfinite(scales.grad).all() and (scales.grad != 0).all()
