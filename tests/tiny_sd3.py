"""A tiny Stable Diffusion 3 pipeline directory built from configs with random weights (no downloads).

Layout as a user has it on disk, written by ``StableDiffusion3Pipeline.save_pretrained``: ``transformer/``
(SD3Transformer2DModel), ``text_encoder/`` + ``text_encoder_2/`` (CLIPTextModelWithProjection), ``tokenizer/`` +
``tokenizer_2/`` (the small byte-level BPE of tests/tiny_sd.py; the second pads with ``!`` as SD3's OpenCLIP
tokenizer does, so a mix-up of the two shows), ``text_encoder_3/`` (T5EncoderModel) + ``tokenizer_3/`` (a T5
Unigram tokenizer over a small vocabulary built here with the ``tokenizers`` library, no sentencepiece file),
``vae/`` (AutoencoderKL with SD3's scaling and shift factors) and ``scheduler/`` (SD3's FlowMatchEuler, shift 3).

Widths are all different so that nothing can be confused: CLIP hidden sizes 16 and 24 (concatenated: 40,
zero-padded to the T5 width 48 = the transformer's joint_attention_dim), CLIP projections 12 and 20 (pooled:
32). Prompt embeddings are (B, 16 + 256, 48): 16 CLIP tokens and the pipeline's default 256 T5 tokens.
Latents are 4 x 8 x 8 (images 32 x 32, VAE factor 4) in 2 x 2 patches, so image_seq_len is 16. About 1 MB.
``without_t5=True`` writes the layout SD3 allows with ``text_encoder_3`` and ``tokenizer_3`` absent (null entries).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from tiny_sd import LATENT_SIZE, MAX_LENGTH, PROMPTS, WORDS, tiny_tokenizer, write_tokenizer_files

CLIP_1, CLIP_2 = 16, 24  # hidden sizes
PROJ_1, PROJ_2 = 12, 20  # projection sizes: pooled embeddings are PROJ_1 + PROJ_2 wide
T5_WIDTH = 48  # d_model of T5 = the transformer's joint_attention_dim
T5_LENGTH = 256  # the pipeline's default max_sequence_length
PATCH = 2
IMAGE = LATENT_SIZE * 4
SHIFT = 3.0

__all__ = ["PROMPTS", "IMAGE", "make_tiny_sd3_dir", "load_sd3_pipeline", "tiny_t5_tokenizer"]


def _clip_tokenizer_2(folder: Path):
    """SD3's second CLIP tokenizer: the same BPE, padded with ``!`` instead of the end-of-text token."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!",
    }))
    return CLIPTokenizer.from_pretrained(str(folder))


def tiny_t5_tokenizer(folder: Path):
    """A T5 tokenizer (Unigram over SentencePiece-style pieces) built locally and read back from ``folder``.

    The pieces: T5's three specials (<pad> 0, </s> 1, <unk> 2), the word-start marker, each word of WORDS with
    and without the marker, and every letter they use, so that any prompt of those words tokenizes without
    <unk> and other text falls back to letters or <unk>. No sentinel (extra_id) tokens: the encoder never
    sees them.
    """
    from transformers import T5TokenizerFast

    letters = sorted({c for w in WORDS for c in w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    pieces += [(w, -3.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    pieces += [(c, -5.0) for c in letters]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_LENGTH)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def _clip_config(tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, layer_norm_eps=1e-5,
        projection_dim=projection,
    )


def tiny_sd3_components(tok_dirs: tuple[Path, Path, Path], seed: int = 0, without_t5: bool = False) -> dict:
    """The SD3 parts in memory (random weights from ``seed``); the tokenizer files go to ``tok_dirs``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = tiny_tokenizer(tok_dirs[0]), _clip_tokenizer_2(tok_dirs[1])
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=PATCH, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=PROJ_1 + PROJ_2, pos_embed_max_size=LATENT_SIZE,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=IMAGE, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    parts = {
        "transformer": transformer.eval(), "vae": vae.eval(),
        "text_encoder": CLIPTextModelWithProjection(_clip_config(tokenizer, CLIP_1, PROJ_1)).eval(),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(tokenizer_2, CLIP_2, PROJ_2)).eval(),
        "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "text_encoder_3": None, "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
    }
    if not without_t5:
        tokenizer_3 = tiny_t5_tokenizer(tok_dirs[2])
        config = T5Config(vocab_size=len(tokenizer_3), d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, pad_token_id=tokenizer_3.pad_token_id,
                          eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=0)
        parts["text_encoder_3"], parts["tokenizer_3"] = T5EncoderModel(config).eval(), tokenizer_3
    return parts


def make_tiny_sd3_dir(path: Path, seed: int = 0, without_t5: bool = False) -> Path:
    """Write the tiny SD3 pipeline directory at ``path`` with ``StableDiffusion3Pipeline.save_pretrained``.

    The CLIP tokenizer folders are then given the hub layout (vocab.json, merges.txt, tokenizer_config.json);
    the T5 tokenizer folder is what save_pretrained writes (tokenizer.json, tokenizer_config.json).
    """
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="tiny_sd3_tok_") as tmp:
        tok_dirs = (Path(tmp) / "tokenizer", Path(tmp) / "tokenizer_2", Path(tmp) / "tokenizer_3")
        parts = tiny_sd3_components(tok_dirs, seed, without_t5=without_t5)
        StableDiffusion3Pipeline(**parts).save_pretrained(str(path))
        for name in ("tokenizer", "tokenizer_2"):
            shutil.rmtree(path / name)
            shutil.copytree(Path(tmp) / name, path / name)
    return path


def load_sd3_pipeline(path: Path, scheduler=None, dtype: torch.dtype = torch.float32):
    """diffusers' own StableDiffusion3Pipeline from the directory (optionally with another scheduler)."""
    from diffusers import StableDiffusion3Pipeline

    kwargs = {"scheduler": scheduler} if scheduler is not None else {}
    index = json.loads((Path(path) / "model_index.json").read_text())
    if index.get("text_encoder_3", [None, None])[1] is None:  # from_pretrained wants the absence said explicitly
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":  # python tests/tiny_sd3.py OUT_DIR [--no-t5]
    import sys

    print(make_tiny_sd3_dir(Path(sys.argv[1]), without_t5="--no-t5" in sys.argv))
