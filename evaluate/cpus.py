"""Torch threads for the CPUs other processes leave free.

torch's CPU kernels run on OpenMP threads that spin while they wait for each other. With one thread per core
and another process busy on one of the cores, every parallel region waits for the thread that lost its core:
on a 2-core machine with one benchmark beside it, a digits forward pass at batch 128 took 440 ms on torch's
default 2 threads and 140 ms on 1 (74 ms on 2 with the machine idle), and the README's search spent 119 s on
a reference solution that takes 6 s idle (8.3 s with this). So before each long step the job runs the main
process on as many threads as there are CPUs not busy with other processes, never more than the count torch
had when first asked or than the user set since (``torch.set_num_threads`` or ``OMP_NUM_THREADS`` is a
ceiling).

Linux only (``/proc/stat``); elsewhere the thread count is left as it is. A step's floating-point sums may then
differ in their last bits with the machine's load (torch splits a reduction by its thread count).
"""

from __future__ import annotations

import os
import time
from typing import Optional

STAT = "/proc/stat"
WINDOW_S = 0.2  # long enough for ~20 scheduler ticks per CPU at USER_HZ 100, short beside any step it precedes

_ceiling: Optional[int] = None  # the most threads to use: torch's count before this module first changed it
_last_set: Optional[int] = None  # the count this module last set (another count now: the user set it)


def cpu_ticks(cpus: frozenset[int], path: str = STAT) -> Optional[tuple[int, int]]:
    """Ticks the CPUs ``cpus`` spent busy and in total since boot (their ``cpuN`` lines: in a container the
    file shows the host's CPUs, of which only those this process may run on matter); None where unreadable."""
    try:
        with open(path) as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    busy = total = 0
    for fields in lines:
        if fields[0] == "cpu" or int(fields[0][3:]) not in cpus or len(fields) < 6:
            continue
        # user nice system idle iowait irq softirq steal; guest time is already inside user and nice
        ticks = [int(v) for v in fields[1:9]]
        busy += sum(ticks) - ticks[3] - ticks[4]
        total += sum(ticks)
    return (busy, total) if total else None


def other_processes_cpus(cpus: frozenset[int], window_s: float = WINDOW_S, path: str = STAT) -> Optional[float]:
    """How many of the CPUs ``cpus`` processes other than this one kept busy over the next ``window_s`` seconds;
    None where it cannot be read."""
    first = cpu_ticks(cpus, path)
    own_first = sum(os.times()[:2])
    time.sleep(window_s)
    last = cpu_ticks(cpus, path)
    own_last = sum(os.times()[:2])
    if first is None or last is None:
        return None
    return busy_cpus_of_others(first, last, own_last - own_first, window_s, len(cpus))


def busy_cpus_of_others(first: tuple[int, int], last: tuple[int, int], own_seconds: float, window_s: float,
                        n_cpus: int) -> Optional[float]:
    """The CPUs busy between two (busy, total) tick readings of ``n_cpus`` CPUs ``window_s`` seconds apart, less
    the ``own_seconds`` of CPU time this process took in between; None where no tick passed."""
    if last[1] <= first[1]:
        return None
    busy_share = (last[0] - first[0]) / (last[1] - first[1])
    return max(0.0, busy_share * n_cpus - own_seconds / window_s)


def threads_for(other_cpus: float, usable_cpus: int, ceiling: int) -> int:
    """Threads for this process: the usable CPUs others leave free, rounded, at least 1, at most ``ceiling``."""
    return max(1, min(ceiling, round(usable_cpus - other_cpus)))


def fit_threads_to_free_cpus(window_s: float = WINDOW_S) -> Optional[int]:
    """Set torch's thread count to the CPUs other processes leave free and return it; None (nothing changed)
    where the load cannot be read."""
    import torch

    global _ceiling, _last_set
    if _ceiling is None or torch.get_num_threads() != _last_set:
        _ceiling = torch.get_num_threads()  # first call, or the user's torch.set_num_threads since
    try:
        cpus = frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no /proc/stat either
        return None
    others = other_processes_cpus(cpus, window_s)
    if others is None:
        return None
    threads = threads_for(others, len(cpus), _ceiling)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    _last_set = threads
    return threads
