"""A tiny Stable Diffusion pipeline directory built from configs with random weights (no downloads).

Layout as a user has it on disk: ``model_index.json`` + ``unet/`` (UNet2DConditionModel) + ``text_encoder/``
(CLIPTextModel) + ``tokenizer/`` (CLIPTokenizer from a small byte-level BPE vocab written here) + ``vae/``
(AutoencoderKL) + ``scheduler/`` (the PNDM config of SD 1.x: scaled_linear betas, ``steps_offset`` 1).
The parts are saved with ``StableDiffusionPipeline.save_pretrained`` and every test loads them back from
disk. Latents are 4 x 8 x 8 (images 32 x 32, VAE factor 4); the whole directory is about 4 MB. The UNet gets
a few training steps (``train_tiny_sd``) so that its predictions, and so the latents, have realistic sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MAX_LENGTH = 16  # the tokenizer's model_max_length (77 in SD); the prompt embeddings are (B, 16, 32)
LATENT_SIZE = 8
WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "blue", "car", "house", "on", "in", "tree",
         "painting", "sky", "small")
PROMPTS = ("a photo of the cat", "a red car", "a blue house on the sky", "the dog in the tree")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to one printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of a small CLIP BPE: the byte alphabet (plain and word-final ``</w>``),
    merges that spell out the words in WORDS, and the two special tokens."""
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in WORDS:
        # left-to-right merges: ((w o) r) d</w>, the last character carrying the end-of-word suffix
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for sym in symbols[1:]:
            pair = f"{cur} {sym}"
            cur = cur + sym
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    # read back through from_pretrained, the way a user's tokenizer/ folder is read
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return CLIPTokenizer.from_pretrained(str(folder))


def tiny_components(seed: int = 0, prediction_type: str = "epsilon", tokenizer_dir: Path | None = None):
    """The five parts in memory (random weights from ``seed``); the tokenizer files go to ``tokenizer_dir``."""
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok_dir = tokenizer_dir or Path(tempfile.mkdtemp(prefix="tiny_clip_tok_"))
    tokenizer = tiny_tokenizer(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=LATENT_SIZE * 4,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, layer_norm_eps=1e-5,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type,
    )
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": scheduler}


def train_tiny_sd(parts: dict, steps: int = 60, seed: int = 0) -> dict:
    """A few Adam steps on toy latents (a prompt-specific colour times a ramp) so that the UNet's
    predictions have realistic sizes (a random UNet's x0 predictions reach |x| ~ 50) and depend on the
    prompt. Only the UNet is trained; the text encoder stays random."""
    unet, text_encoder, tokenizer, sched = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
    prompts = list(PROMPTS) + [""]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
        emb = text_encoder(ids.input_ids)[0]
    colours = torch.randn(len(prompts), 4, 1, 1, generator=g)
    ramp = torch.linspace(-1, 1, LATENT_SIZE)
    acp = sched.alphas_cumprod
    pred = sched.config.prediction_type
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, len(prompts), (32,), generator=g)
        flip = (torch.rand(32, 1, 1, 1, generator=g) < 0.5).float()
        x0 = colours[idx] * (flip * ramp.view(1, 1, -1, 1) + (1 - flip) * ramp.view(1, 1, 1, -1))
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(acp), (32,), generator=g)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        target = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[pred]
        loss = ((unet(a * x0 + s * eps, t, encoder_hidden_states=emb[idx]).sample - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    parts["unet"] = unet.eval()
    return parts


def make_tiny_sd_dir(path: Path, seed: int = 0, prediction_type: str = "epsilon", train_steps: int = 60) -> Path:
    """Write the tiny pipeline directory at ``path`` with ``StableDiffusionPipeline.save_pretrained``.

    The tokenizer folder is then given the layout of the SD 1.x hub repositories (vocab.json, merges.txt,
    tokenizer_config.json, no tokenizer.json), so that loading it builds the BPE from the vocab files.
    """
    import shutil
    import tempfile

    from diffusers import StableDiffusionPipeline

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tok_") as tok_dir:
        parts = tiny_components(seed, prediction_type, tokenizer_dir=Path(tok_dir))
        if train_steps:
            train_tiny_sd(parts, train_steps, seed)
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(str(path))
        shutil.rmtree(path / "tokenizer")
        shutil.copytree(tok_dir, path / "tokenizer")
    return path


def load_sd_pipeline(path: Path, scheduler=None, dtype: torch.dtype = torch.float32):
    """diffusers' own StableDiffusionPipeline from the directory (optionally with another scheduler)."""
    from diffusers import StableDiffusionPipeline

    kwargs = {"scheduler": scheduler} if scheduler is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False, dtype=dtype,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":  # python tests/tiny_sd.py OUT_DIR
    import sys

    print(make_tiny_sd_dir(Path(sys.argv[1])))
