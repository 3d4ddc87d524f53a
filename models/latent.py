"""Latent text-to-image pipeline directories (the Stable Diffusion layout) as a Denoiser.

A directory with ``model_index.json`` + ``unet/`` (UNet2DConditionModel) + ``text_encoder/`` (CLIPTextModel)
+ ``tokenizer/`` (CLIPTokenizer) + ``vae/`` (AutoencoderKL) + ``scheduler/``. Prompts are encoded once by
the text encoder, exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does (padded to the
tokenizer's ``model_max_length``, truncated, the attention mask only where the text encoder's config asks
for it); the null condition of classifier-free guidance is the encoding of ``""`` padded the same way (the
pipeline's default negative prompt). Only the UNet runs inside the sampling loop; the state is the latents,
and ``decode`` turns final latents into images with the VAE, outside any timed loop.

``LatentPipelineDenoiser`` and the loader helpers here are shared with the other latent families (SDXL in
``models/sdxl.py``): the lazily loaded VAE and ``decode``, the memo of the last encoded prompt list, the guided
call with unit skipping, the tokenizer length and identity.

Example (a directory on disk):
    >>> model = load_latent_pipeline_dir("path/to/sd")                       # doctest: +SKIP
    >>> cond = model.encode_prompts(["a photo of a cat", "a red car"])       # doctest: +SKIP
    >>> noise = torch.randn(2, *model.sample_shape)                          # doctest: +SKIP
    >>> s = dataclasses.replace(build("dpmsolver++2m", model.noise, 8), guidance=7.5)   # doctest: +SKIP
    >>> images = model.decode(sample(model, s, noise, cond).sample)         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from autotune.errors import ModelError
from autotune.models.diffusers_dir import from_pretrained, read_json, read_scheduler_config, read_scheduler_file
from autotune.models.guidance import ClassifierFreeGuidance, with_guidance_unit
from autotune.sampling.denoiser import TorchDenoiser, fingerprint_module

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


def index_class(index: dict[str, Any], part: str) -> str | None:
    """The class model_index.json names for ``part`` (None when the entry is missing or ``[null, null]``)."""
    entry = index.get(part)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return None
    return str(entry[1])


def check_parts(path: Path, index: dict[str, Any], required: Sequence[str] = (), what: str = "",
                classes: dict[str, Sequence[str]] | None = None) -> None:
    """Every part in ``required`` has an entry in model_index.json, of one of the ``classes`` given for it.

    Raises:
        ModelError: ONE line naming the first missing part or unsupported class.
    """
    for part in required:
        if index_class(index, part) is None:
            raise ModelError(f"{path}/model_index.json: no '{part}' entry (not {what})")
    for part, allowed in (classes or {}).items():
        cls = index_class(index, part)
        if cls not in allowed:
            raise ModelError(f"{path}/{part}: {cls} is not supported ({', '.join(allowed)})")


def frozen(module: nn.Module, device: str | torch.device) -> nn.Module:
    """The module on ``device``, in eval mode, without gradients (its dtype came from from_pretrained)."""
    module = module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_clip_tokenizer(folder: Path) -> Any:
    """A CLIPTokenizer from a pipeline's tokenizer folder, or ONE ModelError naming the folder."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}: cannot load ({e})") from None


def tokenizer_max_length(tokenizer: Any, text_encoder: nn.Module, source: str) -> int:
    """The length prompts are padded and truncated to: the tokenizer's ``model_max_length`` (as the pipelines
    pad), refused when the text encoder has fewer positions."""
    n = int(getattr(tokenizer, "model_max_length", 0) or 0)
    limit = int(getattr(text_encoder.config, "max_position_embeddings", 77))
    if n <= 0 or n > 100_000:  # a tokenizer without model_max_length reports ~1e30
        n = limit
    if n > limit:
        raise ModelError(f"{source or 'tokenizer'}: model_max_length {n} exceeds the text encoder's "
                         f"max_position_embeddings {limit}")
    return n


def tokenizer_identity(tokenizer: Any, max_length: int) -> dict[str, Any]:
    """What decides the token ids a tokenizer gives: vocab, merges, special tokens (SDXL's second tokenizer
    differs from the first only in its pad token), the padded length and the class."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # only the model part: the padding/truncation state changes with every call
        h.update(json.dumps(json.loads(backend.to_str()).get("model", {}).get("merges")).encode())
    specials = getattr(tokenizer, "special_tokens_map", {})
    return {"vocab": h.hexdigest()[:16], "specials": {k: str(v) for k, v in sorted(specials.items())},
            "max_length": max_length, "class": type(tokenizer).__name__}


def is_latent_pipeline_dir(path: str | Path) -> bool:
    """A pipeline directory whose UNet is a UNet2DConditionModel (with a text encoder and a VAE)."""
    path = Path(path)
    try:
        index = read_json(path / "model_index.json")
        unet = read_json(path / "unet" / "config.json")
    except ModelError:  # not a readable pipeline directory: the loader says what is wrong with it
        return False
    return unet.get("_class_name") == "UNet2DConditionModel" and "text_encoder" in index and "vae" in index


def check_unet_extras(unet_config: Any, source: str, allowed: dict[str, Any], family: str) -> None:
    """Refuse a UNet2DConditionModel whose extra embeddings the family does not feed: each of the keys below
    must be None, or the value ``allowed`` gives for it."""
    for key in ("addition_embed_type", "class_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type"):
        value = unet_config.get(key)
        if value is not None and value != allowed.get(key):
            raise ModelError(f"{source or 'unet'}: UNet2DConditionModel with {key}={value!r} is not supported "
                             f"({family})")


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    """Image pixels per latent pixel, as the pipelines compute it: 2 ** (number of VAE blocks - 1)."""
    blocks = vae_config.get("block_out_channels", (0,) * 4)
    return 2 ** (len(blocks) - 1) if isinstance(blocks, (list, tuple)) and blocks else 8


class VAEDecoding:
    """The VAE side of every latent family: loaded on the first :meth:`decode` (never inside a sampling loop),
    its scale factor from its config, and the decode the pipelines do. A family sets ``DEFAULT_SCALING`` (the
    ``scaling_factor`` its VAEs have when the config does not say) and calls :meth:`init_vae`."""

    DEFAULT_SCALING: ClassVar[float] = 0.18215
    source: str

    def init_vae(self, vae: nn.Module | None, vae_loader: Callable[[], nn.Module] | None,
                 vae_config: dict[str, Any] | None) -> None:
        self._vae = vae
        self._vae_loader = vae_loader
        self.vae_config = dict(vae.config) if vae is not None else dict(vae_config or {})

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
        return vae_scale_factor(self.vae_config)

    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1], ``(B, 3, H, W)``, from final latents: ``latents * latents_std / scaling_factor +
        latents_mean`` when the VAE config has both (as the SDXL pipeline denormalises), else
        ``latents / scaling_factor [+ shift_factor]`` (SD, SD3, Flux); in the VAE's own dtype."""
        vae = self.vae
        scale = float(vae.config.get("scaling_factor", self.DEFAULT_SCALING) or self.DEFAULT_SCALING)
        shift = vae.config.get("shift_factor", None)
        mean, std = vae.config.get("latents_mean", None), vae.config.get("latents_std", None)
        device = next(vae.parameters()).device
        out = []
        with torch.no_grad():
            for i in range(0, latents.shape[0], batch_size):
                z = latents[i:i + batch_size].to(device=device, dtype=vae.dtype)
                if mean is not None and std is not None:
                    channels = (1, -1, 1, 1)
                    z = z * torch.tensor(std, dtype=z.dtype, device=device).view(channels) / scale + \
                        torch.tensor(mean, dtype=z.dtype, device=device).view(channels)
                else:
                    z = z / scale
                    if shift is not None:
                        z = z + float(shift)
                out.append(vae.decode(z).sample.clamp(-1, 1))
        return torch.cat(out)


class PromptMemo:
    """Prompt strings in place of a condition: encoded by the model's ``encode_prompts``, the last list kept, so
    a sampling loop that passes the same prompts at every step encodes them once."""

    _memo: tuple[tuple[str, ...], Any] | None = None

    def _encoded(self, cond: Any) -> Any:
        """``cond`` with a prompt string or a list of prompts replaced by its encoding (the last list is kept,
        so a loop that passes the same prompts every step encodes them once)."""
        if isinstance(cond, str) or (isinstance(cond, (list, tuple)) and cond and isinstance(cond[0], str)):
            key = (cond,) if isinstance(cond, str) else tuple(cond)
            if self._memo is None or self._memo[0] != key:
                self._memo = (key, self.encode_prompts(list(key)))
            return self._memo[1]
        return cond


class LatentPipelineDenoiser(VAEDecoding, PromptMemo, TorchDenoiser):
    """What the latent text-to-image families share: the UNet as the network (discrete times, unit skipping),
    the sample shape from its config, the VAE loaded on the first :meth:`decode`, prompt lists encoded once
    (the last one memoised), and the guided call (``self.cfg``, set by the subclass with its null condition).

    A subclass provides ``encode_prompts``, ``condition(cond, x)`` (validate and expand ``cond`` to the
    batch), ``_unet_forward(x, model_time, cond)``, ``self.cfg`` and ``fingerprint``.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler_config: dict[str, Any],
        kind: str,
        vae: nn.Module | None = None,
        *,
        vae_loader: Callable[[], nn.Module] | None = None,
        vae_config: dict[str, Any] | None = None,
        source: str = "",
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        cfg = unet.config
        noise, prediction, scheduler_keys = read_scheduler_config(scheduler_config)
        config = {
            "kind": kind,
            # without _name_or_path (where it was loaded from) and _diffusers_version: a copied directory
            # is the same model
            "unet": {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"},
            "scheduler": scheduler_keys,
            **(extra_config or {}),
        }
        super().__init__(self._unet_forward, noise, prediction, module=unet, round_time=True, config=config)
        self.unet = unet
        self.scheduler_config = scheduler_config
        self.source = source
        self.init_vae(vae, vae_loader, vae_config)
        self.num_classes = None
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (int(cfg.in_channels), int(h), int(w))
        self.embedding_dim = int(cfg.cross_attention_dim)
        self.cfg: ClassifierFreeGuidance | None = None
        self._memo: tuple[tuple[str, ...], Any] | None = None

    def encode_prompts(self, prompts: Sequence[str] | str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def condition(self, cond: Any, x: torch.Tensor) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _unet_forward(self, x: torch.Tensor, tm: torch.Tensor, cond: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _check_prompts(self, prompts: Sequence[str] | str) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ModelError("prompts: expected a non-empty list of strings")
        return prompts

    def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None, reuse=frozenset(), record=frozenset(),
                 cache=None):
        """UNet output for the latents at time t; cond + uncond in one batched forward when guided."""
        tm = self.model_time(x, t)
        cond = None if cond is None else self.condition(cond, x)
        return self.cfg.masked(self.module, x, tm, cond, guidance, skip, reuse, record, cache)

    # -- images -----------------------------------------------------------------------------------

class LatentTextToImageDenoiser(LatentPipelineDenoiser):
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
        check_unet_extras(unet.config, source, {}, "Stable Diffusion 1.x/2.x layout only")
        super().__init__(unet, scheduler_config, "latent_text_to_image", vae, vae_loader=vae_loader,
                         vae_config=vae_config, source=source)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_length = tokenizer_max_length(tokenizer, text_encoder, source)
        self.null_embedding = self.encode_prompts([""])  # (1, L, D): the pipeline's default negative prompt
        self.cfg = ClassifierFreeGuidance(self._unet_forward, self.null_embedding)
        self.units = with_guidance_unit(self.units)  # the guidance direction is a reusable unit
        self._text_fingerprint: str | None = None

    # -- text -------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Prompt embeddings ``(B, L, D)`` as StableDiffusionPipeline computes them (no grad)."""
        prompts = self._check_prompts(prompts)
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
        cond = self._encoded(cond)
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

    # -- identity ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """UNet weights + configs + the text side (text encoder weights, tokenizer vocab, merges, special
        tokens and length)."""
        if self._text_fingerprint is None:
            self._text_fingerprint = fingerprint_module(self.text_encoder,
                                                        tokenizer_identity(self.tokenizer, self.max_length))
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
    check_parts(path, index, PARTS, "a latent text-to-image pipeline")
    unet_config = read_json(path / "unet" / "config.json")
    if unet_config.get("_class_name") != "UNet2DConditionModel":
        raise ModelError(f"{path}/unet: {unet_config.get('_class_name')} is not a UNet2DConditionModel")
    # before any weights load: an SDXL-like UNet would otherwise fail later, inside the first forward
    check_unet_extras(unet_config, f"{path}/unet", {}, "Stable Diffusion 1.x/2.x layout only")
    check_parts(path, index, classes={"text_encoder": TEXT_ENCODERS, "tokenizer": TOKENIZERS,
                                      "vae": ("AutoencoderKL",)})
    sched_config = read_scheduler_file(path / "scheduler" / "scheduler_config.json")
    vae_config = read_json(path / "vae" / "config.json")
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelError("loading a latent pipeline directory needs `pip install autotune-diffusion[diffusers]` "
                         "(diffusers and transformers)") from e

    unet = frozen(from_pretrained(UNet2DConditionModel, path / "unet", dtype=dtype), device)
    text_encoder = frozen(from_pretrained(CLIPTextModel, path / "text_encoder", dtype=dtype), device)
    tokenizer = load_clip_tokenizer(path / "tokenizer")

    def load_vae() -> nn.Module:
        return frozen(from_pretrained(AutoencoderKL, path / "vae", dtype=dtype), device)

    return LatentTextToImageDenoiser(unet, text_encoder, tokenizer, sched_config, vae_loader=load_vae,
                                     vae_config=vae_config, source=str(path))
