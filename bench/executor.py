"""Executor overhead: non-model time per step as a fraction of model time, ours vs diffusers' loop.

A diffusers UNet2DModel of about 1 M parameters at 16x16, batch 64, float32, on this machine's CPU.
Model calls are timed inside each run, so "non-model" = the loop's total minus its model calls.

    python bench/executor.py [--batch 64] [--nfe 10] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from autotune.sampling.executor import sample
from autotune.sampling.named import build
from autotune.sampling.noise import VPDiscrete


def make_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 48, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=16, attention_head_dim=16,
    ).eval()


class Timed:
    """Wraps a callable and sums the wall time spent inside it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def run_ours(unet, name, nfe, noise):
    from autotune.sampling.denoiser import TorchDenoiser

    noise_schedule = VPDiscrete.from_diffusers_config({"beta_schedule": "linear"})
    timed = Timed(lambda x, t: unet(x, t).sample)
    model = TorchDenoiser(timed, noise_schedule, "epsilon", module=unet, round_time=True)
    schedule = build(name, noise_schedule, nfe)
    start = time.perf_counter()
    sample(model, schedule, noise)
    return time.perf_counter() - start, timed.seconds


def run_diffusers(unet, name, nfe, noise):
    import diffusers

    cls, kwargs = {
        "dpmsolver++2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
        "dpmsolver++3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
        "unipc-bh2-o3": ("UniPCMultistepScheduler", {"solver_order": 3}),
    }[name]
    sched = getattr(diffusers, cls)(beta_schedule="linear", timestep_spacing="linspace", **kwargs)
    timed = Timed(lambda x, t: unet(x, t).sample)
    start = time.perf_counter()
    with torch.no_grad():
        sched.set_timesteps(nfe)
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(timed(sched.scale_model_input(x, t), t), t, x).prev_sample
    return time.perf_counter() - start, timed.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet = make_unet()
    params = sum(p.numel() for p in unet.parameters())
    noise = torch.randn(args.batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    print(f"UNet2DModel {params / 1e6:.2f} M parameters, 16x16, batch {args.batch}, NFE {args.nfe}, "
          f"{args.threads} threads, float32")
    print(f"{'schedule':<15} {'loop':<9} {'model ms/step':>14} {'other ms/step':>14} {'other/model':>12}")
    for name in ("dpmsolver++2m", "dpmsolver++3m", "unipc-bh2-o3"):
        fractions = {}
        for loop, runner in (("autotune", run_ours), ("diffusers", run_diffusers)):
            runner(unet, name, args.nfe, noise)  # warm-up
            runs = [runner(unet, name, args.nfe, noise) for _ in range(args.repeats)]
            model_ms = statistics.median(m for _, m in runs) / args.nfe * 1e3
            other_ms = statistics.median(total - m for total, m in runs) / args.nfe * 1e3
            fractions[loop] = other_ms / model_ms
            print(f"{name:<15} {loop:<9} {model_ms:>14.2f} {other_ms:>14.3f} {fractions[loop]:>11.2%}")
        print(f"{name:<15} overhead ratio autotune/diffusers = {fractions['autotune'] / fractions['diffusers']:.2f}")


if __name__ == "__main__":
    main()
