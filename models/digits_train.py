"""Training of the built-in ``digits`` UNet and of the digits classifier, on CPU.

Data: scikit-learn's ``load_digits()`` (1797 images, 8x8, values 0..16), upsampled bilinearly to 16x16
and scaled to [-1, 1]. One loop trains the built-in networks, which differ in the objective or the architecture:

- ``digits``: epsilon on the DDPM linear-beta schedule, at uniformly drawn training steps;
- ``digits-flow``: rectified flow, x_t = (1 - t) x0 + t eps, the network fed t * 1000 (``FlowMatching``)
  and regressed onto the velocity u = eps - x0, with t ~ U(0, 1) (see ``flow_loss`` for why uniform);
- ``digits-dit``: the same flow objective on a small DiT (models/digits_dit.py) instead of the UNet.

All use 12 % label dropout to the null class (for classifier-free guidance), AdamW with warm-up and
cosine decay, and an EMA of the weights (the EMA is what ships). Everything is seeded; progress goes
through ``log``.

    python -m autotune.models.digits_train --out models/weights --seed 0 --steps 1200 --threads 1
    python -m autotune.models.digits_train --model digits-flow --out models/weights --seed 0 --steps 1200 --threads 1
    python -m autotune.models.digits_train --only eval --grid docs/digits_grid.png   # accuracy + grid
    python -m autotune.models.digits_train --model digits-flow --only eval --grid docs/digits_flow_grid.png
    python -m autotune.models.digits_train --model digits-dit --out models/weights --seed 0 --steps 1600 --lr 1e-3 \
        --threads 1

The shipped weights were trained with ``--threads 1``: on a 2-core machine shared with other processes,
two torch threads made element-wise ops ~25x slower (thread barriers waiting on a busy core).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from autotune.errors import ModelError
from autotune.models import digits_dit, digits_flow
from autotune.models.digits import (
    CLASSIFIER_FILE, NOISE_CONFIG, NULL_CLASS, UNET_ARCH, UNET_FILE, DigitsClassifier, build_unet, digits_noise,
)

MODELS = ("digits", "digits-flow", "digits-dit")  # the networks train_digits can train (--model)
DEFAULT_LR = {"digits": 2e-3, "digits-flow": 2e-3, "digits-dit": 1e-3}  # peak learning rates the weights shipped with

Log = Callable[[str], None]


def _no_log(msg: str) -> None:
    """Default log: discard."""


def digits_data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 16, 16) images in [-1, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float64)[:, None] / 16.0 * 2.0 - 1.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    return x.to(dtype), torch.tensor(d.target, dtype=torch.long)


def split_indices(labels: torch.Tensor, held_out: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train, held-out) index split, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(held_out * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads, restoring the previous count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 5 % of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def diffusion_loss(model: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor, acp: torch.Tensor,
                   g: torch.Generator) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn training steps."""
    n = torch.randint(0, len(acp), (x0.shape[0],), generator=g)
    a = acp[n].sqrt()[:, None, None, None]
    s = (1.0 - acp[n]).sqrt()[:, None, None, None]
    eps = torch.randn(x0.shape, generator=g)
    return F.mse_loss(model(a * x0 + s * eps, n.to(x0.dtype), labels), eps)


def flow_loss(model: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rectified-flow velocity MSE: x_t = (1 - t) x0 + t eps, target u = eps - x0, network fed t * 1000.

    t ~ U(0, 1) rather than SD3's logit-normal: logit-normal(0, 1) puts 0.16 % of its draws above
    t = 0.95, yet every schedule starts at t = T ~ 1, where the velocity error passes one-for-one into the
    x0 estimate, and a searched schedule may place its steps anywhere in (0, 1]. This model is a benchmark
    for solver schedules, so it should be equally trained wherever a solver may ask; uniform draws are
    also what ``digits`` gets (uniform DDPM steps), so the two models differ only in the objective.
    """
    t = torch.rand(x0.shape[0], generator=g)
    eps = torch.randn(x0.shape, generator=g)
    tb = t[:, None, None, None]
    return F.mse_loss(model((1.0 - tb) * x0 + tb * eps, t * digits_flow.TIME_SCALE, labels), eps - x0)


def _objective(name: str) -> tuple[Callable, str, str, dict, Callable[[], torch.nn.Module]]:
    """(loss(model, x0, labels, g), weights file, record file, record fields, network builder) of the model
    ``name``."""
    flow_fields = {"noise": digits_flow.NOISE_CONFIG, "parameterization": "flow",
                   "time_sampling": "uniform t in [0, 1), fed to the network as t * 1000"}
    if name == "digits":
        acp = torch.tensor(digits_noise().alphas_cumprod, dtype=torch.float32)
        return ((lambda model, x0, labels, g: diffusion_loss(model, x0, labels, acp, g)), UNET_FILE,
                "digits_train.json", {"noise": NOISE_CONFIG, "parameterization": "epsilon", "arch": UNET_ARCH},
                build_unet)
    if name == "digits-flow":
        return (flow_loss, digits_flow.UNET_FILE, digits_flow.TRAIN_RECORD, {**flow_fields, "arch": UNET_ARCH},
                build_unet)
    if name == "digits-dit":
        return (flow_loss, digits_dit.DIT_FILE, digits_dit.TRAIN_RECORD, {**flow_fields, "arch": digits_dit.DIT_ARCH},
                digits_dit.build_dit)
    raise ModelError(f"train_digits: unknown model {name!r} (one of {', '.join(MODELS)})")


def _augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (padding with the background value -1)."""
    b = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    rows = torch.arange(16)[None, :] + dy[:, None]
    cols = torch.arange(16)[None, :] + dx[:, None]
    idx = torch.arange(b)[:, None, None]
    return pad[:, 0][idx, rows[:, :, None], cols[:, None, :]][:, None]


def _save(module: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Weights as float32 safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def _command(argv: list[str] | None) -> str:
    """The shell command that reproduces a run."""
    return "python -m autotune.models.digits_train " + " ".join(shlex.quote(a) for a in (argv or []))


def train_digits(out_dir: str | Path, seed: int = 0, steps: int = 1200, threads: int = 2, log: Log = _no_log, *,
                 batch: int = 128, lr: float | None = None, warmup: int = 100, label_dropout: float = 0.12,
                 ema_decay: float = 0.995, log_every: int = 50, argv: list[str] | None = None,
                 model_name: str = "digits") -> dict:
    """Train the UNet of ``model_name`` (``digits`` or ``digits-flow``); writes its EMA weights
    (``digits.safetensors`` / ``digits_flow.safetensors``) and its record (``digits_train.json`` /
    ``digits_flow_train.json``)."""
    if steps < 1 or batch < 1:
        raise ModelError(f"train_digits: steps and batch must be >= 1 (got {steps}, {batch})")
    loss_fn, weights_file, record_file, objective_fields, build = _objective(model_name)
    lr = DEFAULT_LR[model_name] if lr is None else lr
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(threads):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        x_all, y_all = digits_data()
        model = build()
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        curve, window, t0 = [], [], time.perf_counter()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            idx = torch.randint(0, len(x_all), (batch,), generator=g)
            labels = torch.where(torch.rand(batch, generator=g) < label_dropout, NULL_CLASS, y_all[idx])
            loss = loss_fn(model, x_all[idx], labels, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema_update(ema, model, min(ema_decay, (1.0 + step) / (10.0 + step)))
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                curve.append({"step": step + 1, "loss": float(np.mean(window)), "wall_s": time.perf_counter() - t0})
                log(f"step {step + 1}/{steps}  loss {curve[-1]['loss']:.4f}  {curve[-1]['wall_s']:.0f}s")
                window = []
        wall = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    record = {
        "model": model_name, "command": _command(argv), "seed": seed, "steps": steps, "batch": batch, "lr": lr,
        "warmup": warmup, "label_dropout": label_dropout, "ema_decay": ema_decay, "threads": threads,
        "wall_time_s": round(wall, 1), "final_loss": curve[-1]["loss"], "parameters": params,
        **objective_fields, "data": "sklearn load_digits, "
        "8x8 -> 16x16 bilinear, [-1, 1], all 1797 images", "torch": torch.__version__, "loss_curve": curve,
    }
    _save(ema, out / weights_file, {"model": model_name, "arch": json.dumps(objective_fields["arch"]),
                                    "seed": str(seed)})
    (out / record_file).write_text(json.dumps(record, indent=1) + "\n")
    return record


@torch.no_grad()
def accuracy(clf: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` the classifier labels as ``y``."""
    clf.eval()
    return float((clf(x).argmax(1) == y).float().mean())


def train_classifier(out_dir: str | Path, seed: int = 0, threads: int = 2, log: Log = _no_log, *,
                     epochs: int = 40, batch: int = 64, lr: float = 2e-3, held_out: float = 0.2,
                     argv: list[str] | None = None) -> dict:
    """Train the digits CNN on 80 % of the data; writes ``digits_classifier.safetensors`` and its json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(threads):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        x_all, y_all = digits_data()
        train_idx, test_idx = split_indices(y_all, held_out, seed)
        xt, yt = x_all[train_idx], y_all[train_idx]
        clf = DigitsClassifier()
        opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = math.ceil(len(xt) / batch)
        total = epochs * steps_per_epoch
        curve, t0, step = [], time.perf_counter(), 0
        for epoch in range(epochs):
            clf.train()
            perm = torch.randperm(len(xt), generator=g)
            losses = []
            for i in range(steps_per_epoch):
                idx = perm[i * batch:(i + 1) * batch]
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, lr, steps_per_epoch)
                loss = F.cross_entropy(clf(_augment(xt[idx], g)), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
            acc = accuracy(clf, x_all[test_idx], y_all[test_idx])
            curve.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "held_out_accuracy": acc})
            log(f"classifier epoch {epoch + 1}/{epochs}  loss {curve[-1]['loss']:.4f}  held-out acc {acc:.4f}")
        wall = time.perf_counter() - t0
    record = {
        "model": "digits_classifier", "command": _command(argv), "seed": seed, "epochs": epochs, "batch": batch,
        "lr": lr, "threads": threads, "wall_time_s": round(wall, 1), "train_size": len(train_idx),
        "held_out_size": len(test_idx), "held_out_accuracy": curve[-1]["held_out_accuracy"],
        "train_accuracy": accuracy(clf, xt, yt), "feature_dim": DigitsClassifier.feature_dim,
        "parameters": sum(p.numel() for p in clf.parameters()), "torch": torch.__version__, "curve": curve,
    }
    _save(clf, out / CLASSIFIER_FILE, {"model": "digits_classifier", "seed": str(seed)})
    (out / "digits_classifier.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def sample_digits(model, labels: torch.Tensor, guidance: float | None, *, nfe: int = 10,
                  schedule: str = "dpmsolver++2m", seed: int = 0) -> torch.Tensor:
    """Samples of the given classes (one per label) from seeded noise, clamped to [-1, 1]."""
    from dataclasses import replace

    from autotune.sampling.executor import sample
    from autotune.sampling.named import build

    sched = replace(build(schedule, model.noise, nfe), guidance=guidance)
    noise = torch.randn((len(labels), *model.sample_shape), generator=torch.Generator().manual_seed(seed))
    return sample(model, sched, noise, cond=labels).sample.clamp(-1.0, 1.0)


def generated_accuracy(model, clf: DigitsClassifier, guidance: float | None, *, per_class: int = 10,
                       nfe: int = 10, seed: int = 0, schedule: str = "dpmsolver++2m") -> float:
    """Fraction of generated samples (per_class of each class) the classifier assigns to the asked class."""
    labels = torch.arange(10).repeat_interleave(per_class)
    return accuracy(clf, sample_digits(model, labels, guidance, nfe=nfe, seed=seed, schedule=schedule), labels)


def save_grid(path: str | Path, model, guidance: float = 3.0, *, per_class: int = 8, nfe: int = 10,
              seed: int = 0, scale: int = 4) -> Path:
    """PNG grid of samples: one row per class 0..9, ``per_class`` columns, upscaled ``scale`` x."""
    from PIL import Image

    labels = torch.arange(10).repeat_interleave(per_class)
    x = sample_digits(model, labels, guidance, nfe=nfe, seed=seed)
    img = ((x[:, 0] + 1.0) * 127.5).round().to(torch.uint8).reshape(10, per_class, 16, 16)
    pad = torch.full((10, per_class, 18, 18), 255, dtype=torch.uint8)
    pad[:, :, 1:17, 1:17] = img
    grid = pad.permute(0, 2, 1, 3).reshape(10 * 18, per_class * 18).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid, mode="L").resize((per_class * 18 * scale, 10 * 18 * scale), Image.NEAREST).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: train the classifier and/or the UNet into --out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m autotune.models.digits_train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (warm-up, then cosine decay; default: "
                   "the model's, 2e-3 for the UNets, 1e-3 for digits-dit)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", choices=MODELS, default="digits",
                   help="which UNet to train or evaluate (the classifier is shared: trained with digits)")
    p.add_argument("--only", choices=("unet", "classifier", "eval"), default=None)
    p.add_argument("--grid", default=None, help="with --only eval: write a sample grid PNG here")
    a = p.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731 - the CLI's log is stdout
    # the classifier belongs to the digits run; training digits-flow must not overwrite it
    if a.only == "classifier" or (a.only is None and a.model == "digits"):
        train_classifier(a.out, seed=a.seed, threads=a.threads, log=log, argv=argv)
    if a.only in (None, "unet"):
        train_digits(a.out, seed=a.seed, steps=a.steps, threads=a.threads, log=log, batch=a.batch, lr=a.lr,
                     argv=argv, model_name=a.model)
    if a.only == "eval":
        evaluate(a.out, a.grid, a.threads, log, model_name=a.model)
    return 0


def evaluate(weights_dir: str | Path, grid: str | None, threads: int, log: Log,
             model_name: str = "digits") -> dict[str, float]:
    """Classifier accuracy on generated samples at guidance 0, 1, 3 (dpmsolver++2m, NFE 10, 1000 samples)
    and at guidance 3 by a fine solve (DDIM, NFE 100, 200 samples); optional grid."""
    from autotune.models.digits import load_classifier, load_digits

    loader = {"digits": load_digits, "digits-flow": digits_flow.load_digits_flow,
              "digits-dit": digits_dit.load_digits_dit}[model_name]
    with torch_threads(threads):
        model, clf = loader(weights_dir=weights_dir), load_classifier(weights_dir=weights_dir)
        result = {f"guidance_{g:g}": generated_accuracy(model, clf, g, per_class=100) for g in (0.0, 1.0, 3.0)}
        # a fine solve tells the model's accuracy apart from the 10-step solver's (on digits-flow DDIM is
        # Euler on the ODE); 200 samples keep it to minutes on one CPU thread
        result["guidance_3_ddim100"] = generated_accuracy(model, clf, 3.0, per_class=20, nfe=100, schedule="ddim")
        log(json.dumps(result))
        if grid:
            log(f"grid: {save_grid(grid, model)}")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
