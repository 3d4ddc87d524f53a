"""A tiny Flux pipeline directory built from configs with random weights (no downloads).

Layout as FluxPipeline.save_pretrained writes it: ``model_index.json`` + ``transformer/`` (FluxTransformer2DModel:
``guidance_embeds`` in the "dev" layout, not in the "schnell" one) + ``text_encoder/`` (CLIPTextModel, whose
pooled output conditions) + ``tokenizer/`` (the small CLIP BPE of ``tests/tiny_sd.py``) + ``text_encoder_2/``
(T5EncoderModel) + ``tokenizer_2/`` (a small unigram vocabulary built here and wrapped as a T5 tokenizer) +
``vae/`` (AutoencoderKL with Flux's scaling and shift factors, no quant convs) + ``scheduler/``
(FlowMatchEulerDiscreteScheduler with Flux's dynamic shifting).

Sizes: latents 4 x 8 x 8 (16 packed tokens of 16 channels), images 16 x 16 (VAE factor 2; the VAE config's
``sample_size`` 16 is the default resolution our loader reads), prompt embeddings (B, 512, 32) at the
pipeline's default ``max_sequence_length``, pooled
embeddings (B, 24). The directory is well under 1 MB.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "blue", "car", "house", "on", "in", "tree",
         "painting", "sky", "small")
PROMPTS = ("a photo of the cat", "a red car", "a blue house on the sky", "the dog in the tree")
IMAGE = 16  # pixels; latents 8 x 8
LATENT_CHANNELS = 4
CLIP_LENGTH = 16
# different widths, so that a mix-up of the two encodings cannot go unnoticed
CLIP_WIDTH = 24  # CLIP hidden size = its pooled output = the transformer's pooled_projection_dim
T5_WIDTH = 32  # T5 d_model = the transformer's joint_attention_dim
SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
             "base_image_seq_len": 256, "max_image_seq_len": 4096}  # FLUX.1-dev's scheduler config
SCHNELL_SCHEDULER = {**SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}  # FLUX.1-schnell's


def tiny_t5_tokenizer():
    """A T5 tokenizer over a unigram vocabulary: pad, eos, unk as T5 numbers them (0, 1, 2), one piece per
    word of WORDS (with the word-start marker), the bare marker and single letters, so any lowercase text
    tokenizes; scores favour whole words."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_components(seed: int = 0, schnell: bool = False, tokenizer_dir: Path | None = None) -> dict:
    """The seven parts in memory (random weights from ``seed``): the "dev" layout (guidance-distilled
    transformer, dynamic shifting), or with ``schnell`` the "schnell" one (no guidance embedding, shift 1)."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tiny_sd import tiny_tokenizer

    tokenizer = tiny_tokenizer(tokenizer_dir or Path(tempfile.mkdtemp(prefix="tiny_flux_clip_")))
    tokenizer.model_max_length = CLIP_LENGTH
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=1, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=not schnell, axes_dims_rope=(4, 4, 8),
    )
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, layer_norm_eps=1e-5,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=IMAGE, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**(SCHNELL_SCHEDULER if schnell else SCHEDULER))
    return {"transformer": transformer.eval(), "text_encoder": clip.eval(), "text_encoder_2": t5.eval(),
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "vae": vae.eval(), "scheduler": scheduler}


def make_tiny_flux_dir(path: Path, seed: int = 0, schnell: bool = False) -> Path:
    """Write the tiny pipeline directory at ``path`` with ``FluxPipeline.save_pretrained``."""
    import tempfile

    from diffusers import FluxPipeline

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="tiny_flux_clip_") as tok_dir:
        FluxPipeline(**tiny_components(seed, schnell, Path(tok_dir))).save_pretrained(str(path))
    return path


def load_flux_pipeline(path: Path, scheduler=None, dtype: torch.dtype = torch.float32):
    """diffusers' own FluxPipeline from the directory (optionally with another scheduler)."""
    from diffusers import FluxPipeline

    kwargs = {"scheduler": scheduler} if scheduler is not None else {}
    pipe = FluxPipeline.from_pretrained(str(path), dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":  # python tests/tiny_flux.py OUT_DIR
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    print(make_tiny_flux_dir(Path(sys.argv[1])))
