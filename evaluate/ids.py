"""Identifiers of evaluations and their JSON form, without torch (the cached fast path of `autotune eval`)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any
from pathlib import Path

REF_VERSION = "ref2"  # bump when the reference solver changes
# m2: model data metrics (fd, class_acc, nll, swd); m3: mse_ref_median; m4: mse_ref_ci_low/high (bootstrap),
# mse_ref_p99, mse_ref_cvar and the per-sample errors (PER_SAMPLE); m5: the mixtures' nll became nll_gap (the
# distance to the data's NLL: a lower NLL rewarded samples collapsed onto the modes)
METRIC_VERSION = "m5"
PER_SAMPLE = "mse_ref_per_sample"  # per-sample errors (base64 float32): for paired comparisons, not for display
# a report-set row's distribution metrics on DIST_RESAMPLES bootstrap resamples ({metric: base64 float32}), drawn on
# the same index sets for every schedule of that set size: two rows give a paired interval of their difference
DATA_DRAWS = "data_metric_draws"
MAXIMIZED = frozenset({"class_acc"})  # metrics the evaluator reports where higher is better
# set sizes, fit for a 2-core CPU on `digits`; the report set is large enough that a bootstrap interval of the
# mean separates 2x from 1.3x (at 256 one sample switching mode could double the mean)
DEFAULT_SIZE = {"search": 128, "report": 1024, "validation": 512}
DEFAULT_REF_STEPS = 100
# Few-step schedules are scored against a coarser reference. At 40 steps the reference's own error (mean squared
# difference from a 300-step solve, bench/ref_steps.py) was 1.0 % of unipc-bh2-o2's NFE-5 error on digits-flow,
# 0.8 % on the 32x32 RGB v model, 0.3 % on the eps one and under 0.1 % on digits (guidance 0 and 4) and gmm64. On
# the RGB models 100 steps did little better (their references stop converging near 1e-4, perhaps because their
# networks were trained only at integer timesteps). Not so on the eps model under SD 1.x's schedule (rgb32-eps-sd,
# 64 noises, 2026-12-06): 40 / 100 steps 9.8e-6 / 4.6e-7 from the 300-step solve, 0.45 % / 0.02 % of unipc-bh2-o2's
# NFE-10 error. 40 steps cost 40 % of 100, and references are most of a short search's time.
FEW_STEP_NFE = 6
FEW_STEP_REF_STEPS = 40


def direction(name: str) -> str:
    """"maximize" for the metrics where higher is better, "minimize" for every other figure."""
    return "maximize" if name in MAXIMIZED else "minimize"


def ref_steps_for(nfe: int) -> int:
    """Steps of the reference that schedules of ``nfe`` evaluations are scored against."""
    return FEW_STEP_REF_STEPS if nfe <= FEW_STEP_NFE else DEFAULT_REF_STEPS


def metrics_json(metrics: dict[str, Any]) -> str:
    """Metrics as strict JSON, with inf/NaN spelled as strings."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            return str(v)
        return v

    return json.dumps({k: clean(v) for k, v in metrics.items()}, sort_keys=True)


def eval_set_id(kind: str, seed: int, size: int, sample_shape, num_classes: int | None) -> str:
    shape = "x".join(str(int(d)) for d in sample_shape)
    classes = f"-c{num_classes}" if num_classes else ""
    return f"{kind}-s{seed}-n{size}-{shape}{classes}"


def ref_version(guidance: float | None, ref_steps: int, t_start: float | None = None) -> str:
    """The reference's identity; ``t_start`` for an image-to-image reference (solved from the set's images noised
    to t_start instead of from pure noise at T)."""
    start = "" if t_start is None else f"-from{float(t_start)!r}"
    return f"{REF_VERSION}-g{guidance}-k{ref_steps}{start}"


def model_memo_key(spec: str) -> str:
    """A key that changes whenever the files behind a MODEL argument change (path, size, mtime), so a memo
    of the model's fingerprint under it can be trusted without loading the weights."""
    from autotune import __version__

    h = hashlib.sha256(f"{__version__}|{spec}".encode())
    root = Path(spec)
    if not root.is_dir():  # a built-in: its weights ship in the package
        root = Path(__file__).resolve().parent.parent / "models" / "weights"
    else:
        h.update(str(root.resolve()).encode())
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{dirpath}/{name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return "model-memo:" + h.hexdigest()[:24]
