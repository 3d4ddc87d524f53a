"""Flux pipeline directories (``FluxPipeline`` layout) as a Denoiser.

A directory with ``model_index.json`` + ``transformer/`` (FluxTransformer2DModel) + ``text_encoder/``
(CLIPTextModel) + ``tokenizer/`` (CLIPTokenizer) + ``text_encoder_2/`` (T5EncoderModel) + ``tokenizer_2/`` (T5
tokenizer) + ``vae/`` (AutoencoderKL) + ``scheduler/`` (FlowMatchEulerDiscreteScheduler).

The state the sampler integrates is the UNPACKED latent ``(B, C, H, W)``, so noise, evaluation sets and schedules
look as they do for every other latent model; only the network call packs it into 2 x 2 patches (``(B, H/2 *
W/2, 4C)`` tokens, FluxPipeline's ``_pack_latents``) and unpacks the transformer's velocity the same way back.
Packing is a fixed permutation, so integrating either form gives the same numbers.

What the pipeline hands its transformer besides the latents, built the way ``FluxPipeline.__call__`` builds it:
  * prompts encoded once (``encode_prompt``): the CLIP pooled output (``pooled_projections``) and the T5 last
    hidden states padded to ``max_sequence_length`` (``encoder_hidden_states``), carried together in a
    :class:`PooledTextCondition`; ``cond=None`` is the empty prompt's encoding;
  * text ids (zeros, one row per T5 token) and latent image ids (row, column of each patch);
  * the timestep as the pipeline feeds it: the scheduler's ``sigma x 1000`` divided by 1000;
  * for guidance-distilled ("dev") transformers (``guidance_embeds=True``) the guidance scale as the
    ``guidance`` input, the schedule's ``guidance`` field (None: the pipeline's default 3.5), with no
    classifier-free batch; for the others ("schnell") a schedule's ``guidance`` is true classifier-free
    guidance against the empty prompt (FluxPipeline's ``true_cfg_scale`` with ``negative_prompt=""``), both
    halves in ONE batched forward (``models/guidance.py``; the condition pairs itself with the null one).

The noise schedule is the scheduler config's FlowMatching with mu fixed by the packed token count of the
default resolution (the VAE config's ``sample_size``, which is the pipeline's 128 x 8 = 1024 pixels for the
released FLUX.1 models; else the pipeline's 128 latent pixels), and ``pipeline_sigmas`` because FluxPipeline
passes ``sigmas = linspace(1, 1/n, n)`` to ``set_timesteps`` (so ``flow-euler`` is the pipeline's own
schedule). ``decode`` runs the VAE outside the sampling loop (``latents / scaling_factor + shift_factor``).

Example (a directory on disk):
    >>> model = load_flux_pipeline_dir("path/to/flux")                       # doctest: +SKIP
    >>> cond = model.encode_prompts(["a photo of a cat", "a red car"])       # doctest: +SKIP
    >>> noise = torch.randn(2, *model.sample_shape)                          # doctest: +SKIP
    >>> s = dataclasses.replace(build("flow-euler", model.noise, 28), guidance=3.5)   # doctest: +SKIP
    >>> images = model.decode(sample(model, s, noise, cond).sample)         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from autotune.errors import ModelError
from autotune.models.conditions import PooledTextCondition, PooledTextEngineInputs
from autotune.models.diffusers_dir import from_pretrained, read_json, read_scheduler_config, read_scheduler_file
from autotune.models.guidance import ClassifierFreeGuidance, with_guidance_unit
from autotune.models.latent import (
    PromptMemo, VAEDecoding, check_parts, frozen, tokenizer_max_length, vae_scale_factor,
)
from autotune.models.transformer_units import mark_transformer_blocks
from autotune.sampling.denoiser import TorchDenoiser, fingerprint_module, unit_masks
from autotune.sampling.noise import FlowMatching

PARTS = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
CLASSES = {"text_encoder": ("CLIPTextModel",), "text_encoder_2": ("T5EncoderModel",),
           "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "tokenizer_2": ("T5TokenizerFast", "T5Tokenizer"),
           "vae": ("AutoencoderKL",)}
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default max_sequence_length, and the most it accepts
PIPELINE_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: latent pixels of its default resolution
ENCODE_CHUNK = 64  # prompts per text-encoder forward
MAX_LATENT_SIZE = 4096  # latent pixels per side; beyond this a size is a mistake, not a resolution


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: each 2 x 2 patch one token, channels outermost within it, patches
    in row-major order (the layout of FluxPipeline._pack_latents, which the image ids number)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent of ``height x width`` pixels."""
    b, n, d = tokens.shape
    c = d // 4
    return tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_image_ids(rows: int, cols: int, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows * cols, 3)`` position ids of the packed tokens: 0, then the patch's row and column."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows, dtype=ids.dtype)[:, None]
    ids[..., 2] = torch.arange(cols, dtype=ids.dtype)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def _load_tokenizer(cls: Any, folder: Path) -> Any:
    """A tokenizer from a pipeline's folder, every failure of the user's files as ONE ModelError naming it."""
    if not folder.is_dir():
        raise ModelError(f"{folder}: missing (a Flux pipeline directory has tokenizer/ and tokenizer_2/)")
    try:
        return cls.from_pretrained(str(folder))
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, TypeError, tokenizers' own
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelError(f"{folder}: cannot load {cls.__name__} ({type(e).__name__}: {first})") from None


def _tokenizer_identity(tokenizer: Any, max_length: int) -> dict[str, Any]:
    """What decides the token ids a tokenizer gives: its whole backend (normaliser, pre-tokeniser, model:
    BPE merges or unigram scores) less the padding/truncation state every call changes, or its vocab when it
    has no backend; the special tokens, the padded length and the class. (latent.tokenizer_identity hashes
    vocab and merges only: a T5 unigram tokenizer's pieces are split by their scores, which it would miss.)"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:
        spec = sorted(tokenizer.get_vocab().items())
    specials = getattr(tokenizer, "special_tokens_map", {})
    return {"tokens": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16],
            "specials": {k: str(v) for k, v in sorted(specials.items())}, "max_length": max_length,
            "class": type(tokenizer).__name__}


def default_latent_size(vae_config: dict[str, Any], height: int | None = None, width: int | None = None,
                        source: str = "") -> tuple[int, int]:
    """Latent (H, W) of the default resolution, rounded as FluxPipeline rounds (``2 * (pixels // (2 x vae
    factor))``). Pixels: ``height``/``width`` when given, else the VAE config's ``sample_size``, else the
    pipeline's ``128 x vae factor``."""
    factor = vae_scale_factor(vae_config)
    size = vae_config.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        base = (size[0], size[1])
    elif isinstance(size, int) and not isinstance(size, bool):
        base = (size, size)
    else:
        base = (PIPELINE_SAMPLE_SIZE * factor,) * 2
    pixels = (height if height is not None else base[0], width if width is not None else base[1])
    latent = []
    for name, p in zip(("height", "width"), pixels):
        if not isinstance(p, int) or isinstance(p, bool) or not 2 * factor <= p <= MAX_LATENT_SIZE * factor:
            raise ModelError(f"{source or 'flux'}: {name} {p!r} must be an integer in {2 * factor}.."
                             f"{MAX_LATENT_SIZE * factor} pixels (the VAE factor is {factor}, latents pack in 2 x 2)")
        latent.append(2 * (p // (factor * 2)))
    return latent[0], latent[1]


def vae_latent_channels(vae_config: dict[str, Any], source: str) -> int:
    channels = vae_config.get("latent_channels", 4)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ModelError(f"{source}/vae: latent_channels {channels!r} must be a positive integer")
    return channels


def flux_noise_schedule(scheduler_config: dict[str, Any], image_seq_len: int, source: str
                        ) -> tuple[FlowMatching, dict[str, Any]]:
    """(noise schedule, the config keys defining it) as FluxPipeline steps it at ``image_seq_len`` packed tokens:
    mu from that count (when the config shifts dynamically), and the sigmas the pipeline passes."""
    noise, kind, keys = read_scheduler_config(scheduler_config, image_seq_len=image_seq_len)
    if kind != "flow" or not isinstance(noise, FlowMatching):
        raise ModelError(f"{source}/scheduler: {scheduler_config.get('_class_name') or 'the scheduler'} is not a "
                         "flow-matching scheduler (Flux is a flow model: FlowMatchEulerDiscreteScheduler, or "
                         "use_flow_sigmas)")
    # FluxPipeline hands set_timesteps sigmas=linspace(1, 1/n, n), except to use_flow_sigmas schedulers
    return dataclasses.replace(noise, pipeline_sigmas=not scheduler_config.get("use_flow_sigmas")), keys


def check_transformer_config(config: Any, source: str, latent_channels: int | None = None) -> None:
    """Refuse a FluxTransformer2DModel config this adapter would feed wrongly, before any weights load."""
    def get(key: str, default: Any = None) -> Any:
        return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

    patch = get("patch_size", 1)
    if patch != 1:  # FluxPipeline packs 2 x 2 patches itself and feeds tokens; a patching transformer is another model
        raise ModelError(f"{source}: patch_size {patch!r} is not supported (FluxPipeline's transformers take packed "
                         "tokens, patch_size 1)")
    channels = get("in_channels", 64)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 4 or channels % 4:
        raise ModelError(f"{source}: in_channels {channels!r} must be a positive multiple of 4 (2 x 2 patches of the "
                         "latent channels)")
    out = get("out_channels") or channels
    if out != channels:
        raise ModelError(f"{source}: out_channels {out!r} differs from in_channels {channels} (the velocity must "
                         "unpack to the latent's shape)")
    if latent_channels is not None and 4 * latent_channels != channels:
        raise ModelError(f"{source}: in_channels {channels} is not 4 x the VAE's latent_channels {latent_channels}")


class FluxDenoiser(PooledTextEngineInputs, VAEDecoding, PromptMemo, TorchDenoiser):
    """A Flux model: FluxTransformer2DModel + CLIP (pooled) and T5 text encoders + VAE + flow scheduler config.

    ``cond`` is a :class:`PooledTextCondition` from :meth:`encode_prompts` (one condition is broadcast over the
    batch), or a list of B prompt strings, encoded once (the last list is memoised); ``cond=None`` is the empty
    prompt. ``guidance`` is the distilled guidance scale of a ``guidance_embeds`` transformer (None: 3.5, the
    pipeline's default), or the true classifier-free guidance scale of one without.

    Args:
        transformer: a diffusers FluxTransformer2DModel (patch_size 1, in_channels = 4 x latent channels).
        text_encoders: the CLIPTextModel (pooled output) and the T5EncoderModel (hidden states).
        tokenizers: their tokenizers.
        scheduler_config: the pipeline's flow scheduler config.
        vae, vae_loader, vae_config: the AutoencoderKL, or a function loading it on the first :meth:`decode`
            and its config meanwhile (for the VAE factor, latent channels, default resolution).
        height, width: the default resolution in pixels (fixes mu and ``sample_shape``); see
            :func:`default_latent_size`.
        max_sequence_length: T5 tokens prompts are padded/truncated to (the pipeline's default 512).
        source: where the model came from (for messages).
    """

    DEFAULT_SCALING = 1.0  # scaling_factor when the VAE config lacks it (none: Flux configs always have one)

    def __init__(
        self,
        transformer: nn.Module,
        text_encoders: tuple[nn.Module, nn.Module],
        tokenizers: tuple[Any, Any],
        scheduler_config: dict[str, Any],
        vae: nn.Module | None = None,
        *,
        vae_loader: Callable[[], nn.Module] | None = None,
        vae_config: dict[str, Any] | None = None,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        source: str = "",
    ) -> None:
        where = source or "flux"
        self.source = source
        self.init_vae(vae, vae_loader, vae_config)
        latent_channels = vae_latent_channels(self.vae_config, where)
        cfg = transformer.config
        check_transformer_config(cfg, f"{where}/transformer", latent_channels)
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ModelError(f"{where}: max_sequence_length {max_sequence_length!r} must be in "
                             f"1..{MAX_SEQUENCE_LENGTH} (FluxPipeline's limit)")
        self.transformer = transformer
        self.text_encoders = tuple(text_encoders)
        self.tokenizers = tuple(tokenizers)
        self.max_sequence_length = max_sequence_length
        # CLIP tokens per prompt: the tokenizer's model_max_length, as FluxPipeline pads
        self.clip_length = tokenizer_max_length(self.tokenizers[0], self.text_encoders[0], f"{where}/tokenizer")
        self.guidance_embeds = bool(cfg.guidance_embeds)
        clip_width = int(self.text_encoders[0].config.hidden_size)  # CLIPTextModel's pooler output is that wide
        t5_width = int(self.text_encoders[1].config.d_model)
        self.pooled_dim, self.embedding_dim = int(cfg.pooled_projection_dim), int(cfg.joint_attention_dim)
        if clip_width != self.pooled_dim or t5_width != self.embedding_dim:
            raise ModelError(f"{where}: the CLIP pooled width {clip_width} and T5 width {t5_width} do not fit the "
                             f"transformer's pooled_projection_dim {self.pooled_dim} and joint_attention_dim "
                             f"{self.embedding_dim}")
        h, w = default_latent_size(self.vae_config, height, width, where)
        self.sample_shape = (latent_channels, h, w)
        noise, scheduler_keys = flux_noise_schedule(scheduler_config, (h // 2) * (w // 2), where)
        config = {
            "kind": "flux",
            # without _name_or_path and _diffusers_version: a copied directory is the same model
            "transformer": {k: v for k, v in dict(cfg).items() if not k.startswith("_") or k == "_class_name"},
            "scheduler": scheduler_keys,
            "noise": noise.to_config(),
            "latent_size": [h, w],
            "max_sequence_length": max_sequence_length,
            "default_guidance": DEFAULT_GUIDANCE if self.guidance_embeds else None,
        }
        mark_transformer_blocks(transformer)  # its blocks are units a schedule may skip or reuse
        super().__init__(self._forward, noise, "flow", module=transformer, round_time=False, config=config)
        self.scheduler_config = scheduler_config
        self.num_classes = None
        self._memo: tuple[tuple[str, ...], PooledTextCondition] | None = None
        self._ids: dict[tuple[Any, ...], torch.Tensor] = {}
        self._text_fingerprint: str | None = None
        self.null_condition = self.encode_prompts([""])  # what cond=None means, and true CFG's negative prompt
        self.cfg = ClassifierFreeGuidance(self._forward, self.null_condition)
        if not self.guidance_embeds:  # true CFG: its guidance direction is a reusable unit
            self.units = with_guidance_unit(self.units)

    # -- text -------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str] | str) -> PooledTextCondition:
        """The condition of B prompts as FluxPipeline.encode_prompt computes it (no grad)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ModelError("prompts: expected a non-empty list of strings")
        (clip_tok, t5_tok), (clip, t5) = self.tokenizers, self.text_encoders
        embeds, pooled = [], []
        with torch.no_grad():
            for i in range(0, len(prompts), ENCODE_CHUNK):
                chunk = prompts[i:i + ENCODE_CHUNK]
                ids = clip_tok(chunk, padding="max_length", max_length=self.clip_length, truncation=True,
                               return_tensors="pt").input_ids
                # only CLIP's pooled output conditions Flux (through the timestep embedding)
                pooled.append(clip(ids.to(next(clip.parameters()).device), output_hidden_states=False)
                              .pooler_output.to(clip.dtype))
                ids = t5_tok(chunk, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                             return_tensors="pt").input_ids
                embeds.append(t5(ids.to(next(t5.parameters()).device), output_hidden_states=False)[0].to(t5.dtype))
        return PooledTextCondition(torch.cat(embeds), torch.cat(pooled).to(embeds[0].device))

    def condition(self, cond: Any, x: torch.Tensor) -> PooledTextCondition:
        """Validate ``cond`` (a PooledTextCondition, prompt strings, or None) for the batch ``x``, expanded to it."""
        where = self.source or "flux"
        cond = self.null_condition if cond is None else self._encoded(cond)
        if not isinstance(cond, PooledTextCondition):
            raise ModelError(f"{where}: cond must be a PooledTextCondition from encode_prompts (T5 prompt embeddings "
                             f"and CLIP pooled embeddings), or a list of prompts; got {type(cond).__name__}")
        if cond.prompt_embeds.shape[-1] != self.embedding_dim or cond.pooled_embeds.shape[-1] != self.pooled_dim:
            raise ModelError(f"{where}: prompt embeddings {tuple(cond.prompt_embeds.shape)} and pooled embeddings "
                             f"{tuple(cond.pooled_embeds.shape)}; expected (B, L, {self.embedding_dim}) and "
                             f"(B, {self.pooled_dim})")
        if len(cond) not in (1, x.shape[0]):
            raise ModelError(f"{where}: {len(cond)} prompt conditions for a batch of {x.shape[0]} latents (give one "
                             "per sample, or one for all)")
        return cond.expand(x.shape[0]).to(x.device)

    # -- the network ------------------------------------------------------------------------------

    def _check_latents(self, x: torch.Tensor) -> None:
        c = self.sample_shape[0]
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] % 2 or x.shape[3] % 2 or x.shape[2] < 2 or x.shape[3] < 2:
            raise ModelError(f"{self.source or 'flux'}: latents of shape {tuple(x.shape)}; expected (B, {c}, H, W) "
                             "with H and W even (they are packed in 2 x 2 patches)")

    def _image_ids(self, rows: int, cols: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
        key = (rows, cols, str(device), dtype)
        if key not in self._ids:
            self._ids[key] = latent_image_ids(rows, cols, device, dtype)
        return self._ids[key]

    def _forward(self, x: torch.Tensor, tm: torch.Tensor, cond: PooledTextCondition,
                 guidance: float | None = None) -> torch.Tensor:
        """The transformer's velocity for unpacked latents ``x``, fed as FluxPipeline feeds it."""
        b, _, h, w = x.shape
        dtype, device = self.transformer.dtype, x.device
        embeds = cond.prompt_embeds.to(device)
        # the pipeline feeds the scheduler's timestep (sigma x 1000) divided by 1000; the transformer multiplies back
        timestep = tm.to(dtype) / 1000
        scale = None
        if self.guidance_embeds:
            scale = torch.full((b,), DEFAULT_GUIDANCE if guidance is None else float(guidance), dtype=torch.float32,
                               device=device)
        try:
            out = self.transformer(
                hidden_states=pack_latents(x.to(dtype)), timestep=timestep, guidance=scale,
                pooled_projections=cond.pooled_embeds.to(device), encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype),
                img_ids=self._image_ids(h // 2, w // 2, device, embeds.dtype), return_dict=False,
            )[0]
        except (RuntimeError, ValueError, TypeError, ZeroDivisionError, IndexError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ModelError(f"{self.source or 'transformer'}: the Flux transformer fails on latents of shape "
                             f"{tuple(x.shape)} ({type(e).__name__}: {first})") from None
        return unpack_latents(out, h, w)

    def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None, reuse=frozenset(), record=frozenset(),
                 cache=None):
        """Velocity for the latents at time t. Distilled guidance is an input of the one forward; true CFG (a
        transformer without guidance_embeds, ``guidance`` given) runs prompt and empty prompt in ONE batched
        forward."""
        self._check_latents(x)
        tm = self.model_time(x, t)
        cond = self.condition(cond, x)
        if self.guidance_embeds or guidance is None:
            with unit_masks(self.module, skip, reuse, record, cache):
                return self._forward(x, tm, cond, guidance)
        return self.cfg.masked(self.module, x, tm, cond, guidance, skip, reuse, record, cache)

    # -- images -----------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images in [-1, 1] from final (unpacked) latents, as FluxPipeline decodes them (``VAEDecoding``)."""
        self._check_latents(latents)
        return super().decode(latents, batch_size)

    # -- identity ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Transformer weights + configs + the text side (both encoders' weights, both tokenizers' vocabularies,
        special tokens and padded lengths)."""
        if self._text_fingerprint is None:
            parts = [fingerprint_module(enc, _tokenizer_identity(tok, n)) for enc, tok, n in
                     zip(self.text_encoders, self.tokenizers, (self.clip_length, self.max_sequence_length))]
            self._text_fingerprint = "-".join(parts)
        return fingerprint_module(self.transformer, {**self.config, "text": self._text_fingerprint})


def load_flux_pipeline_dir(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", *, height: int | None = None,
    width: int | None = None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> FluxDenoiser:
    """Load a FluxPipeline directory; the VAE is loaded on the first ``decode``.

    Raises:
        ModelError: ONE line: a part is missing or of an unsupported class, a config does not fit Flux, or a file
            does not load.
    """
    path = Path(path)
    index = read_json(path / "model_index.json")
    check_parts(path, index, PARTS, "a Flux pipeline", CLASSES)
    transformer_config = read_json(path / "transformer" / "config.json")
    if transformer_config.get("_class_name") != "FluxTransformer2DModel":
        raise ModelError(f"{path}/transformer: {transformer_config.get('_class_name')} is not a FluxTransformer2DModel")
    vae_config = read_json(path / "vae" / "config.json")
    sched_config = read_scheduler_file(path / "scheduler" / "scheduler_config.json")
    # before any weights load: a config we would feed wrongly fails here, not inside the first forward
    check_transformer_config(transformer_config, f"{path}/transformer", vae_latent_channels(vae_config, str(path)))
    h, w = default_latent_size(vae_config, height, width, str(path))
    flux_noise_schedule(sched_config, (h // 2) * (w // 2), str(path))
    try:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelError("loading a Flux pipeline directory needs `pip install autotune-diffusion[diffusers]` "
                         "(diffusers and transformers)") from e

    transformer = frozen(from_pretrained(FluxTransformer2DModel, path / "transformer", dtype=dtype), device)
    clip = frozen(from_pretrained(CLIPTextModel, path / "text_encoder", dtype=dtype), device)
    t5 = frozen(from_pretrained(T5EncoderModel, path / "text_encoder_2", dtype=dtype), device)
    tokenizers = (_load_tokenizer(CLIPTokenizer, path / "tokenizer"),
                  _load_tokenizer(T5TokenizerFast, path / "tokenizer_2"))

    def load_vae() -> nn.Module:
        return frozen(from_pretrained(AutoencoderKL, path / "vae", dtype=dtype), device)

    return FluxDenoiser(transformer, (clip, t5), tokenizers, sched_config, vae_loader=load_vae, vae_config=vae_config,
                        height=height, width=width, max_sequence_length=max_sequence_length, source=str(path))
