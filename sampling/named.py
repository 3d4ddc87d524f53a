"""Named hand-designed schedules, built as data in the unified format.

Every one starts at T and never clips x0. On a discrete (DDPM) noise schedule they reproduce the diffusers
scheduler of the same name: ``ddim`` = DDIMScheduler(timestep_spacing="trailing", clip_sample=False);
the others = the multistep scheduler with ``timestep_spacing="linspace"`` and its default lower-order
warm-up and final steps, but UniPC bh1: ``unipc-bh1-o2|3`` end at 0, where diffusers' bh1 returns NaN, and
their ``-smin`` namesakes are diffusers' (``final_sigmas_type="sigma_min"``). On continuous schedules the same
spacing rules are applied to t. On flow-matching models the ``FLOW_NAMED`` ones reproduce diffusers' flow
schedulers (FlowMatchEulerDiscreteScheduler with the model's own shift or fixed shifts; UniPC and DPM-Solver++
with ``use_flow_sigmas``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch

from autotune.errors import ScheduleError
from autotune.sampling.noise import FlowMatching, NoiseSchedule, VPDiscrete, static_shift
from autotune.space.schedule import Schedule, Step

FINALS = ("zero", "sigma_min")


def linspace_times(noise: NoiseSchedule, nfe: int, final: str = "zero") -> list[float]:
    """diffusers' ``linspace`` spacing: nfe + 1 times from T down to t_min; the last becomes 0 for final='zero'."""
    if isinstance(noise, VPDiscrete):
        n = noise.num_train_timesteps
        steps = np.linspace(0, n - 1, nfe + 1).round()[::-1]
        times = [(float(s) + 1.0) / n for s in steps]
    else:
        times = [float(t) for t in np.linspace(noise.T, noise.t_min, nfe + 1)]
    if final == "zero":
        times[-1] = 0.0
    return times


def trailing_times(noise: NoiseSchedule, nfe: int) -> list[float]:
    """diffusers' ``trailing`` spacing (T, T - T/nfe, ...), ending on the data."""
    if isinstance(noise, VPDiscrete):
        n = noise.num_train_timesteps
        steps = np.arange(n, 0, -n / nfe).round() - 1
        times = [(float(s) + 1.0) / n for s in steps]
    else:
        times = [float(t) for t in np.linspace(noise.T, 0.0, nfe + 1)[:-1]]
    return times + [0.0]


def _schedule(name: str, times: list[float], steps: list[Step]) -> Schedule:
    return Schedule(t_start=times[0], steps=tuple(steps), name=name, metadata={"named": name})


def ddim(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
    """DDIM (= DPM-Solver++ order 1) on trailing spacing."""
    times = trailing_times(noise, nfe)
    if final == "sigma_min":
        times[-1] = noise.t_min
    return _schedule("ddim", times, [Step(t) for t in times[1:]])


def _dpm_steps(times: list[float], order: int, final: str = "zero") -> list[Step]:
    nfe = len(times) - 1
    steps = []
    for k, t in enumerate(times[1:]):
        o = min(order, k + 1)
        if k == nfe - 1 and (nfe < 15 or final == "zero"):
            o = 1  # diffusers' lower_order_final (always when the last step goes to sigma = 0)
        elif k == nfe - 2 and nfe < 15:
            o = min(o, 2)
        steps.append(Step(t, order=o, solver="dpm", prediction="data"))
    return steps


def _unipc_steps(times: list[float], variant: str, order: int) -> list[Step]:
    nfe = len(times) - 1
    steps = []
    for k, t in enumerate(times[1:]):
        o = min(order, nfe - k, k + 1)
        last = k == nfe - 1
        steps.append(Step(t, order=o, solver=f"unip-{variant}", prediction="data",
                          corrector="none" if last else variant, corrector_order=0 if last else o))
    return steps


def _dpmsolver_pp(order: int) -> Callable[..., Schedule]:
    def build(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
        times = linspace_times(noise, nfe, final)
        return _schedule(f"dpmsolver++{order}m", times, _dpm_steps(times, order, final))

    build.__doc__ = f"DPM-Solver++ {order}M (data prediction, midpoint form) on linspace spacing."
    return build


def _unipc(variant: str, order: int) -> Callable[..., Schedule]:
    def build(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
        times = linspace_times(noise, nfe, final)
        return _schedule(f"unipc-{variant}-o{order}", times, _unipc_steps(times, variant, order))

    build.__doc__ = f"UniPC {variant} order {order}: UniP predictor + UniC corrector (data prediction), linspace."
    return build


def ipndm(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
    """iPNDM: order-4 Adams-Bashforth on the noise prediction with lower-order warm-up, linspace spacing.

    Like the diffusers multistep schedulers, the last step onto sigma = 0 is first order: extrapolating the
    noise over that infinite log-SNR step cost 60x in mse_ref on the digits model at NFE 10."""
    times = linspace_times(noise, nfe, final)
    steps = [Step(t, order=1 if t == 0.0 else min(4, k + 1), solver="ipndm", prediction="noise")
             for k, t in enumerate(times[1:])]
    return _schedule("ipndm", times, steps)


NAMED: dict[str, Callable[..., Schedule]] = {
    "ddim": ddim,
    "dpmsolver++2m": _dpmsolver_pp(2),
    "dpmsolver++3m": _dpmsolver_pp(3),
    "unipc-bh1-o2": _unipc("bh1", 2),
    "unipc-bh1-o3": _unipc("bh1", 3),
    "unipc-bh2-o2": _unipc("bh2", 2),
    "unipc-bh2-o3": _unipc("bh2", 3),
    "ipndm": ipndm,
}


# diffusers' UniPC bh1 returns NaN on a last step onto sigma = 0 (still in 0.42), so a diffusers user's bh1 ends at
# sigma_min, where ours ends at 0. Both are named schedules, and every comparison (a search's validation and closing
# table, `autotune compare` and `baseline`) holds both: where sigma_min is large the diffusers one is the better
# few-step schedule (rgb32-eps-sd, SD 1.x's sigma_min 0.029, 128 report noises: 0.68x the mean at NFE 4, 0.61x at
# 5), and a closing table measured against ours alone said more than diffusers would. Stage 1 does not start from
# them (its space ends every schedule at t = 0); the refinement may (search/job.py: T_MIN_STARTS).
def _ending_at_sigma_min(name: str) -> Callable[..., Schedule]:
    own = f"{name}-smin"

    def build_ending_at_sigma_min(noise: NoiseSchedule, nfe: int, final: str = "sigma_min") -> Schedule:
        if final != "sigma_min":
            raise ScheduleError("final", f"{own} ends at sigma_min by its name (for final={final!r} use {name})")
        return replace(NAMED[name](noise, nfe, final), name=own, metadata={"named": own})

    return build_ending_at_sigma_min


SIGMA_MIN_NAMED: dict[str, Callable[..., Schedule]] = {
    f"{name}-smin": _ending_at_sigma_min(name) for name in ("unipc-bh1-o2", "unipc-bh1-o3")}


# Karras et al.'s sigma spacing, the grid diffusers' `use_karras_sigmas=True` steps through: where the model's
# sigma_min is large it is the best few-step grid of all (rgb32-eps-sd, SD 1.x's noise schedule, 128 search noises:
# dpmsolver++2m-karras 1.82e-3 / 1.99e-4 mse_ref at NFE 6 / 10, where the best linspace one was unipc-bh1-o3-smin
# 2.15e-3 / 9.76e-4), while on digits and gmm64 it is not among the five best. Without it a search's closing table
# measured the SD-like model against a named schedule 4.9x worse than the one its users run.
KARRAS_RHO = 7.0  # Karras et al.'s rho, diffusers' default


def karras_grid(noise: NoiseSchedule, nfe: int) -> tuple[list[float], list[float]]:
    """diffusers' Karras spacing: ``nfe`` sigmas (sigma / alpha, from the model's at T down to its at t_min, rho 7),
    then 0. Returns the times they sit at and, per step, the shift (in log-SNR) that tells the network the training
    step diffusers calls it at: on a discrete schedule the step nearest the sigma (log sigma interpolated in the step
    index, then rounded, diffusers' ``_sigma_to_t``), while the solver steps between the Karras sigmas themselves."""
    if isinstance(noise, FlowMatching):
        raise ScheduleError("name", "Karras sigmas need a finite sigma at T; a flow-matching model's is infinite "
                                    f"(use one of {', '.join(FLOW_NAMED)})")
    if isinstance(noise, VPDiscrete):
        # the training steps' sigmas as diffusers has them, from float32 alphas_cumprod: at sigma_max of a linear-beta
        # model (157) a data prediction moves 1e-3 for sigma's float64 - float32 difference (8e-5 relative at
        # sigma_min); the ends of the grid and the steps the network hears both come from them
        acp32 = noise.alphas_cumprod.astype(np.float32)
        train_sigmas = np.sqrt((1 - acp32) / acp32)
        sigma_min, sigma_max = float(train_sigmas[0]), float(train_sigmas[-1])
    else:
        ends = torch.tensor([noise.T, noise.t_min], dtype=torch.float64)
        sigma_max, sigma_min = torch.exp(-noise.lambda_(ends)).tolist()
    ramp = np.linspace(0.0, 1.0, nfe)
    sigmas = (sigma_max ** (1 / KARRAS_RHO) + ramp * (sigma_min ** (1 / KARRAS_RHO) - sigma_max ** (1 / KARRAS_RHO))
              ) ** KARRAS_RHO
    lam = torch.from_numpy(-np.log(sigmas))
    times = noise.t_of_lambda(lam).tolist()
    times[0] = float(noise.T)  # exactly T (t_of_lambda is not an exact inverse), where every named schedule starts
    times[-1] = max(times[-1], float(noise.t_min))
    shifts = [0.0] * nfe
    if isinstance(noise, VPDiscrete):
        n = len(train_sigmas)  # increasing in the training step
        told = (np.interp(np.log(sigmas), np.log(train_sigmas), np.arange(n)).round() + 1.0) / n
        moved = noise.lambda_(torch.from_numpy(told)) - noise.lambda_(torch.tensor(times, dtype=torch.float64))
        shifts = [float(d) if abs(float(d)) > 1e-9 else 0.0 for d in moved]
    return times + [0.0], shifts


def _dpmsolver_pp_karras(order: int) -> Callable[..., Schedule]:
    def build(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
        if final != "zero":
            raise ScheduleError("final", f"dpmsolver++{order}m-karras ends at 0 (its last sigma before 0 is "
                                         f"sigma_min already), got final={final!r}")
        times, shifts = karras_grid(noise, nfe)
        steps = [replace(st, shift=shift) for st, shift in zip(_dpm_steps(times, order, final), shifts)]
        return _schedule(f"dpmsolver++{order}m-karras", times, steps)

    build.__doc__ = f"DPM-Solver++ {order}M (data prediction) on Karras sigmas, as diffusers' use_karras_sigmas."
    return build


KARRAS_NAMED: dict[str, Callable[..., Schedule]] = {
    f"dpmsolver++{order}m-karras": _dpmsolver_pp_karras(order) for order in (2, 3)}


# each named schedule's diffusers peer, declared once (tests/peers.py and bench/search.py read it): the
# scheduler class and the constructor arguments, on top of the model's own scheduler config, with which
# diffusers steps through the same times with the same updates (tests/test_peers.py: max abs <= 1e-4)
DIFFUSERS_PEERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True}),
    "dpmsolver++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                      "timestep_spacing": "linspace"}),
    "dpmsolver++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                      "timestep_spacing": "linspace"}),
    "unipc-bh2-o2": ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2,
                                                 "timestep_spacing": "linspace"}),
    "unipc-bh2-o3": ("UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 3,
                                                 "timestep_spacing": "linspace"}),
    # the bh1 schedules ending at 0 have none: diffusers' bh1 returns NaN there (SIGMA_MIN_NAMED: why)
    "unipc-bh1-o2-smin": ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 2,
                                                      "timestep_spacing": "linspace",
                                                      "final_sigmas_type": "sigma_min"}),
    "unipc-bh1-o3-smin": ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3,
                                                      "timestep_spacing": "linspace",
                                                      "final_sigmas_type": "sigma_min"}),
    "dpmsolver++2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmsolver++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                             "timestep_spacing": "linspace",
                                                             "use_karras_sigmas": True}),
    "dpmsolver++3m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                             "timestep_spacing": "linspace",
                                                             "use_karras_sigmas": True}),
}
# peers that step differently from one call per step: Heun's two calls (num_inference_steps = (NFE + 1) / 2,
# timesteps listing each call) and the SDE solver (noise drawn in step() from the pipeline's generator)
SOLVER_PEERS: dict[str, tuple[str, dict]] = {
    "heun": ("HeunDiscreteScheduler", {"timestep_spacing": "trailing", "clip_sample": False}),
    "dpmsolver++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                          "timestep_spacing": "linspace"}),
}


# -- flow matching: the sigma grids diffusers' flow schedulers step through ------------------------------

def _flow(noise: NoiseSchedule, name: str) -> FlowMatching:
    if not isinstance(noise, FlowMatching):
        raise ScheduleError("name", f"{name!r} is a flow-matching schedule; this model's noise schedule is "
                                    f"{noise.kind} (use one of {', '.join(NAMED)})")
    return noise


def _below_start(noise: FlowMatching, sigmas: list[float]) -> list[float]:
    # sigma = 1 is alpha = 0 (lambda = -inf): start at T = 1 - 1e-6 as diffusers' UniPC does for flow models
    return [min(s, noise.T) for s in sigmas]


def flow_euler_times(noise: FlowMatching, nfe: int) -> list[float]:
    """FlowMatchEulerDiscreteScheduler's sigmas in the model's pipeline (its shift, dynamic shift and terminal
    stretch, and the sigmas the pipeline passes), then 0."""
    return _below_start(noise, noise.inference_sigmas(nfe)) + [0.0]


def unipc_flow_times(noise: FlowMatching, nfe: int) -> list[float]:
    """UniPCMultistepScheduler(use_flow_sigmas=True): linspace(1, 1/N, nfe + 1) without its last point, shifted
    (by exp(mu) under dynamic shifting, else flow_shift), then 0."""
    sigmas = np.linspace(1.0, 1.0 / noise.num_train_timesteps, nfe + 1)[:-1]
    return _below_start(noise, [float(s) for s in np.asarray(noise.shifted(sigmas), dtype=np.float32)]) + [0.0]


def dpm_flow_times(noise: FlowMatching, nfe: int) -> list[float]:
    """DPMSolverMultistepScheduler(use_flow_sigmas=True): 1 - linspace(1, 1/N, nfe + 1), shifted by flow_shift
    (exp(mu) under dynamic shifting), reversed, its 0 dropped, then 0 as the final sigma."""
    alphas = np.linspace(1.0, 1.0 / noise.num_train_timesteps, nfe + 1)
    sigmas = np.flip(static_shift(1.0 - alphas, noise.multistep_flow_shift))[:-1]
    return _below_start(noise, [float(s) for s in np.asarray(sigmas, dtype=np.float32)]) + [0.0]


def flow_euler(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
    """Euler on the flow ODE (= DDIM) through the sigmas of the model's own FlowMatchEulerDiscreteScheduler."""
    times = flow_euler_times(_flow(noise, "flow-euler"), nfe)
    return _schedule("flow-euler", times, [Step(t) for t in times[1:]])


def _flow_euler_shift(shift: float) -> Callable[..., Schedule]:
    name = f"flow-euler-shift{shift:g}"

    def build(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
        plain = replace(_flow(noise, name), shift=shift, mu=None, shift_terminal=None, pipeline_sigmas=False)
        times = flow_euler_times(plain, nfe)
        return _schedule(name, times, [Step(t) for t in times[1:]])

    build.__doc__ = f"Euler through FlowMatchEulerDiscreteScheduler(shift={shift:g})'s sigmas."
    return build


def unipc_flow(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
    """UniPC bh2 order 2 with use_flow_sigmas (as Wan's pipeline configures it), flow_shift = the model's shift."""
    times = unipc_flow_times(_flow(noise, "unipc-flow"), nfe)
    return _schedule("unipc-flow", times, _unipc_steps(times, "bh2", 2))


def dpmsolver_pp_flow(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
    """DPM-Solver++ 2M with use_flow_sigmas, flow_shift = the model's shift."""
    times = dpm_flow_times(_flow(noise, "dpmsolver++2m-flow"), nfe)
    return _schedule("dpmsolver++2m-flow", times, _dpm_steps(times, 2))


# flow-only schedules: offered (baselines, finalists, reports) only for flow-matching models
FLOW_NAMED: dict[str, Callable[..., Schedule]] = {
    "flow-euler": flow_euler,
    "flow-euler-shift1": _flow_euler_shift(1.0),
    "flow-euler-shift3": _flow_euler_shift(3.0),
    "flow-euler-shift6": _flow_euler_shift(6.0),
    "unipc-flow": unipc_flow,
    "dpmsolver++2m-flow": dpmsolver_pp_flow,
}


# -- the solvers that joined through the registry: two-call, singlestep, stochastic and analytic-first steps --

def heun(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
    """EDM's Heun (HeunDiscreteScheduler) on trailing spacing: n steps cost 2n - 1 calls (the last, onto the data,
    is Euler), so ``nfe`` must be odd."""
    if nfe % 2 == 0:
        raise ScheduleError("nfe", f"heun makes two model calls per step but the last: its NFE is odd "
                                   f"(2 x steps - 1), got {nfe}")
    times = trailing_times(noise, (nfe + 1) // 2)
    if final == "sigma_min":
        times[-1] = noise.t_min
    n = len(times) - 1
    return _schedule("heun", times, [Step(t, order=1 if k == n - 1 else 2, solver="heun")
                                     for k, t in enumerate(times[1:])])


def dpmsolver_pp_2s(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
    """DPM-Solver++ 2S (DPMSolverSinglestepScheduler, solver_order 2): orders 1, 2, 1, 2, ... on linspace spacing,
    each order-2 step restarting from the state before the order-1 step; first order at the end, as diffusers'
    lower_order_final does (an even count ends 1, 1)."""
    times = linspace_times(noise, nfe, final)
    orders = [1, 2] * (nfe // 2 - 1) + [1, 1] if nfe % 2 == 0 else [1, 2] * (nfe // 2) + [1]
    if final == "zero":
        orders[-1] = 1
    return _schedule("dpmsolver++2s", times, [Step(t, order=o, solver="dpm-single")
                                              for t, o in zip(times[1:], orders)])


def dpmsolver_pp_2m_sde(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
    """DPM-Solver++ 2M SDE (DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++"): fresh noise each step,
    the 2M warm-up and lower-order final steps, linspace spacing."""
    times = linspace_times(noise, nfe, final)
    steps = [replace(st, solver="dpm-sde") for st in _dpm_steps(times, 2, final)]
    return _schedule("dpmsolver++2m-sde", times, steps)


def _analytic_first(base: Schedule, name: str, metadata: dict, data_mean: tuple[float, ...] = ()) -> Schedule:
    """``base`` with its first model call replaced by USF's analytic first step (``afs``, order 1, no corrector:
    the output it would correct with is an estimate, not a call; its data estimate ``data_mean``, per channel, or
    0); the later steps are ``base``'s own, and the multistep ones among them read the analytic estimate as the
    output at T."""
    first = replace(base.steps[0], solver="afs", order=1, corrector="none", corrector_order=0,
                    data_mean=tuple(data_mean))
    return replace(base, steps=(first,) + base.steps[1:], name=name, metadata=metadata)


def dpmsolver_pp_2m_afs(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
    """DPM-Solver++ 2M whose first model call is replaced by USF's analytic estimate: nfe + 1 steps for nfe
    calls, on linspace spacing."""
    return _analytic_first(_dpmsolver_pp(2)(noise, nfe + 1, final), "dpmsolver++2m-afs",
                           {"named": "dpmsolver++2m-afs"})


def with_analytic_first(name: str, noise: NoiseSchedule, nfe: int, final: str = "zero",
                        data_mean: tuple[float, ...] = ()) -> Schedule:
    """The named schedule ``name`` on nfe + 1 steps, its first model call analytic (``_analytic_first``, with the
    data estimate ``data_mean``): the same ``nfe`` model calls, one more step. Named ``NAME+afs``, or
    ``NAME+afs-mean`` with a data mean."""
    return _analytic_first(build(name, noise, nfe + 1, final), f"{name}+afs" + ("-mean" if data_mean else ""),
                           {"named": name, "analytic_first": True}, data_mean)


# named schedules of the solvers beyond the multistep family: `autotune baseline` and `build` know them; they are
# not among the peers every search and report compares against (heun needs an odd NFE; an SDE schedule is a draw)
SOLVER_NAMED: dict[str, Callable[..., Schedule]] = {
    "dpmsolver++2m-afs": dpmsolver_pp_2m_afs,
    "dpmsolver++2m-sde": dpmsolver_pp_2m_sde,
    "dpmsolver++2s": dpmsolver_pp_2s,
    "heun": heun,
}
ALL_NAMED: dict[str, Callable[..., Schedule]] = {**NAMED, **SIGMA_MIN_NAMED, **KARRAS_NAMED, **FLOW_NAMED,
                                                 **SOLVER_NAMED}


def kept_steps(n: int, strength: float, flow: bool = False) -> int:
    """How many of its N steps an image-to-image pipeline runs at ``strength``: int(N x strength) (rounded down)
    in the SD 1.x / SDXL pipelines; N - int(N - N x strength) (rounded up) in the flow ones (SD3, Flux): N = 10
    at 0.55 keeps 5 there and 6 here."""
    if flow:
        return n - int(max(n - n * strength, 0))
    return min(int(n * strength), n)


def for_strength(schedule: Schedule, strength: float, flow: bool = False) -> Schedule:
    """The part of a full schedule an image-to-image pipeline runs at ``strength``: its last ``kept_steps``
    steps from the time of the first one kept, the lower-order warm-up restarted (there is no model output
    from before the first kept step), as diffusers' multistep schedulers do after ``set_begin_index``.
    ``flow``: cut as the flow pipelines (SD3, Flux) cut."""
    if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ScheduleError("strength", f"must be in (0, 1], got {strength!r}")
    n = len(schedule.steps)
    kept = kept_steps(n, strength, flow)
    if kept < 1:
        raise ScheduleError("strength", f"{strength:g} of {n} steps keeps no step")
    first = n - kept
    steps = tuple(
        replace(st, order=min(st.order, j + 1),
                corrector_order=min(st.corrector_order, j + 1) if st.corrector != "none" else st.corrector_order)
        for j, st in enumerate(schedule.steps[first:]))
    return replace(schedule, t_start=schedule.times[first], steps=steps,
                   name=f"{schedule.name or 'schedule'}@{strength:g}")


def steps_for_strength(nfe: int, strength: float, flow: bool = False) -> int:
    """The num_inference_steps at which an image-to-image pipeline at ``strength`` runs ``nfe`` steps
    (the smallest N whose ``kept_steps`` is nfe)."""
    if not 0 < strength <= 1:
        raise ScheduleError("strength", f"must be in (0, 1], got {strength!r}")
    n = max(1, int(nfe / strength) - 1)
    while kept_steps(n, strength, flow) < nfe:
        n += 1
    if kept_steps(n, strength, flow) != nfe:
        raise ScheduleError("strength", f"no step count runs exactly {nfe} steps at strength {strength:g}")
    return n


def img2img_peers(noise: NoiseSchedule, nfe: int, strength: float) -> tuple[float, list[Schedule]]:
    """(the start time a search at this strength uses, every named schedule as an img2img pipeline runs it).

    The start time is that of the multistep schedulers' linspace grid cut at ``strength`` (the one most
    peers share); a peer with another grid (ddim's trailing one) starts elsewhere and is scored from its own
    start, on the same images and noise."""
    flow = isinstance(noise, FlowMatching)  # its img2img pipelines (SD3, Flux) cut as flow pipelines do
    total = steps_for_strength(nfe, strength, flow)
    peers = [for_strength(build(name, noise, total), strength, flow) for name in names_for(noise)]
    t_start = for_strength(build("dpmsolver++2m", noise, total), strength, flow).t_start
    return t_start, peers


def names_for(noise: NoiseSchedule) -> list[str]:
    """The named schedules that apply to a model with this noise schedule (flow ones only for flow models, Karras
    ones for the others: a flow model's sigma at T is infinite)."""
    names = list(NAMED) + list(SIGMA_MIN_NAMED)
    return names + list(FLOW_NAMED if isinstance(noise, FlowMatching) else KARRAS_NAMED)


def build(name: str, noise: NoiseSchedule, nfe: int, final: Optional[str] = None) -> Schedule:
    """A named schedule at ``nfe`` model evaluations, ending where ``final`` says (None: where the name says, 0 but
    for the SIGMA_MIN_NAMED ones).

    Example:
        >>> from autotune.sampling.noise import VPLinear
        >>> build("unipc-bh2-o3", VPLinear(), 6).nfe
        6
    """
    if name not in ALL_NAMED:
        raise ScheduleError("name", f"unknown schedule {name!r} (one of {', '.join(ALL_NAMED)})")
    if not isinstance(nfe, int) or nfe < 1:
        raise ScheduleError("nfe", f"must be an integer >= 1, got {nfe!r}")
    if final is None:
        return ALL_NAMED[name](noise, nfe)
    if final not in FINALS:
        raise ScheduleError("final", f"must be one of {', '.join(FINALS)}, got {final!r}")
    return ALL_NAMED[name](noise, nfe, final)
