"""How many noises the search and validation sets hold when the user leaves it to the job.

The defaults (128 search noises, 512 validation noises: evaluate/ids.py's DEFAULT_SIZE) are what a network
costs. A model whose sampling costs next to nothing (an analytic mixture, a toy network) can afford far more,
and there the extra noises buy the tail: on ``gmm64`` a few per cent of samples switch mixture component under
a few-step schedule, so the 99th percentile of the per-sample error is a threshold on that share, which 128
noises cannot see and 512 cannot choose on. Measured with the default job (NFE 4, 5, 6 x seeds 0-2, graded on
1024 report noises, ratios ours / best named schedule, geometric means; scratch runs, 2026-12-04):

    search / validation noises   mean   p99    p99 no worse than the best named
    128 / 512 (the defaults)     0.24   1.44   2 of 9
    512 / 512                    0.28   0.83   5 of 9
    128 / 4096                   0.22   1.14   3 of 9
    512 / 4096 (cheap models)    0.21   0.65   6 of 9

So a model counts as cheap when one run of a named schedule on ``PROBE_NOISES`` noises (the probe, timed after
a warm-up run) projects the search loop on the larger search set under ``CHEAP_SEARCH_SECONDS``; it then gets
``CHEAP_SIZES``. gmm64 projects about 6 s, the ``digits`` UNet 12 to 17 minutes (the machine's load), so the
line sits far from both. A size the user gives (``--set-size``, ``--validate``) is kept as given.

What the cheap sizes still left was the tail at the report set's 99th percentile: the searched schedules' samples
switch component about 1 % of the time, so their p99 was either the typical error or a switch's (0.2-0.3) by
the luck of the set (gmm64 NFE 6: the refined ipndm start switched 0.76 % of 4096 validation noises, p99 0.006,
and 1.27 % of the 1024 report noises, p99 0.22). The gradient refinement is what moves those samples, and its
loss saw only the 4-5 switches among 512 noises; fitted on 2048 (``CHEAP_SIZES["refine"]``, a search-kind set of
its own: the search loop keeps 512) the same start refined to p99 0.009 on the report set. `bench/search.py
--models gmm64 --nfe 5,6,8 --seed S`, seeds 0-2 (geometric mean of ours / best diffusers peer, 1024 report noises,
session 26):

    refinement set    mean    p99     p99 no worse than the best peer    search wall
    512 (before)      0.218   0.447   5 of 9                            15-31 s
    2048              0.210   0.127   9 of 9                            17-52 s

(SWD no worse than the best peer in all 18 rows either way.) A search set the user sizes is also the
refinement's: ``refine`` 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from autotune.evaluate.ids import DEFAULT_SIZE

PROBE_NOISES = 8
# the probe's answer is the least of up to PROBE_REPEATS runs on PROBE_NOISES noises, taken while they have cost
# under PROBE_REPEAT_SECONDS in all: a run of gmm64 takes about a millisecond, and on a busy machine one
# descheduling (about 4 ms) made it look 5x dearer: measured with two benchmarks on the 2 cores, 5 of 40 single
# runs projected gmm64 over the cheap line (1.09-5.44 ms), and that job then searched the default sets, not the
# cheap ones (`autotune search --model gmm64 --nfe 6`: 3.09x the best named schedule where the cheap sets gave
# 6.41x). The digits UNet (0.09 s a run, ddim NFE 5 under the same load) gets three: 0.45 s for the whole probe.
PROBE_REPEATS = 5
PROBE_REPEAT_SECONDS = 0.25
CHEAP_SEARCH_SECONDS = 30.0
CHEAP_SIZES = {"search": 512, "validation": 4096, "refine": 2048}
FIRST_RUN_LIMIT = 0.05  # seconds: a warm one-noise run slower than this ends the probe (see probe)


@dataclass(frozen=True)
class SetSizes:
    """The sizes a job uses; ``cheap`` when the probe (``probe_seconds``, None: not measured) chose them."""

    search: int
    validation: int
    cheap: bool = False
    probe_seconds: Optional[float] = None
    refine: int = 0  # noises of the gradient refinement's own search-kind set (0: the search set's)


def projected_search_seconds(probe_seconds: float, budget: int, search_size: int) -> float:
    """The search loop's sampling time on ``search_size`` noises, from a probe on PROBE_NOISES: linear in the
    noises (an overestimate for a model whose cost is per-call overhead, so a cautious one)."""
    return budget * probe_seconds * search_size / PROBE_NOISES


def choose_sizes(probe_seconds: Optional[float], budget: int, set_size: int, validate: Optional[int]) -> SetSizes:
    """The sizes for a probe (None: not measured, the defaults), the budget, and what the user gave
    (``set_size`` 0 and ``validate`` None: left to the job; ``validate`` 0: no validation)."""
    cheap = (probe_seconds is not None
             and projected_search_seconds(probe_seconds, budget, CHEAP_SIZES["search"]) <= CHEAP_SEARCH_SECONDS)
    sizes = CHEAP_SIZES if cheap else DEFAULT_SIZE
    refine = 0 if set_size else sizes.get("refine", 0)  # a search set the user sized is also what the refinement fits
    return SetSizes(set_size or sizes["search"], sizes["validation"] if validate is None else validate, cheap,
                    probe_seconds, refine)


def probe(model: Any, schedule: Any, eval_set: Any) -> float:
    """Seconds one run of ``schedule`` takes on the first PROBE_NOISES noises of ``eval_set``, without gradients,
    on one thread (as a Ray worker scores candidates; on a busy machine more threads only wait). Runs on one noise
    come first (the first one warms up); when a warm one still takes over FIRST_RUN_LIMIT the model is far from
    cheap (a latent pipeline on a CPU: seconds) and PROBE_NOISES times it is the answer."""
    import torch

    from autotune.predictors.s3 import one_thread
    from autotune.sampling.executor import sample

    noise = eval_set.noise(torch.float32)[:PROBE_NOISES]
    labels = eval_set.conditions()

    def timed(n: int) -> float:
        started = time.perf_counter()
        sample(model, schedule, noise[:n], None if labels is None else labels[:n])
        return time.perf_counter() - started

    with one_thread(), torch.no_grad():
        return _probe_runs(timed)


def _probe_runs(timed: Any) -> float:
    """The probe's runs (see probe): ``timed(n)`` times one run on the first n noises; the full probe's answer is
    the least of its runs (PROBE_REPEATS: why)."""
    one = timed(1)
    if one > FIRST_RUN_LIMIT:
        one = timed(1)
    if one > FIRST_RUN_LIMIT:
        return one * PROBE_NOISES
    runs = [timed(PROBE_NOISES)]
    while len(runs) < PROBE_REPEATS and sum(runs) < PROBE_REPEAT_SECONDS:
        runs.append(timed(PROBE_NOISES))
    return min(runs)
