"""Measured sampling latency of a schedule: the ``latency_ms`` objective and the stage-2 latency budget.

The figure is the wall time of :func:`autotune.sampling.executor.sample` on a fixed small batch (the first
``batch`` noises and labels of the evaluation set) on the machine and process that measure it, i.e. on the
evaluating worker: one warm-up run, then the median of ``repeats`` runs, in milliseconds. It includes the
plan's coefficient computation and every model call with the step's skip mask, so skipping units, fewer
steps or a cheaper solver all show up. It is not cached (it belongs to the machine, not to the schedule) and
is noisy on a loaded machine; compare only figures measured by the same worker.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from autotune.evaluate.sets import EvalSet
from autotune.sampling.denoiser import Denoiser
from autotune.sampling.executor import sample
from autotune.space.schedule import Schedule

LATENCY = "latency_ms"  # the objective's name


@dataclass(frozen=True)
class LatencySpec:
    """How latency is measured: batch size, timed runs (median taken) and warm-up runs."""

    batch: int = 8
    repeats: int = 5
    warmup: int = 1


def measure_latency(model: Denoiser, schedule: Schedule, eval_set: EvalSet, spec: LatencySpec = LatencySpec(),
                    dtype: torch.dtype = torch.float32) -> float:
    """Median wall time in ms of sampling ``schedule`` on the set's first ``spec.batch`` noises, on this worker."""
    noise = eval_set.noise(dtype)[: spec.batch]
    labels = eval_set.conditions()
    cond = labels[: spec.batch] if labels is not None else None
    times = []
    with torch.no_grad():
        for i in range(spec.warmup + spec.repeats):
            start = time.perf_counter()
            sample(model, schedule, noise, cond)
            if i >= spec.warmup:
                times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)
