"""Measured sampling latency of a schedule: the ``latency_ms`` objective and the stage-2 latency budget.

The figure is the time of :func:`autotune.sampling.executor.sample` on a fixed small batch (the first ``batch``
noises and labels of the evaluation set) on the machine and process that measure it, i.e. on the evaluating
worker: one warm-up run, then the median of ``repeats`` runs, in milliseconds. It includes the plan's coefficient
computation and every model call with the step's skip mask, so skipping units, fewer steps or a cheaper solver
all show up. The clock (``LatencySpec.clock``, evaluate/clock.py): by default the process's CPU time where the
model runs on the CPU in one thread (a search's workers do), which the machine's other load does not inflate,
else the wall clock. It is not cached (it belongs to the machine, not to the schedule); compare only figures
measured by the same worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autotune.evaluate.clock import median_seconds, module_device, resolve_clock
from autotune.evaluate.sets import EvalSet
from autotune.sampling.denoiser import Denoiser
from autotune.sampling.executor import sample
from autotune.space.schedule import Schedule

LATENCY = "latency_ms"  # the objective's name


@dataclass(frozen=True)
class LatencySpec:
    """How latency is measured: batch size, timed runs (median taken), warm-up runs and the clock
    (evaluate/clock.py: ``auto``, ``wall`` or ``cpu``)."""

    batch: int = 8
    repeats: int = 5
    warmup: int = 1
    clock: str = "auto"


def measure_latency(model: Denoiser, schedule: Schedule, eval_set: EvalSet, spec: LatencySpec = LatencySpec(),
                    dtype: torch.dtype = torch.float32) -> float:
    """Median time in ms (``spec.clock``) of sampling ``schedule`` on the set's first ``spec.batch`` noises, on
    this worker."""
    noise = eval_set.noise(dtype)[: spec.batch]
    labels = eval_set.conditions()
    cond = labels[: spec.batch] if labels is not None else None
    device = module_device(model)
    with torch.no_grad():
        return 1000.0 * median_seconds(lambda: sample(model, schedule, noise, cond), spec.repeats, spec.warmup,
                                       resolve_clock(spec.clock, device), device)
