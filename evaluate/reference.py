"""Reference trajectories: the ODE solved to high accuracy from an evaluation set's noise.

The solution uses UniPC (bh2, UniP-3 predictor + UniC-3 corrector, local order 5) on a lambda-uniform grid
of many steps from T to t_min, then one data-prediction step onto t = 0; a second solver of another family
(UniP-3 without corrector, 1.5x the steps, on the first 32 noises) checks it, and the check's figure is
stored with the reference.
(DPM-Solver++ 3M in diffusers' form is only second order, see tests/test_convergence.py, so it is not used.) States are kept on a dense grid so that
a trajectory loss at any schedule's times is read by linear interpolation in lambda.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from autotune.evaluate.progress import ProgressFn, report
from autotune.evaluate.sets import EvalSet
from autotune.sampling.denoiser import Denoiser
from autotune.sampling.executor import sample, sample_in_chunks
from autotune.sampling.noise import NoiseSchedule
from autotune.space.schedule import Schedule, Step

from autotune.evaluate.ids import REF_VERSION  # noqa: E402  (one place for the version)
CHECK_SAMPLES = 32


@dataclass
class Reference:
    """Dense states of the reference solution (times decreasing, the last one t = 0) and its check."""

    times: torch.Tensor  # (M,)
    states: torch.Tensor  # (M, B, ...)
    check_max_abs: float  # max |ref - second solver| on the final samples
    check_mse: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]

    def state_at(self, noise: NoiseSchedule, t: float) -> torch.Tensor:
        """The reference state at time t, linearly interpolated in lambda between stored states."""
        if t <= 0.0:
            return self.final
        lam = noise.lambda_(self.times[:-1].double())  # increasing; the last stored time is t = 0
        target = noise.lambda_(torch.tensor(float(t), dtype=torch.float64))
        i = int(torch.searchsorted(lam, target.reshape(1)).clamp(1, len(lam) - 1))
        w = float(((target - lam[i - 1]) / (lam[i] - lam[i - 1])).clamp(0.0, 1.0))
        return (1.0 - w) * self.states[i - 1] + w * self.states[i]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"times": self.times.numpy(), "states": self.states.numpy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "Reference":
        return cls(torch.from_numpy(arrays["times"]), torch.from_numpy(arrays["states"]),
                   float(meta["check_max_abs"]), float(meta["check_mse"]), meta)


def lambda_uniform_schedule(noise: NoiseSchedule, steps: int, order: int, solver: str = "dpm",
                            corrector: str = "none", t_start: float | None = None) -> Schedule:
    """A fine solver on a lambda-uniform grid from T (or ``t_start``) to t_min, then a first-order step onto 0."""
    t0 = noise.T if t_start is None else float(t_start)
    lam = torch.linspace(float(noise.lambda_(torch.tensor(t0, dtype=torch.float64))),
                         float(noise.lambda_(torch.tensor(noise.t_min, dtype=torch.float64))), steps + 1,
                         dtype=torch.float64)
    times = noise.t_of_lambda(lam).tolist()
    times[0], times[-1] = t0, noise.t_min
    out = []
    for k, t in enumerate(times[1:]):
        o = min(order, k + 1)
        out.append(Step(t, order=o, solver=solver, corrector=corrector, corrector_order=o if corrector != "none" else 0))
    out.append(Step(0.0, order=1, solver=solver))
    return Schedule(t0, tuple(out), name=f"reference-{solver}-{steps}")


def compute_reference(
    model: Denoiser, eval_set: EvalSet, guidance: float | None = None, steps: int = 100, keep_every: int = 1,
    dtype: torch.dtype = torch.float32, progress: ProgressFn | None = None,
    t_start: float | None = None, start: torch.Tensor | None = None, sampler: Any = None,
) -> Reference:
    """Solve the ODE from the set's noise; check against a second solver with 1.5x the steps.

    With ``t_start`` and ``start`` (image-to-image) both solve from the state ``start`` at ``t_start``.
    ``progress`` hears of every step of both solvers (task "reference, <kind> set"). ``sampler`` runs the main
    solve instead of ``sample_in_chunks`` (same signature: a Ray pool's workers, search/runner.py)."""
    noise = eval_set.noise(dtype)
    cond = eval_set.conditions()
    main = lambda_uniform_schedule(model.noise, steps, 3, solver="unip-bh2", corrector="bh2", t_start=t_start)
    main = Schedule(main.t_start, main.steps, guidance=guidance, name=main.name)
    check = lambda_uniform_schedule(model.noise, (3 * steps) // 2, 3, solver="unip-bh2", t_start=t_start)
    check = Schedule(check.t_start, check.steps, guidance=guidance, name=check.name)
    # the check is a figure of accuracy, not the reference itself: the first CHECK_SAMPLES noises suffice
    n, size = min(CHECK_SAMPLES, noise.shape[0]), noise.shape[0]
    # progress in sample-steps, so that the bar moves with the work (the check is the smaller part)
    task, solved = f"reference, {eval_set.kind} set", len(main.steps) * size
    total = solved + len(check.steps) * n
    report(progress, task, 0, total)
    done = 0

    def count(k: int, x: torch.Tensor) -> None:  # every slice's steps (sample_in_chunks)
        nonlocal done
        done += x.shape[0]
        report(progress, task, done, total)

    result = (sampler or sample_in_chunks)(model, main, noise, cond, keep_states=True, start=start, callback=count)
    other = sample(model, check, noise[:n], None if cond is None else cond[:n],
                   start=None if start is None else start[:n],
                   callback=lambda k, _: report(progress, task, solved + (k + 1) * n, total)).sample
    report(progress, task, total, total)  # done, whatever steps a final denoise adds
    keep = list(range(0, len(main.times) - 1, keep_every)) + [len(main.times) - 1]
    times = torch.tensor([main.times[i] for i in keep], dtype=torch.float64)
    states = torch.stack([result.states[i] for i in keep]).to(torch.float32)
    diff = (result.sample[:n] - other).double()
    meta = {"ref_version": REF_VERSION, "solver": main.name, "check_solver": check.name, "steps": steps,
            "guidance": guidance, "eval_set": eval_set.id, "nfe": result.nfe, "t_start": main.t_start,
            "check_max_abs": float(diff.abs().max()), "check_mse": float((diff**2).mean())}
    return Reference(times, states, meta["check_max_abs"], meta["check_mse"], meta)
