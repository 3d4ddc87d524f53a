"""Named hand-designed schedules, built as data in the unified format.

Every one starts at T and never clips x0. On a discrete (DDPM) noise schedule they reproduce the diffusers
scheduler of the same name: ``ddim`` = DDIMScheduler(timestep_spacing="trailing", clip_sample=False);
the others = the multistep scheduler with ``timestep_spacing="linspace"`` and its default lower-order
warm-up and final steps. On continuous schedules the same spacing rules are applied to t.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from autotune.errors import ScheduleError
from autotune.sampling.noise import NoiseSchedule, VPDiscrete
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


def _dpmsolver_pp(order: int) -> Callable[..., Schedule]:
    def build(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
        times = linspace_times(noise, nfe, final)
        steps = []
        for k, t in enumerate(times[1:]):
            o = min(order, k + 1)
            if k == nfe - 1 and (nfe < 15 or final == "zero"):
                o = 1  # diffusers' lower_order_final (always when the last step goes to sigma = 0)
            elif k == nfe - 2 and nfe < 15:
                o = min(o, 2)
            steps.append(Step(t, order=o, solver="dpm", prediction="data"))
        return _schedule(f"dpmsolver++{order}m", times, steps)

    build.__doc__ = f"DPM-Solver++ {order}M (data prediction, midpoint form) on linspace spacing."
    return build


def _unipc(variant: str, order: int) -> Callable[..., Schedule]:
    def build(noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
        times = linspace_times(noise, nfe, final)
        steps = []
        for k, t in enumerate(times[1:]):
            o = min(order, nfe - k, k + 1)
            last = k == nfe - 1
            steps.append(
                Step(
                    t,
                    order=o,
                    solver=f"unip-{variant}",
                    prediction="data",
                    corrector="none" if last else variant,
                    corrector_order=0 if last else o,
                )
            )
        return _schedule(f"unipc-{variant}-o{order}", times, steps)

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
    "unipc-bh2-o2": _unipc("bh2", 2),
    "unipc-bh2-o3": _unipc("bh2", 3),
    "ipndm": ipndm,
}


def build(name: str, noise: NoiseSchedule, nfe: int, final: str = "zero") -> Schedule:
    """A named schedule at ``nfe`` model evaluations.

    Example:
        >>> from autotune.sampling.noise import VPLinear
        >>> build("unipc-bh2-o3", VPLinear(), 6).nfe
        6
    """
    if name not in NAMED:
        raise ScheduleError("name", f"unknown schedule {name!r} (one of {', '.join(NAMED)})")
    if not isinstance(nfe, int) or nfe < 1:
        raise ScheduleError("nfe", f"must be an integer >= 1, got {nfe!r}")
    if final not in FINALS:
        raise ScheduleError("final", f"must be one of {', '.join(FINALS)}, got {final!r}")
    return NAMED[name](noise, nfe, final)
