"""A 32x32 RGB pixel diffusion model trained here, on patches of the two photographs scikit-learn ships
(``sklearn.datasets.load_sample_images``: china.jpg and flower.jpg, no download), saved as a diffusers
DDPMPipeline directory in epsilon or v parameterisation. It gives the benches a real trained pixel model of
realistic size between the test suite's 8x8 toy and the latent models; other benches call ``ensure_rgb32``.

Data: random 32x32 crops of the photos area-downscaled by 2 and by 4 (so a patch holds edges and texture, not
one flat colour), randomly flipped left-right, scaled to [-1, 1]. Network: a ``UNet2DModel`` (32, 64, 64)
channels, one ResNet block per level, self-attention at 8x8 only, about 1.1 M parameters (4.5 MB in fp32).
Scheduler: ``DDPMScheduler`` with 1000 linear betas, ``timestep_spacing="leading"`` and ``clip_sample=True``,
the config a user's DDPM directory has. Training: Adam, linear warm-up then cosine decay, gradient clipping,
stratified timesteps, a loss weighted over noise levels (``diffusion_loss``), residual branches initialised
at zero (``make_unet``), an EMA of the weights (the EMA is what is saved). ``training.json`` beside the
pipeline holds the loss per tenth of training (the training batches' mean, and the EMA weights' loss on one
fixed probe batch whose timesteps are evenly spread, which is far less noisy), the relative change of the last
two tenths (convergence), seconds, parameter count and the settings.

Why the weighting and the initialisation: the samplers autotune tunes are ODE solvers started at T, where
linear betas leave alpha = 0.0064, so an epsilon network's x0 estimate carries its noise-prediction error times
1 / alpha ~ 156. A first build with the plain epsilon loss (900 steps at batch 32) predicted the noise at high
noise levels to a mean square of 3e-3 only, an x0 error of ~80 at T (the data's mean square: 0.42); diffusers'
own DDPM sampler, which clips x0 at every step, drew photo-like patches from it, but unclipped ODE samples
saturated (mean |x| 1.8, the data's 0.6).

Where the default build stands (3000 steps, about 10 minutes each): the v model has converged (its probe loss
moved +0.5 % over the last tenth) and its ODE samples look like photo patches, with the data's pixel-to-pixel
variation. The epsilon model has not (probe -3.5 %): its noise prediction at T is still off by a mean square
of 2.8e-4 (x0: ~7), about a third of it a per-sample gain error of ~1 % that the output GroupNorm makes hard to
undo, and about a third of its ODE samples keep colour noise. It no longer saturates, and its ODE is well
defined, so it serves as the harder, less accurate of the two models. More steps, not another weighting, is
what it lacks: x0 weights of 0.1 and 1 at the noisiest steps reached the same accuracy there.

    python bench/rgb32.py --param eps --out bench-work/rgb32-eps
    python bench/rgb32.py --param v --out bench-work/rgb32-v --steps 400 --seed 1
    python bench/rgb32.py --param eps --noise sd --out bench-work/rgb32-eps-sd
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
PATCH = 32
DOWNSCALES = (2, 4)
TRAIN_TIMESTEPS = 1000
# Chosen so one build takes about 10 minutes on one core of the shared 2-core machine (measured there: about
# 0.2 s a step at batch 8), and long enough that the last tenths of the loss curve are flat.
DEFAULT_STEPS = 3000
# The cost per sample is the same at batch 8, 16 or 32, and in a fixed wall time more steps on smaller batches
# learned the high-noise near-identity faster: mean square 1.1e-3 after 112 s (550 steps) at batch 8 against
# 2.0e-3 (300 steps) at 16.
BATCH = 8
PEAK_LR = 1e-3
WARMUP_STEPS = 50
FINAL_LR_FRACTION = 0.05
EMA_DECAY = 0.998  # a horizon of ~500 steps: long enough to smooth, short enough to forget the early weights
PROBE_SIZE = 64
MIN_SNR_GAMMA = 5.0  # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"
# the x0 weight every noise level keeps (see diffusion_loss); 1 bought the same high-noise accuracy as 0.1 but
# left x0 at t = 200 three times worse (600-step trials)
X0_WEIGHT_FLOOR = 0.1
WINDOWS = 10


def photo_sources() -> list[torch.Tensor]:
    """The two photographs at each downscale, as (3, H, W) float tensors in [-1, 1]."""
    from sklearn.datasets import load_sample_images

    sources = []
    for image in load_sample_images().images:
        full = torch.tensor(image).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1
        # average pooling is an area downscale: no aliasing from the photos' fine texture
        sources += [F.avg_pool2d(full, factor)[0] for factor in DOWNSCALES]
    return sources


def random_patches(sources: list[torch.Tensor], n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random PATCH x PATCH crops, each from a source chosen uniformly, half of them mirrored."""
    patches = []
    for _ in range(n):
        src = sources[int(torch.randint(len(sources), (1,), generator=generator))]
        top = int(torch.randint(src.shape[1] - PATCH + 1, (1,), generator=generator))
        left = int(torch.randint(src.shape[2] - PATCH + 1, (1,), generator=generator))
        patch = src[:, top:top + PATCH, left:left + PATCH]
        if torch.rand((), generator=generator) < 0.5:
            patch = patch.flip(-1)
        patches.append(patch)
    return torch.stack(patches)


def make_unet(seed: int):
    """The network, with every residual branch (ResNet blocks' second conv, attention's output projection) and
    the output conv starting at zero, as ADM initialises them: the input then reaches the last layers cleanly
    through the skip connections, and an epsilon network learns the near-identity it must compute at high noise
    about twice as fast (measured at batch 16: mean square error 3.1e-3 against 6.4e-3 after 200 steps)."""
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=PATCH, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=32,
    )
    last_layers = [m.conv2 for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    last_layers += [m.to_out[0] for m in unet.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        for layer in [*last_layers, unet.conv_out]:
            layer.weight.zero_()
            layer.bias.zero_()
    return unet


# the training noise schedule, as the pipeline's scheduler config holds it: "linear", DDPM's 1000 linear betas (the
# config a user's DDPM directory has; terminal alpha 0.0064); "sd", Stable Diffusion 1.x's scaled-linear betas with
# its steps offset and no clipping (terminal alpha 0.068: the noisiest step keeps some signal)
NOISE_SCHEDULES = {
    "linear": {"beta_schedule": "linear", "clip_sample": True},
    "sd": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
           "clip_sample": False},
}


def make_scheduler(prediction_type: str, noise: str = "linear"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, prediction_type=prediction_type,
                         timestep_spacing="leading", **NOISE_SCHEDULES[noise])


def diffusion_loss(unet, x0: torch.Tensor, eps: torch.Tensor, steps: torch.Tensor, alphas_cumprod: torch.Tensor,
                   prediction_type: str) -> torch.Tensor:
    """Weighted mean squared error of the network's output against its target at ``x_t = alpha x0 + sigma eps``.

    Both parameterisations minimise the same x0 error, weighted by min(snr, MIN_SNR_GAMMA) + X0_WEIGHT_FLOOR
    per sample (in the output's own units: divided by snr for epsilon, by snr + 1 for v). The cap (min-SNR
    weighting) keeps the nearly clean steps, whose noise is all but unpredictable, from dominating; the floor
    keeps a weight on the noisiest steps, where the plain epsilon loss (x0 weight snr) puts almost none
    although an ODE sampler started at T multiplies an epsilon network's error there by 1 / alpha."""
    alpha_sq = alphas_cumprod[steps].view(-1, 1, 1, 1)
    alpha, sigma = alpha_sq.sqrt(), (1 - alpha_sq).sqrt()
    snr = alpha_sq / (1 - alpha_sq)
    x0_weight = snr.clamp(max=MIN_SNR_GAMMA) + X0_WEIGHT_FLOOR
    if prediction_type == "epsilon":  # eps error = -sqrt(snr) x0 error
        target, weight = eps, x0_weight / snr
    else:  # v error = -sqrt(snr + 1) x0 error
        target, weight = alpha * eps - sigma * x0, x0_weight / (snr + 1)
    per_sample = (unet(alpha * x0 + sigma * eps, steps).sample - target).pow(2).mean(dim=(1, 2, 3), keepdim=True)
    return (weight * per_sample).mean()


def stratified_steps(n: int, generator: torch.Generator) -> torch.Tensor:
    """One training step drawn from each of ``n`` equal strata of [0, TRAIN_TIMESTEPS): the batch covers all
    noise levels, so the batch loss (and the logged window means) vary far less than with independent draws."""
    offsets = torch.rand(n, generator=generator)
    return ((torch.arange(n) + offsets) * TRAIN_TIMESTEPS / n).long().clamp(max=TRAIN_TIMESTEPS - 1)


def learning_rate(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return PEAK_LR * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema, unet, step: int) -> None:
    # the warm-up keeps the EMA from averaging in the random initialisation
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    for averaged, current in zip(ema.parameters(), unet.parameters()):
        averaged.lerp_(current, 1 - decay)


def relative_change(values: list[float]) -> float | None:
    """(last - previous) / previous: how much the curve still moved over its last window."""
    return (values[-1] - values[-2]) / values[-2] if len(values) >= 2 else None


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore. On a shared machine two threads that must wait for each
    other were measured 7x slower per step than one (0.8 s against 6 s at batch 32)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(param: str, steps: int, seed: int, batch_size: int = BATCH, probe_size: int = PROBE_SIZE,
          log: Callable[[str], None] = print, noise: str = "linear"):
    """The EMA UNet, its scheduler and the training record (loss per window, settings, seconds)."""
    prediction_type = PREDICTION_TYPES[param]
    scheduler = make_scheduler(prediction_type, noise)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    unet = make_unet(seed).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(unet.parameters(), lr=PEAK_LR)
    sources = photo_sources()
    data = torch.Generator().manual_seed(seed)
    # a fixed probe batch (own stream, so it does not shift the training data): same patches, noise and evenly
    # spread timesteps at every window, so its loss moves only because the weights do
    probe_rng = torch.Generator().manual_seed(seed + 1_000_003)
    probe_x0 = random_patches(sources, probe_size, probe_rng)
    probe_eps = torch.randn(probe_x0.shape, generator=probe_rng)
    probe_steps = torch.linspace(0, TRAIN_TIMESTEPS - 1, probe_size).round().long()

    window = max(1, steps // WINDOWS)
    ends = sorted({min(steps, window * (i + 1)) for i in range(WINDOWS)} | {steps})
    windows: list[dict] = []
    window_losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        x0 = random_patches(sources, batch_size, data)
        eps = torch.randn(x0.shape, generator=data)
        t = stratified_steps(batch_size, data)
        loss = diffusion_loss(unet, x0, eps, t, alphas_cumprod, prediction_type)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, unet, step)
        window_losses.append(loss.item())
        if step + 1 in ends:
            with torch.no_grad():
                probe = diffusion_loss(ema, probe_x0, probe_eps, probe_steps, alphas_cumprod, prediction_type).item()
            row = {"end_step": step + 1, "train_loss": sum(window_losses) / len(window_losses),
                   "ema_probe_loss": probe, "seconds": round(time.perf_counter() - start, 1)}
            windows.append(row)
            window_losses = []
            log(f"{param:>3} step {step + 1:>6}/{steps}  loss {row['train_loss']:.5f}  "
                f"ema probe {probe:.5f}  {row['seconds']:7.1f} s")
    seconds = time.perf_counter() - start
    record = {
        "param": param, "prediction_type": prediction_type, "noise": noise, "steps": steps, "seed": seed,
        "batch_size": batch_size, "peak_lr": PEAK_LR, "warmup_steps": WARMUP_STEPS,
        "final_lr_fraction": FINAL_LR_FRACTION, "ema_decay": EMA_DECAY, "probe_size": probe_size,
        "loss_x0_weight": f"min(snr, {MIN_SNR_GAMMA}) + {X0_WEIGHT_FLOOR}", "timesteps": "stratified",
        "init": "residual branches and output conv at zero",
        "data": {"images": ["china.jpg", "flower.jpg"], "downscales": list(DOWNSCALES), "patch": PATCH,
                 "flip": "horizontal, p = 0.5", "range": [-1, 1]},
        "parameters": sum(p.numel() for p in ema.parameters()),
        "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
        "windows": windows,
        "train_loss_last_change": relative_change([w["train_loss"] for w in windows]),
        "ema_probe_loss_last_change": relative_change([w["ema_probe_loss"] for w in windows]),
    }
    return ema, scheduler, record


def build(out: Path, param: str, steps: int = DEFAULT_STEPS, seed: int = 0, *, batch_size: int = BATCH,
          probe_size: int = PROBE_SIZE, threads: int | None = 1, log: Callable[[str], None] = print,
          noise: str = "linear") -> Path:
    """Train and save the pipeline directory ``out`` (which must not exist yet): written into a sibling folder
    and renamed at the end, so an interrupted build never leaves a directory that looks complete."""
    from diffusers import DDPMPipeline

    if param not in PREDICTION_TYPES:
        raise ValueError(f"param: {param!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if noise not in NOISE_SCHEDULES:
        raise ValueError(f"noise: {noise!r} is not one of {', '.join(NOISE_SCHEDULES)}")
    if steps < 1:
        raise ValueError(f"steps: {steps} (at least 1)")
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    with torch_threads(threads):
        ema, scheduler, record = train(param, steps, seed, batch_size, probe_size, log, noise)
    try:
        DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(str(partial), safe_serialization=True)
        weights = partial / "unet" / "diffusion_pytorch_model.safetensors"
        record["weights_bytes"] = weights.stat().st_size
        (partial / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def rgb32_name(param: str, noise: str = "linear") -> str:
    """The pipeline directory's name under a bench's work folder: rgb32-<param>, -<noise> unless linear."""
    return f"rgb32-{param}" + ("" if noise == "linear" else f"-{noise}")


def ensure_rgb32(work: Path, param: str, steps: int | None = None, *, noise: str = "linear",
                 log: Callable[[str], None] = print) -> Path:
    """``work/rgb32_name(param, noise)``, built (``steps`` or DEFAULT_STEPS, seed 0) only when it is missing; an
    existing directory is returned as it is, whatever steps built it (its training.json says)."""
    path = Path(work) / rgb32_name(param, noise)
    if not (path / "model_index.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build(path, param, DEFAULT_STEPS if steps is None else steps, log=log, noise=noise)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--param", choices=sorted(PREDICTION_TYPES), required=True,
                        help="eps: the UNet predicts the noise; v: it predicts v = alpha eps - sigma x0")
    parser.add_argument("--out", type=Path, required=True, help="pipeline directory to write (must not exist)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (batch {BATCH})")
    parser.add_argument("--noise", choices=sorted(NOISE_SCHEDULES), default="linear",
                        help="training noise schedule: linear (DDPM's betas) or sd (Stable Diffusion 1.x's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads while training")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"--out {args.out} exists; remove it or choose another folder")
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = build(args.out, args.param, args.steps, args.seed, threads=args.threads,
                log=lambda line: print(line, flush=True), noise=args.noise)
    record = json.loads((out / "training.json").read_text())
    last = record["windows"][-1]
    print(f"wrote {out}: {record['parameters']:,} parameters, {record['seconds']:.0f} s")
    print(f"final loss {last['train_loss']:.5f} (ema probe {last['ema_probe_loss']:.5f}); last-window change "
          f"{record['train_loss_last_change'] or 0:+.1%} (probe {record['ema_probe_loss_last_change'] or 0:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
