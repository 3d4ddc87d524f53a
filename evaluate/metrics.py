"""Metrics of one schedule on one evaluation set, computed in one pass over its samples.

``mse_ref``: mean squared error of the final samples against the reference solution from the same noise
(the figure DPM-Solver-v3 and DC-Solver report), with the spread of the per-sample error around it:
``mse_ref_ci_low`` / ``mse_ref_ci_high`` (bootstrap 95 % interval of the mean), ``mse_ref_median``,
``mse_ref_p99`` and ``mse_ref_cvar`` (mean of the worst 5 % of samples: a tail objective); the per-sample
errors themselves travel as ``mse_ref_per_sample`` (float32, base64) so that two schedules scored on the
same noise can be compared sample by sample (:func:`ratio_interval`). ``traj_err``: mean squared error of
the states at the schedule's times against the reference trajectory (interpolated in lambda); ``nfe``:
model calls made; ``seconds``: wall time of the sampling; a model may add distribution metrics through
``data_metrics``. A schedule whose state becomes NaN or inf scores as diverged, with the step where it
happened.

The statistics are numpy only (torch is imported by :func:`score` alone), so tables and reports use them
without loading torch.
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autotune.evaluate.ids import DATA_DRAWS, METRIC_VERSION, PER_SAMPLE, direction  # noqa: F401  (one place)
from autotune.sampling.capabilities import capabilities_of

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from autotune.evaluate.reference import Reference
    from autotune.evaluate.sets import EvalSet
    from autotune.sampling.denoiser import Denoiser
    from autotune.space.schedule import Schedule

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0  # fixed: the same errors always give the same interval (cached rows stay reproducible)
CONFIDENCE = 0.95
# the distribution metrics' bootstrap on a report set (a refit per resample: digits' FD, 200 of them in about 0.5 s)
DIST_RESAMPLES = 200
TAIL_SHARE = 0.05  # mse_ref_cvar: the mean of this share of the worst samples

# the figures of the per-sample error; all inf when the schedule diverged
STOCHASTIC_SEED = 7919  # offset of the generator an SDE schedule draws on, from the evaluation set's seed
ERROR_FIGURES = ("mse_ref", "mse_ref_ci_low", "mse_ref_ci_high", "mse_ref_median", "mse_ref_p99", "mse_ref_cvar")


@dataclass(frozen=True)
class Screen:
    """Multi-fidelity scoring (a search's pruner): sample the first ``samples`` noises, and stop there when their
    mean error exceeds ``limit``; a candidate that passes is scored on the whole set, as without a screen.

    A stopped candidate's ``mse_ref`` is an estimate of its whole-set mean, its partial mean times ``scale`` (the
    search passes best-so-far whole-set mean / its mean on the same noises: a paired estimate), and its metrics say
    ``screened`` (the samples it saw) and ``mse_ref_screened`` (the partial mean itself)."""

    samples: int
    limit: float
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.samples < 1 or not self.limit > 0 or not self.scale > 0:  # NaN fails these too
            raise ValueError(f"Screen: expected samples >= 1 and a positive limit and scale, got {self}")


def bootstrap_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, n) sample indices drawn with replacement from a fixed-seed generator: deterministic, and
    the same draws for two vectors of the same length (a paired bootstrap)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(draws: np.ndarray) -> tuple[float, float]:
    """The percentile 95 % interval of a statistic's bootstrap draws."""
    return _interval(np.asarray(draws, dtype=np.float64))


def _interval(draws: np.ndarray) -> tuple[float, float]:
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(errors: np.ndarray) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the mean of ``errors``."""
    x = np.asarray(errors, dtype=np.float64)
    return _interval(x[bootstrap_indices(len(x))].mean(axis=1))


def ratio_interval(peer: np.ndarray, ours: np.ndarray, percentile: float | None = None) -> tuple[float, float]:
    """Paired-bootstrap 95 % interval of mean(peer) / mean(ours), or of the ratio of their ``percentile`` (99:
    the p99s), the two scored on the same noise (each resample takes the same samples from both, so the noise
    they share cancels)."""
    a, b = np.asarray(peer, dtype=np.float64), np.asarray(ours, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap: per-sample errors of different lengths ({len(a)} and {len(b)})")
    idx = bootstrap_indices(len(a))

    def statistic(draws: np.ndarray) -> np.ndarray:
        return draws.mean(axis=1) if percentile is None else np.percentile(draws, percentile, axis=1)

    with np.errstate(divide="ignore", invalid="ignore"):
        return _interval(statistic(a[idx]) / statistic(b[idx]))


def tail_mean(errors: np.ndarray, share: float = TAIL_SHARE) -> float:
    """Mean of the worst ``share`` of the samples (at least one): the conditional value at risk."""
    x = np.sort(np.asarray(errors, dtype=np.float64))
    k = max(1, math.ceil(share * len(x)))
    return float(x[-k:].mean())


def error_summary(errors: np.ndarray) -> dict[str, float]:
    """The ``ERROR_FIGURES`` of a vector of per-sample errors."""
    x = np.asarray(errors, dtype=np.float64)
    low, high = mean_interval(x)
    return {"mse_ref": float(x.mean()), "mse_ref_ci_low": low, "mse_ref_ci_high": high,
            # the mean can be carried by one sample that lands in another mode; the median shows the typical
            # sample, p99 and the tail mean the bad ones
            "mse_ref_median": float(np.median(x)), "mse_ref_p99": float(np.percentile(x, 99)),
            "mse_ref_cvar": tail_mean(x)}


def data_metric_draws(model: "Denoiser", samples: "torch.Tensor", labels: "torch.Tensor | None",
                      resamples: int = DIST_RESAMPLES) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(the model's distribution metrics of the whole set, their ``resamples`` bootstrap draws on
    :func:`bootstrap_indices` of the set's size): one ``data_metric_draws`` call, so the model's features are
    computed once for both, and any two sets of the same size are resampled alike (paired)."""
    n = len(samples)
    draws = model.data_metric_draws(samples, labels, np.vstack([np.arange(n)[None], bootstrap_indices(n, resamples)]))
    return {k: float(v[0]) for k, v in draws.items()}, {k: np.asarray(v[1:], np.float64) for k, v in draws.items()}


def excess(metric: str, ours: Any, peer: Any) -> Any:
    """How much worse ``ours`` is than ``peer`` in a distribution metric's units (> 0: worse), elementwise."""
    return peer - ours if direction(metric) == "maximize" else ours - peer


def excess_interval(metric: str, ours: np.ndarray, peer: np.ndarray) -> tuple[float, float]:
    """The 95 % interval of :func:`excess` from two schedules' draws on the same resamples (a paired bootstrap)."""
    a, b = np.asarray(ours, np.float64), np.asarray(peer, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap of {metric}: draws of different lengths ({len(a)} and {len(b)})")
    return bootstrap_interval(excess(metric, a, b))


def encode_errors(errors: np.ndarray) -> str:
    """Per-sample errors as base64 of little-endian float32 (4 bytes a sample in the store row)."""
    return base64.b64encode(np.asarray(errors, dtype="<f4").tobytes()).decode("ascii")


def decode_errors(text: str) -> np.ndarray:
    """The inverse of :func:`encode_errors`."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


def scored_by(schedule: Schedule) -> str:
    """The figure a schedule is judged by: ``mse_ref`` (per-sample distance to the reference ODE solution) for an
    ODE schedule, ``sliced_w`` (sliced Wasserstein distance of the sample set to the reference samples, and the
    model's own data metrics where it has them) for a stochastic one."""
    return "sliced_w" if schedule.stochastic else "mse_ref"


def score(
    model: Denoiser, schedule: Schedule, eval_set: EvalSet, reference: Reference, dtype: torch.dtype | None = None,
    start_state: torch.Tensor | None = None, screen: Screen | None = None, sampler: Any = None,
    data_draws: bool = False,
) -> dict[str, Any]:
    """Run the schedule on the set's noise (or from ``start_state`` at its t_start: image-to-image) and compare
    with the reference solved from the same start; never raises on divergence. With ``screen`` an ODE schedule
    may stop after the screen's first samples (:class:`Screen`: its metrics then say ``screened``). ``sampler``
    samples instead of ``sample_in_chunks`` (same signature: a Ray pool's workers, search/runner.py).
    ``data_draws``: a model that scores resamples (``data_metric_draws``) also gives its distribution metrics on
    DIST_RESAMPLES bootstrap resamples (``DATA_DRAWS``), for paired intervals between schedules."""
    import torch

    from autotune.evaluate.distribution import sliced_wasserstein
    from autotune.sampling.executor import join_results, sample_in_chunks

    noise = eval_set.noise(dtype or torch.float32)
    # an SDE schedule's own draws, seeded from the set so that scoring it twice gives the same figures
    generator = torch.Generator().manual_seed(STOCHASTIC_SEED + eval_set.seed) if schedule.stochastic else None
    cond, begin = eval_set.conditions(), None if start_state is None else start_state.to(noise.dtype)
    start = time.perf_counter()

    def run(part: slice) -> Any:
        return (sampler or sample_in_chunks)(model, schedule, noise[part], None if cond is None else cond[part],
                                             keep_states=True, check_finite=True,
                                             start=None if begin is None else begin[part], generator=generator)

    size = noise.shape[0]
    if screen is None or schedule.stochastic or screen.samples >= size:
        result = run(slice(None))
    else:
        head = run(slice(0, screen.samples))
        errors = _errors(head.sample, reference.final[: screen.samples])
        if head.diverged_at is not None or errors.mean() > screen.limit:
            return _screened(head, errors, screen, schedule, time.perf_counter() - start)
        result = join_results([head, run(slice(screen.samples, size))])
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {"nfe": result.nfe, "seconds": seconds, "diverged": result.diverged_at is not None,
                               "diverged_at": result.diverged_at, "scored_by": scored_by(schedule)}
    if result.diverged_at is not None:
        metrics.update({k: math.inf for k in ERROR_FIGURES}, traj_err=math.inf, sliced_w=math.inf)
        return metrics
    final = result.sample.double()
    # the distribution metric every schedule gets, so ODE and SDE schedules compare on one figure
    metrics["sliced_w"] = sliced_wasserstein(final, reference.final.double())
    if schedule.stochastic:
        # a draw of the SDE from x_T is not the ODE's solution from x_T: its distance to the reference sample of
        # the same noise measures the noise it added, not its error, so no per-sample figure is given
        metrics.update({k: math.nan for k in ERROR_FIGURES}, traj_err=math.nan)
    else:
        per_sample = _errors(final, reference.final)
        metrics.update(error_summary(per_sample))
        metrics[PER_SAMPLE] = encode_errors(per_sample)
        errors = [
            float(((state.double() - reference.state_at(model.noise, t).double()) ** 2).mean())
            for state, t in zip(result.states[1:], schedule.times[1:])
        ]
        metrics["traj_err"] = sum(errors) / len(errors)
    can = capabilities_of(model)
    if data_draws and can.data_metric_draws:
        figures, draws = data_metric_draws(model, result.sample, eval_set.labels())
        metrics.update(figures)
        metrics[DATA_DRAWS] = {k: encode_errors(v) for k, v in draws.items()}
    elif can.data_metrics:
        metrics.update(model.data_metrics(result.sample, eval_set.labels()))
    return metrics


def _errors(final: torch.Tensor, reference_final: torch.Tensor) -> np.ndarray:
    """Per-sample mean squared error (float64) of final samples against the reference's."""
    return ((final.double() - reference_final.double()) ** 2).flatten(1).mean(1).numpy()


def _screened(head: Any, errors: np.ndarray, screen: Screen, schedule: Schedule, seconds: float) -> dict[str, Any]:
    """The metrics of a candidate the screen stopped: its error figures on the samples it saw, its mean scaled
    into an estimate of the whole set's (diverged: inf, as a whole-set score would say)."""
    metrics: dict[str, Any] = {"nfe": head.nfe, "seconds": seconds, "diverged": head.diverged_at is not None,
                               "diverged_at": head.diverged_at, "scored_by": scored_by(schedule),
                               "screened": len(errors), "traj_err": math.nan, "sliced_w": math.nan}
    if head.diverged_at is not None:
        metrics.update({k: math.inf for k in ERROR_FIGURES}, mse_ref_screened=math.inf)
        return metrics
    metrics.update(error_summary(errors))
    metrics["mse_ref_screened"] = metrics["mse_ref"]
    metrics["mse_ref"] = metrics["mse_ref"] * screen.scale
    metrics[PER_SAMPLE] = encode_errors(errors)
    return metrics
