"""A tiny SDXL pipeline directory built from configs with random weights (no downloads).

Layout as a user has it on disk, written by ``StableDiffusionXLPipeline.save_pretrained``: ``unet/``
(UNet2DConditionModel with ``addition_embed_type="text_time"``), ``text_encoder/`` (CLIPTextModel) +
``text_encoder_2/`` (CLIPTextModelWithProjection), ``tokenizer/`` + ``tokenizer_2/`` (the small byte-level BPE
of tests/tiny_sd.py; the second pads with ``!`` as SDXL's does, so a mix-up of the two shows), ``vae/`` and
``scheduler/`` (SDXL's EulerDiscrete config: scaled_linear betas, ``steps_offset`` 1, leading spacing).

The two encoders differ in width (32 and 24) and the second projects to 16, so that the prompt embeddings
(B, 16, 56), pooled embeddings (B, 16) and time ids (B, 6) cannot be confused with one another. Latents are
4 x 8 x 8 (images 32 x 32, VAE factor 4), so the default time ids are (32, 32, 0, 0, 32, 32). The UNet gets a
few training steps (``train_tiny_sdxl``) so that its predictions, and so the latents, have realistic sizes.
The whole directory is about 3 MB.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from tiny_sd import LATENT_SIZE, MAX_LENGTH, PROMPTS, tiny_tokenizer, write_tokenizer_files

TIME_EMBED_DIM = 8  # addition_time_embed_dim: each of the 6 time ids gets an 8-wide sinusoidal embedding
HIDDEN_1, HIDDEN_2, PROJECTION = 32, 24, 16
IMAGE = LATENT_SIZE * 4


def _tokenizer_2(folder: Path):
    """SDXL's second tokenizer: the same BPE, padded with ``!`` instead of the end-of-text token."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!",
    }))
    return CLIPTokenizer.from_pretrained(str(folder))


def _text_config(tokenizer, hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, layer_norm_eps=1e-5, **extra,
    )


def tiny_sdxl_components(tok_dirs: tuple[Path, Path], seed: int = 0, prediction_type: str = "epsilon"):
    """The SDXL parts in memory (random weights from ``seed``); the tokenizer files go to ``tok_dirs``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_tokenizer(tok_dirs[0]), _tokenizer_2(tok_dirs[1])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN_1 + HIDDEN_2, attention_head_dim=(2, 4), use_linear_projection=True,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=IMAGE, scaling_factor=0.13025,
    )
    text_encoder = CLIPTextModel(_text_config(tokenizer, HIDDEN_1))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, HIDDEN_2, projection_dim=PROJECTION))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type=prediction_type,
    )
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
            "text_encoder_2": text_encoder_2.eval(), "tokenizer": tokenizer, "tokenizer_2": tokenizer_2,
            "scheduler": scheduler}


def train_tiny_sdxl(parts: dict, steps: int = 40, seed: int = 0) -> dict:
    """A few Adam steps on toy latents (a prompt-specific colour times a ramp), conditioned as the pipeline
    conditions (embeddings, pooled embeddings, time ids), so that predictions have realistic sizes and depend
    on the prompt. Only the UNet is trained."""
    from diffusers import StableDiffusionXLPipeline

    unet, sched = parts["unet"], parts["scheduler"]
    pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    prompts = list(PROMPTS) + [""]
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    time_ids = torch.tensor([[IMAGE, IMAGE, 0, 0, IMAGE, IMAGE]], dtype=emb.dtype)
    g = torch.Generator().manual_seed(seed)
    colours = torch.randn(len(prompts), 4, 1, 1, generator=g)
    ramp = torch.linspace(-1, 1, LATENT_SIZE)
    acp = sched.alphas_cumprod
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, len(prompts), (16,), generator=g)
        flip = (torch.rand(16, 1, 1, 1, generator=g) < 0.5).float()
        x0 = colours[idx] * (flip * ramp.view(1, 1, -1, 1) + (1 - flip) * ramp.view(1, 1, 1, -1))
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(acp), (16,), generator=g)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        target = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[sched.config.prediction_type]
        added = {"text_embeds": pooled[idx], "time_ids": time_ids.expand(16, -1)}
        out = unet(a * x0 + s * eps, t, encoder_hidden_states=emb[idx], added_cond_kwargs=added).sample
        loss = ((out - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    parts["unet"] = unet.eval()
    return parts


def make_tiny_sdxl_dir(path: Path, seed: int = 0, prediction_type: str = "epsilon", train_steps: int = 40,
                       force_zeros_for_empty_prompt: bool = True) -> Path:
    """Write the tiny SDXL directory at ``path`` with ``StableDiffusionXLPipeline.save_pretrained``.

    The tokenizer folders are then given the hub layout (vocab.json, merges.txt, tokenizer_config.json, no
    tokenizer.json), so that loading them builds the BPE from the vocab files.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tok_") as tmp:
        tok_dirs = (Path(tmp) / "tokenizer", Path(tmp) / "tokenizer_2")
        parts = tiny_sdxl_components(tok_dirs, seed, prediction_type)
        if train_steps:
            train_tiny_sdxl(parts, train_steps, seed)
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                                         add_watermarker=False)
        pipe.save_pretrained(str(path))
        for folder in tok_dirs:
            shutil.rmtree(path / folder.name)
            shutil.copytree(folder, path / folder.name)
    return path


def load_sdxl_pipeline(path: Path, scheduler=None, dtype: torch.dtype = torch.float32):
    """diffusers' own StableDiffusionXLPipeline from the directory (optionally with another scheduler)."""
    from diffusers import StableDiffusionXLPipeline

    kwargs = {"scheduler": scheduler} if scheduler is not None else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), add_watermarker=False, dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":  # python tests/tiny_sdxl.py OUT_DIR
    import sys

    print(make_tiny_sdxl_dir(Path(sys.argv[1])))
