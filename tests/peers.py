"""diffusers reference loops and a tiny random UNet pipeline directory, shared by the peer tests."""

from __future__ import annotations

from pathlib import Path

import torch

from autotune.sampling.named import DIFFUSERS_PEERS as PEERS  # noqa: E402  (declared once, with the schedules)
from autotune.sampling.named import SOLVER_PEERS  # noqa: E402


def tiny_unet(prediction_type: str = "epsilon", seed: int = 0, dtype=torch.float32):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )
    return unet


def toy_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth 8x8 RGB images in [-1, 1]: a random colour times a random horizontal/vertical ramp."""
    colour = torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1
    ramp = torch.linspace(-1, 1, 8)
    flip = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5).float()
    img = flip * ramp.view(1, 1, 8, 1) + (1 - flip) * ramp.view(1, 1, 1, 8)
    return (colour * img).clamp(-1, 1)


def train_tiny(unet, scheduler, steps: int = 400, seed: int = 0):
    """A few hundred Adam steps so the UNet's predictions (and samples) are of a realistic size."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    acp = scheduler.alphas_cumprod
    for _ in range(steps):
        x0 = toy_images(32, g)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(acp), (32,), generator=g)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * eps
        target = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[scheduler.config.prediction_type]
        loss = ((unet(xt, t).sample - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval()


# The weights train_tiny gives the default pipelines (linear betas, 400 steps, seed 0), written by running this file
# (`python tests/peers.py`): training both took about 56 s of every test session.
TRAINED = Path(__file__).resolve().parent / "data"


def trained_weights_path(prediction_type: str) -> Path:
    return TRAINED / f"tiny_ddpm_{prediction_type}.safetensors"


def make_pipeline_dir(path: Path, prediction_type: str = "epsilon", beta_schedule: str = "linear",
                      dtype=torch.float32) -> Path:
    """A DDPM pipeline directory as a user has one: `leading` spacing and `clip_sample: true` in its config.
    Linear betas: the committed weights of train_tiny (trained here when they are missing)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type,
                          timestep_spacing="leading", clip_sample=True)
    stored = trained_weights_path(prediction_type)
    if beta_schedule == "linear" and stored.exists():
        from safetensors.torch import load_file

        unet = tiny_unet(prediction_type)
        unet.load_state_dict(load_file(str(stored)))  # tensors only: safetensors runs no code
        unet = unet.eval().to(dtype)
    else:
        unet = train_tiny(tiny_unet(prediction_type), sched).to(dtype)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path))
    return path


if __name__ == "__main__":  # rewrite the committed weights from train_tiny
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    TRAINED.mkdir(exist_ok=True)
    for pred in ("epsilon", "v_prediction"):
        torch.manual_seed(0)  # as the pipeline_dirs fixture seeds it
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=pred,
                              timestep_spacing="leading", clip_sample=True)
        weights = {k: v.contiguous() for k, v in train_tiny(tiny_unet(pred), sched).state_dict().items()}
        save_file(weights, str(trained_weights_path(pred)))
        print("wrote", trained_weights_path(pred))


def run_peer(name: str, unet, scheduler_config: dict, noise: torch.Tensor, nfe: int,
             generator: torch.Generator | None = None, **overrides) -> torch.Tensor:
    """Sample with diffusers' own scheduler class, the way its pipelines do: ``nfe`` is its num_inference_steps,
    and ``generator`` goes to step() (SDE schedulers draw their noise on it)."""
    import diffusers

    cls_name, kwargs = {**PEERS, **SOLVER_PEERS}[name]
    cls = getattr(diffusers, cls_name)
    sched = cls.from_config(scheduler_config, **{**kwargs, **overrides})
    sched.set_timesteps(nfe)
    x = noise * sched.init_noise_sigma
    extra = {} if generator is None else {"generator": generator}
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(x, t), t).sample
            x = sched.step(out, t, x, **extra).prev_sample
    return x


def record_prev_samples(scheduler) -> list[torch.Tensor]:
    """Wrap ``scheduler.step`` to keep every ``prev_sample``: the state a pipeline holds before its [0, 1] map
    and clamp, which is what `autotune sample` returns."""
    states: list[torch.Tensor] = []
    step = scheduler.step

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        states.append(out.prev_sample)
        return out

    scheduler.step = recording
    return states
