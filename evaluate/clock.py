"""Which clock times a run: the wall clock, or this process's CPU time where both measure the same work.

A run on the CPU with one compute thread spends its wall time computing or waiting for a core. On an idle machine
the two clocks agree; on a shared one the waiting grows with the run's length, so the least (or median) wall time
of a long run is inflated more than a short one's and comparisons tilt. Measured on this project's 2-core VM, a
benchmark on each core and the timing process beside them (interleaved rounds, least of 9; scratch, session 44):
the same network called K times in one ONNX Runtime graph timed 14.6 ms per call at K = 6 and 17.2-19.8 ms at
K = 10-12 by the wall clock, 14.1-14.3 ms at every K in CPU time; the digits engine at NFE 8 (batch 1) timed
1.14x NFE bare forwards by the wall clock and 1.07-1.09x in CPU time; an NFE-10 reuse pattern with six full calls
timed 1.80x faster than unpruned in its engine by the wall clock, more than the NFE-6 engine without reuse can
be (1.63x in CPU time), and 1.39-1.42x in CPU time.

So ``auto`` takes CPU time where the work runs on the CPU in one thread (the figure a dedicated core would show,
without the machine's other load), and the wall clock otherwise: with several threads CPU time sums them, and a
GPU's work is not this process's CPU time. CPU time counts every thread of the process (``time.process_time``), so
a helper thread's work is never left out; a GPU run is synchronised before the wall clock is read. CPU time still
holds what other processes cost a run through the shared caches and memory bandwidth (memory-bound work, such as a
UNet's full-resolution layers, more than the rest): figures that must hold on a dedicated machine are measured on an
idle one.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from autotune.errors import InputError

CLOCKS = ("auto", "wall", "cpu")


def resolve_clock(clock: str, device: Any = "cpu", threads: int | None = None) -> str:
    """``wall`` or ``cpu`` for ``clock`` (one of CLOCKS); ``auto``: ``cpu`` for a run on the CPU device with one
    thread (``threads``, default torch's intra-op thread count), else ``wall``."""
    if clock not in CLOCKS:
        raise InputError(f"clock {clock!r}: one of {', '.join(CLOCKS)}")
    if clock != "auto":
        return clock
    threads = torch.get_num_threads() if threads is None else threads
    return "cpu" if torch.device(device).type == "cpu" and threads == 1 else "wall"


def module_device(model: Any) -> torch.device:
    """The device of the model's first parameter (a Denoiser's ``module``), the CPU when it has none."""
    module = getattr(model, "module", model)
    params = getattr(module, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def timed_seconds(fn: Callable[[], Any], clock: str, device: Any = "cpu") -> float:
    """Seconds of one call of ``fn`` on the resolved ``clock`` (``wall`` or ``cpu``); on a CUDA device the wall clock
    is read after the device finishes the call's work."""
    if clock == "cpu":
        started = time.process_time()
        fn()
        return time.process_time() - started
    if clock != "wall":
        raise InputError(f"clock {clock!r}: resolve it first (wall or cpu)")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1, clock: str = "wall",
                   device: Any = "cpu") -> float:
    """Median time of ``fn()`` on the resolved ``clock`` (wall or cpu) over ``repeats`` calls after ``warmup`` untimed
    ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_seconds(fn, clock, device) for _ in range(repeats))


def clock_words(clock: str) -> str:
    """How a table names the resolved ``clock``."""
    return {"cpu": "this process's CPU time", "wall": "wall clock"}[clock]
