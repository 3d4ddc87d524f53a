"""Latent text-to-image pipeline directories (the Stable Diffusion layout) as a Denoiser.

A directory with ``model_index.json`` + ``unet/`` (UNet2DConditionModel) + ``text_encoder/`` (CLIPTextModel)
+ ``tokenizer/`` (CLIPTokenizer) + ``vae/`` (AutoencoderKL) + ``scheduler/``. Prompts are encoded once by
the text encoder, exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does (padded to the
tokenizer's ``model_max_length``, truncated, the attention mask only where the text encoder's config asks
for it); the null condition of classifier-free guidance is the encoding of ``""`` padded the same way (the
pipeline's default negative prompt). Only the UNet runs inside the sampling loop; the state is the latents,
and ``decode`` turns final latents into images with the VAE, outside any timed loop.

Example (a directory on disk):
    >>> model = load_latent_pipeline_dir("path/to/sd")                       # doctest: +SKIP
    >>> cond = model.encode_prompts(["a photo of a cat", "a red car"])       # doctest: +SKIP
    >>> noise = torch.randn(2, *model.sample_shape)                          # doctest: +SKIP
    >>> s = dataclasses.replace(build("dpmsolver++2m", model.noise, 8), guidance=7.5)   # doctest: +SKIP
    >>> images = model.decode(sample(model, s, noise, cond).sample)         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from autotune.errors import ModelError
from autotune.models.diffusers_dir import from_pretrained, read_json, read_scheduler_config, read_scheduler_file
from autotune.models.guidance import ClassifierFreeGuidance
from autotune.sampling.denoiser import TorchDenoiser, fingerprint_module, skipping

PARTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
TEXT_ENCODERS = ("CLIPTextModel",)
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
ENCODE_CHUNK = 64  # prompts per text-encoder forward


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line; surrounding whitespace is stripped and blank lines skipped.

    Raises:
        ModelError: the file is missing, unreadable, not UTF-8, or holds no prompt.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"{path}: prompts file not found") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: prompts file is not UTF-8 text ({e})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read the prompts file ({e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ModelError(f"{path}: no prompts (expected one prompt per line)")
    return prompts


def _index_class(index: dict[str, Any], part: str) -> str | None:
    entry = index.get(part)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return None
    return str(entry[1])


def is_latent_pipeline_dir(path: str | Path) -> bool:
    """A pipeline directory whose UNet is a UNet2DConditionModel (with a text encoder and a VAE)."""
    path = Path(path)
    try:
        index = read_json(path / "model_index.json")
        unet = read_json(path / "unet" / "config.json")
    except ModelError:  # not a readable pipeline directory: the loader says what is wrong with it
        return False
    return unet.get("_class_name") == "UNet2DConditionModel" and "text_encoder" in index and "vae" in index


class LatentTextToImageDenoiser(TorchDenoiser):
    """A latent text-to-image model: UNet2DConditionModel + CLIP text encoder + VAE + scheduler config.

    ``cond`` is the prompt embeddings, a ``(B, L, D)`` tensor from :meth:`encode_prompts` (a ``(1, L, D)``
    tensor is broadcast over the batch); a list of B prompt strings is also accepted and encoded once (the
    last list is memoised). ``cond=None`` samples unconditionally (the empty-prompt embedding). With a
    ``guidance`` scale, the conditional and unconditional halves run in ONE batched UNet forward.

    Args:
        unet: a diffusers UNet2DConditionModel (no added/class embeddings, no time-cond projection).
        text_encoder: a transformers CLIPTextModel; its first output is the prompt embedding.
        tokenizer: the matching CLIPTokenizer.
        scheduler_config: the pipeline's scheduler config (betas, training steps, prediction type).
        vae: the AutoencoderKL, or None with ``vae_loader`` (loaded on the first :meth:`decode`).
        vae_loader: returns the AutoencoderKL when it is first needed.
        vae_config: the VAE's config when it is not loaded yet (for ``vae_scale_factor``).
        source: where the model came from (for messages).
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler_config: dict[str, Any],
        vae: nn.Module | None = None,
        *,
        vae_loader: Callable[[], nn.Module] | None = None,
        vae_config: dict[str, Any] | None = None,
        source: str = "",
    ) -> None:
        cfg = unet.config
        for key in ("addition_embed_type", "class_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type"):
            if cfg.get(key) is not None:
                raise ModelError(f"{source or 'unet'}: UNet2DConditionModel with {key}={cfg.get(key)!r} is not "
                                 "supported (Stable Diffusion 1.x/2.x layout only)")
        noise, prediction, scheduler_keys = read_scheduler_config(scheduler_config)
        config = {
            "kind": "latent_text_to_image",
            # without _name_or_path (where it was loaded from) and _diffusers_version: a copied directory
            # is the same model
            "unet": {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"},
            "scheduler": scheduler_keys,
        }
        super().__init__(self._unet_forward, noise, prediction, module=unet, round_time=True, config=config)
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.source = source
        self._vae = vae
        self._vae_loader = vae_loader
        self.vae_config = dict(vae.config) if vae is not None else dict(vae_config or {})
        self.num_classes = None
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (int(cfg.in_channels), int(h), int(w))
        self.embedding_dim = int(cfg.cross_attention_dim)
        self.max_length = self._max_length()
        self.null_embedding = self.encode_prompts([""])  # (1, L, D): the pipeline's default negative prompt
        self.cfg = ClassifierFreeGuidance(self._unet_forward, self.null_embedding)
        self._memo: tuple[tuple[str, ...], torch.Tensor] | None = None
        self._text_fingerprint: str | None = None

    # -- text -------------------------------------------------------------------------------------

    def _max_length(self) -> int:
        n = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        limit = int(getattr(self.text_encoder.config, "max_position_embeddings", 77))
        if n <= 0 or n > 100_000:  # a tokenizer without model_max_length reports ~1e30
            n = limit
        if n > limit:
            raise ModelError(f"{self.source or 'tokenizer'}: model_max_length {n} exceeds the text encoder's "
                             f"max_position_embeddings {limit}")
        return n

    def encode_prompts(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Prompt embeddings ``(B, L, D)`` as StableDiffusionPipeline computes them (no grad)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ModelError("prompts: expected a non-empty list of strings")
        device = next(self.text_encoder.parameters()).device
        use_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))
        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), ENCODE_CHUNK):
                tokens = self.tokenizer(prompts[i:i + ENCODE_CHUNK], padding="max_length", max_length=self.max_length,
                                        truncation=True, return_tensors="pt")
                mask = tokens.attention_mask.to(device) if use_mask else None
                emb = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
                out.append(emb.to(self.text_encoder.dtype))
        emb = torch.cat(out)
        if emb.shape[-1] != self.embedding_dim:
            raise ModelError(f"{self.source or 'text encoder'}: embeddings of width {emb.shape[-1]} do not fit the "
                             f"UNet's cross_attention_dim {self.embedding_dim}")
        return emb

    def condition(self, cond: Any, x: torch.Tensor) -> torch.Tensor:
        """Validate ``cond`` (embeddings or prompt strings) for the batch ``x``; returns ``(B, L, D)``."""
        batch = x.shape[0]
        if isinstance(cond, str) or (isinstance(cond, (list, tuple)) and cond and isinstance(cond[0], str)):
            key = (cond,) if isinstance(cond, str) else tuple(cond)
            if self._memo is None or self._memo[0] != key:
                self._memo = (key, self.encode_prompts(list(key)))
            cond = self._memo[1]
        if not isinstance(cond, torch.Tensor) or not cond.dtype.is_floating_point:
            raise ModelError(f"{self.source or 'latent model'}: cond must be prompt embeddings (B, L, D) from "
                             f"encode_prompts, or a list of prompts; got {type(cond).__name__}")
        if cond.dim() != 3 or cond.shape[-1] != self.embedding_dim:
            raise ModelError(f"{self.source or 'latent model'}: prompt embeddings of shape {tuple(cond.shape)}; "
                             f"expected (B, L, {self.embedding_dim})")
        if cond.shape[0] == 1 and batch != 1:
            cond = cond.expand(batch, *cond.shape[1:])
        elif cond.shape[0] != batch:
            raise ModelError(f"{self.source or 'latent model'}: {cond.shape[0]} prompt embeddings for a batch of "
                             f"{batch} latents (give one per sample, or one for all)")
        return cond.to(x.device)

    # -- the network ------------------------------------------------------------------------------

    def _unet_forward(self, x: torch.Tensor, tm: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        return self.unet(x.to(dtype), tm, encoder_hidden_states=emb.to(device=x.device, dtype=dtype)).sample

    def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None):
        """UNet output for the latents at time t; cond + uncond in one batched forward when guided."""
        tm = self.model_time(x, t)
        emb = None if cond is None else self.condition(cond, x)
        with skipping(self.module, skip) if skip else contextlib.nullcontext():
            return self.cfg(x, tm, emb, guidance)

    # -- images -----------------------------------------------------------------------------------

    @property
    def vae(self) -> nn.Module:
        if self._vae is None:
            if self._vae_loader is None:
                raise ModelError(f"{self.source or 'latent model'}: no VAE to decode latents with")
            self._vae = self._vae_loader()
        return self._vae

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for Stable Diffusion), from the VAE config."""
        return 2 ** (len(self.vae_config.get("block_out_channels", (0,) * 4)) - 1)

    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1], ``(B, 3, H, W)``, from final latents (``latents / scaling_factor [+ shift]``)."""
        vae = self.vae
        scale = float(vae.config.get("scaling_factor", 0.18215) or 0.18215)
        shift = vae.config.get("shift_factor", None)
        device = next(vae.parameters()).device
        out = []
        with torch.no_grad():
            for i in range(0, latents.shape[0], batch_size):
                z = latents[i:i + batch_size].to(device=device, dtype=vae.dtype) / scale
                if shift is not None:
                    z = z + float(shift)
                out.append(vae.decode(z).sample.clamp(-1, 1))
        return torch.cat(out)

    # -- identity ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """UNet weights + configs + the text side (text encoder weights, tokenizer vocab and length)."""
        if self._text_fingerprint is None:
            vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()))
            tok = {"vocab": hashlib.sha256(vocab.encode()).hexdigest()[:16], "max_length": self.max_length,
                   "class": type(self.tokenizer).__name__}
            self._text_fingerprint = fingerprint_module(self.text_encoder, tok)
        return fingerprint_module(self.unet, {**self.config, "text": self._text_fingerprint})


def load_latent_pipeline_dir(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LatentTextToImageDenoiser:
    """Load a Stable-Diffusion-layout pipeline directory; the VAE is loaded on the first ``decode``.

    Raises:
        ModelError: a part is missing or of an unsupported class.
    """
    path = Path(path)
    index = read_json(path / "model_index.json")
    for part in PARTS:
        if _index_class(index, part) is None:
            raise ModelError(f"{path}/model_index.json: no '{part}' entry (not a latent text-to-image pipeline)")
    unet_config = read_json(path / "unet" / "config.json")
    if unet_config.get("_class_name") != "UNet2DConditionModel":
        raise ModelError(f"{path}/unet: {unet_config.get('_class_name')} is not a UNet2DConditionModel")
    enc_cls = _index_class(index, "text_encoder")
    if enc_cls not in TEXT_ENCODERS:
        raise ModelError(f"{path}/text_encoder: {enc_cls} is not supported ({', '.join(TEXT_ENCODERS)})")
    tok_cls = _index_class(index, "tokenizer")
    if tok_cls not in TOKENIZERS:
        raise ModelError(f"{path}/tokenizer: {tok_cls} is not supported ({', '.join(TOKENIZERS)})")
    vae_cls = _index_class(index, "vae")
    if vae_cls != "AutoencoderKL":
        raise ModelError(f"{path}/vae: {vae_cls} is not supported (AutoencoderKL)")
    sched_config = read_scheduler_file(path / "scheduler" / "scheduler_config.json")
    vae_config = read_json(path / "vae" / "config.json")
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelError("loading a latent pipeline directory needs `pip install autotune-diffusion[diffusers]` "
                         "(diffusers and transformers)") from e

    def frozen(module: nn.Module) -> nn.Module:
        module = module.to(device).eval()  # already in dtype: from_pretrained(dtype=...)
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    unet = frozen(from_pretrained(UNet2DConditionModel, path / "unet", dtype=dtype))
    text_encoder = frozen(from_pretrained(CLIPTextModel, path / "text_encoder", dtype=dtype))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}/tokenizer: cannot load ({e})") from None

    def load_vae() -> nn.Module:
        return frozen(from_pretrained(AutoencoderKL, path / "vae", dtype=dtype))

    return LatentTextToImageDenoiser(unet, text_encoder, tokenizer, sched_config, vae_loader=load_vae,
                                     vae_config=vae_config, source=str(path))
