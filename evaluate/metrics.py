"""Metrics of one schedule on one evaluation set, computed in one pass over its samples.

``mse_ref``: mean squared error of the final samples against the reference solution from the same noise
(the figure DPM-Solver-v3 and DC-Solver report); ``traj_err``: mean squared error of the states at the
schedule's times against the reference trajectory (interpolated in lambda); ``nfe``: model calls made;
``seconds``: wall time of the sampling; a model may add distribution metrics through ``data_metrics``.
A schedule whose state becomes NaN or inf scores as diverged, with the step where it happened.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from autotune.evaluate.reference import Reference
from autotune.evaluate.sets import EvalSet
from autotune.sampling.denoiser import Denoiser
from autotune.sampling.executor import sample
from autotune.space.schedule import Schedule

from autotune.evaluate.ids import METRIC_VERSION  # noqa: E402,F401  (one place for the version)


def score(
    model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Run the schedule on the set's noise and compare with the reference; never raises on divergence."""
    noise = eval_set.noise(dtype)
    start = time.perf_counter()
    result = sample(model, schedule, noise, eval_set.labels(), keep_states=True, check_finite=True)
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {"nfe": result.nfe, "seconds": seconds, "diverged": result.diverged_at is not None,
                               "diverged_at": result.diverged_at}
    if result.diverged_at is not None:
        metrics.update(mse_ref=math.inf, traj_err=math.inf)
        return metrics
    final = result.sample.double()
    per_sample = ((final - reference.final.double()) ** 2).flatten(1).mean(1)
    metrics["mse_ref"] = float(per_sample.mean())
    # the mean can be carried by one sample that lands in another mode; the median shows the typical sample
    metrics["mse_ref_median"] = float(per_sample.median())
    errors = [
        float(((state.double() - reference.state_at(model.noise, t).double()) ** 2).mean())
        for state, t in zip(result.states[1:], schedule.times[1:])
    ]
    metrics["traj_err"] = sum(errors) / len(errors)
    data_metrics = getattr(model, "data_metrics", None)
    if callable(data_metrics):
        metrics.update(data_metrics(result.sample, eval_set.labels()))
    return metrics
