"""Stable Diffusion 3 pipeline directories (``StableDiffusion3Pipeline`` layout) as a Denoiser.

A directory with ``model_index.json`` + ``transformer/`` (SD3Transformer2DModel) + ``text_encoder/`` and
``text_encoder_2/`` (CLIPTextModelWithProjection) + ``tokenizer/`` and ``tokenizer_2/`` (CLIP) + optionally
``text_encoder_3/`` (T5EncoderModel) and ``tokenizer_3/`` (T5) + ``vae/`` (AutoencoderKL) + ``scheduler/``
(a flow-matching config: FlowMatchEulerDiscreteScheduler). SD3 lets the T5 pair be absent (null entries in
model_index.json); its embeddings are then zeros, as the pipeline makes them.

Prompts are encoded once, as ``StableDiffusion3Pipeline.encode_prompt`` does: both CLIP tokenizers pad to the
first tokenizer's ``model_max_length``; the penultimate hidden states of the two CLIP encoders are concatenated
along the features and zero-padded to the T5 width; the T5 states (``max_sequence_length`` tokens, 256 by
default) follow them along the tokens. The pooled embedding is the two CLIP projections side by side. Both
travel together in an :class:`PooledTextCondition`, which indexes and expands along the batch like a tensor.

The model is a velocity (flow) predictor fed sigma x num_train_timesteps as a float, as FlowMatchEuler's
timesteps are; the noise schedule is the scheduler config's FlowMatching with the pipeline's shift (with
``use_dynamic_shifting``, mu from the image token count of the default resolution, as the pipeline computes it).
The null condition of classifier-free guidance is the encoding of ``""`` (the pipeline's default negative
prompt); guided calls run both halves in ONE batched transformer forward (``models/guidance.py``). Only the
transformer runs inside the sampling loop; ``decode`` (the VAE) runs outside it.

Example (a directory on disk):
    >>> model = load_sd3_pipeline_dir("path/to/sd3")                          # doctest: +SKIP
    >>> cond = model.encode_prompts(["a photo of a cat", "a red car"])        # doctest: +SKIP
    >>> noise = torch.randn(2, *model.sample_shape)                           # doctest: +SKIP
    >>> s = dataclasses.replace(build("flow-euler", model.noise, 28), guidance=7.0)   # doctest: +SKIP
    >>> images = model.decode(sample(model, s, noise, cond).sample)          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from autotune.errors import ModelError
from autotune.models.conditions import PooledTextCondition, PooledTextEngineInputs
from autotune.models.diffusers_dir import (
    from_pretrained,
    is_flow_config,
    read_json,
    read_scheduler_config,
    read_scheduler_file,
)
from autotune.models.guidance import ClassifierFreeGuidance, with_guidance_unit
from autotune.models.latent import (
    ENCODE_CHUNK,
    TOKENIZERS,
    PromptMemo,
    VAEDecoding,
    check_parts,
    frozen,
    index_class,
    load_clip_tokenizer,
    tokenizer_identity,
    tokenizer_max_length,
)
from autotune.models.transformer_units import mark_transformer_blocks
from autotune.sampling.denoiser import TorchDenoiser, fingerprint_module

PARTS = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
CLASSES = {"text_encoder": ("CLIPTextModelWithProjection",), "text_encoder_2": ("CLIPTextModelWithProjection",),
           "tokenizer": TOKENIZERS, "tokenizer_2": TOKENIZERS, "vae": ("AutoencoderKL",)}
T5_CLASSES = {"text_encoder_3": ("T5EncoderModel",), "tokenizer_3": ("T5TokenizerFast", "T5Tokenizer")}
MAX_SEQUENCE_LENGTH = 256  # the pipeline's default T5 token count
MAX_T5_LENGTH = 512  # the pipeline refuses longer


def _t5_identity(tokenizer: Any, max_length: int) -> dict[str, Any]:
    """What decides a T5 tokenizer's ids: its whole model (a Unigram's pieces AND scores: the scores choose the
    segmentation), normaliser and pre-tokeniser, the special tokens and the padded length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: the vocabulary is what we can see
        doc: Any = sorted(tokenizer.get_vocab().items())
    else:
        full = json.loads(backend.to_str())
        doc = {k: full.get(k) for k in ("model", "normalizer", "pre_tokenizer", "post_processor")}
    specials = getattr(tokenizer, "special_tokens_map", {})
    return {"model": hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16],
            "specials": {k: str(v) for k, v in sorted(specials.items())}, "max_length": max_length,
            "class": type(tokenizer).__name__}


class SD3Denoiser(PooledTextEngineInputs, VAEDecoding, PromptMemo, TorchDenoiser):
    """An SD3 model: SD3Transformer2DModel + two CLIP text encoders (+ T5) + VAE + flow scheduler config.

    ``cond`` is an :class:`PooledTextCondition` from :meth:`encode_prompts` (one condition is broadcast over the batch),
    or a list of B prompt strings, encoded once (the last list is memoised). ``cond=None`` samples with the
    null condition (the empty prompt). With a ``guidance`` scale, the conditional and unconditional halves run
    in ONE batched transformer forward.

    Args:
        transformer: a diffusers SD3Transformer2DModel.
        text_encoders: the two CLIPTextModelWithProjection.
        tokenizers: their CLIP tokenizers.
        scheduler_config: the pipeline's scheduler config (a flow-matching one).
        t5, t5_tokenizer: the T5EncoderModel and its tokenizer, or both None (T5 embeddings are then zeros).
        vae, vae_loader, vae_config: the AutoencoderKL, or a function loading it on the first :meth:`decode`
            and its config meanwhile.
        max_sequence_length: T5 tokens per prompt (the pipeline's ``max_sequence_length``).
        source: where the model came from (for messages).
    """

    DEFAULT_SCALING = 1.5305  # scaling_factor when the VAE config lacks it (SD3's VAE)

    def __init__(
        self,
        transformer: nn.Module,
        text_encoders: tuple[nn.Module, nn.Module],
        tokenizers: tuple[Any, Any],
        scheduler_config: dict[str, Any],
        t5: nn.Module | None = None,
        t5_tokenizer: Any = None,
        vae: nn.Module | None = None,
        *,
        vae_loader: Callable[[], nn.Module] | None = None,
        vae_config: dict[str, Any] | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        source: str = "",
    ) -> None:
        where = source or "sd3"
        if (t5 is None) != (t5_tokenizer is None):
            raise ModelError(f"{where}: the T5 text encoder and its tokenizer come together (give both or neither)")
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= MAX_T5_LENGTH:
            raise ModelError(f"{where}: max_sequence_length must be an integer in 1..{MAX_T5_LENGTH}, got "
                             f"{max_sequence_length!r}")
        cfg = transformer.config
        size, patch = cfg.sample_size, cfg.patch_size
        for key, value in (("sample_size", size), ("patch_size", patch), ("in_channels", cfg.in_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"{where}/transformer: {key} must be a positive integer, got {value!r}")
        if size % patch:
            raise ModelError(f"{where}/transformer: sample_size {size} is not a multiple of patch_size {patch}")
        # the token count the pipeline computes mu from (use_dynamic_shifting) at its default resolution,
        # whose latents are sample_size x sample_size
        self.image_seq_len = (size // patch) * (size // patch)
        if not is_flow_config(scheduler_config):
            raise ModelError(f"{where}/scheduler: {scheduler_config.get('_class_name')} is not a flow-matching "
                             "scheduler (SD3 samples with FlowMatchEulerDiscreteScheduler)")
        noise, parameterization, scheduler_keys = read_scheduler_config(scheduler_config,
                                                                        image_seq_len=self.image_seq_len)
        self.text_encoders = tuple(text_encoders)
        self.tokenizers = tuple(tokenizers)
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        # the pipeline pads BOTH CLIP prompts to the first tokenizer's length
        self.max_length = tokenizer_max_length(self.tokenizers[0], self.text_encoders[0], source)
        limit = int(getattr(self.text_encoders[1].config, "max_position_embeddings", 77))
        if self.max_length > limit:
            raise ModelError(f"{where}: the first tokenizer pads to {self.max_length} tokens, more than the second "
                             f"text encoder's max_position_embeddings {limit}")
        self.max_sequence_length = max_sequence_length
        self.joint_dim = int(cfg.joint_attention_dim)
        self.pooled_dim = int(cfg.pooled_projection_dim)
        config = {
            "kind": "sd3",
            # without _name_or_path (where it was loaded from) and _diffusers_version: a copied directory is the
            # same model
            "transformer": {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"},
            "scheduler": scheduler_keys,
            "image_seq_len": self.image_seq_len,
            "max_sequence_length": max_sequence_length,
            "t5": t5 is not None,
        }
        mark_transformer_blocks(transformer)  # its blocks are units a schedule may skip or reuse
        super().__init__(self._transformer_forward, noise, parameterization, module=transformer, round_time=False,
                         config=config)
        self.transformer = transformer
        self.scheduler_config = scheduler_config
        self.source = source
        self.init_vae(vae, vae_loader, vae_config)
        self.num_classes = None
        self.sample_shape = (int(cfg.in_channels), int(size), int(size))
        clip_width = sum(int(enc.config.hidden_size) for enc in self.text_encoders)
        t5_width = int(t5.config.d_model) if t5 is not None else self.joint_dim
        if t5_width != self.joint_dim:
            raise ModelError(f"{where}: the T5 encoder's width {t5_width} does not fit the transformer's "
                             f"joint_attention_dim {self.joint_dim}")
        if clip_width > t5_width:  # the pipeline would cut CLIP features off (a negative pad) instead of padding
            raise ModelError(f"{where}: the CLIP encoders' widths add up to {clip_width}, more than the "
                             f"joint_attention_dim {self.joint_dim} they are padded to")
        projections = sum(int(enc.config.projection_dim) for enc in self.text_encoders)
        if projections != self.pooled_dim:
            raise ModelError(f"{where}: the CLIP projections add up to {projections}, but the transformer's "
                             f"pooled_projection_dim is {self.pooled_dim}")
        self._memo: tuple[tuple[str, ...], PooledTextCondition] | None = None
        self.null_condition = self.encode_prompts([""])  # the pipeline's default negative prompt
        self.cfg = ClassifierFreeGuidance(self._transformer_forward, self.null_condition)
        self.units = with_guidance_unit(self.units)  # the guidance direction is a reusable unit
        self._text_fingerprint: str | None = None

    # -- text -------------------------------------------------------------------------------------

    def _clip(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states, projected pooled output) of CLIP encoder ``index``."""
        tokenizer, encoder = self.tokenizers[index], self.text_encoders[index]
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        # the pipeline casts the hidden states (not the pooled output) to the FIRST encoder's dtype
        return out.hidden_states[-2].to(self.text_encoders[0].dtype), out.text_embeds

    def _t5_states(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        if self.t5 is None:  # the pipeline's zeros, in the first CLIP encoder's dtype
            return torch.zeros(len(prompts), self.max_sequence_length, self.joint_dim, device=device,
                               dtype=self.text_encoders[0].dtype)
        ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt").input_ids
        return self.t5(ids.to(next(self.t5.parameters()).device))[0].to(device=device, dtype=self.t5.dtype)

    def encode_prompts(self, prompts: Sequence[str] | str) -> PooledTextCondition:
        """The condition of B prompts as StableDiffusion3Pipeline.encode_prompt computes it (no grad)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ModelError("prompts: expected a non-empty list of strings")
        embeds, pooled = [], []
        with torch.no_grad():
            for i in range(0, len(prompts), ENCODE_CHUNK):
                chunk = prompts[i:i + ENCODE_CHUNK]
                (h1, p1), (h2, p2) = self._clip(0, chunk), self._clip(1, chunk)
                t5 = self._t5_states(chunk, h1.device)
                clip = torch.cat([h1, h2], dim=-1)
                clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
                embeds.append(torch.cat([clip, t5], dim=-2))
                pooled.append(torch.cat([p1, p2], dim=-1))
        return PooledTextCondition(torch.cat(embeds), torch.cat(pooled))

    def condition(self, cond: Any, x: torch.Tensor) -> PooledTextCondition:
        """Validate ``cond`` (a PooledTextCondition or prompt strings) for the batch ``x``, expanded to it."""
        cond = self._encoded(cond)
        where = self.source or "sd3"
        if not isinstance(cond, PooledTextCondition):
            raise ModelError(f"{where}: cond must be a PooledTextCondition from encode_prompts (prompt and pooled "
                             f"embeddings), or a list of prompts; got {type(cond).__name__}")
        if cond.prompt_embeds.shape[-1] != self.joint_dim or cond.pooled_embeds.shape[-1] != self.pooled_dim:
            raise ModelError(f"{where}: prompt embeddings {tuple(cond.prompt_embeds.shape)} and pooled embeddings "
                             f"{tuple(cond.pooled_embeds.shape)}; expected (B, L, {self.joint_dim}) and "
                             f"(B, {self.pooled_dim})")
        return cond.expand(x.shape[0]).to(x.device)

    # -- the network ------------------------------------------------------------------------------

    def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None, reuse=frozenset(), record=frozenset(),
                 cache=None):
        """Velocity at time t; cond + null condition in one batched transformer forward when guided."""
        tm = self.model_time(x, t)
        cond = None if cond is None else self.condition(cond, x)
        return self.cfg.masked(self.module, x, tm, cond, guidance, skip, reuse, record, cache)

    def _transformer_forward(self, x: torch.Tensor, tm: torch.Tensor, cond: PooledTextCondition) -> torch.Tensor:
        dtype = self.transformer.dtype
        cond = cond.to(device=x.device, dtype=dtype)
        try:
            return self.transformer(hidden_states=x.to(dtype), timestep=tm, encoder_hidden_states=cond.prompt_embeds,
                                    pooled_projections=cond.pooled_embeds, return_dict=False)[0]
        except (RuntimeError, ValueError, TypeError, ZeroDivisionError, IndexError) as e:
            # a transformer whose config loads but whose forward fails: the user's directory, one line naming it
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ModelError(f"{self.source or 'transformer'}: the SD3 transformer fails on latents of shape "
                             f"{tuple(x.shape)} ({type(e).__name__}: {first})") from None

    # -- images -----------------------------------------------------------------------------------

    # -- identity ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Transformer weights + configs + both CLIP encoders' weights and tokenizers (vocab, merges, special
        tokens, length) + the T5 encoder's weights and tokenizer model (or its absence)."""
        if self._text_fingerprint is None:
            parts = [fingerprint_module(enc, tokenizer_identity(tok, self.max_length))
                     for enc, tok in zip(self.text_encoders, self.tokenizers)]
            if self.t5 is not None:
                parts.append(fingerprint_module(self.t5, _t5_identity(self.t5_tokenizer, self.max_sequence_length)))
            self._text_fingerprint = ",".join(parts)
        return fingerprint_module(self.transformer, {**self.config, "text": self._text_fingerprint})


def _load_t5_tokenizer(folder: Path) -> Any:
    """The T5 tokenizer of ``tokenizer_3/`` (tokenizer.json, or spiece.model), or ONE ModelError naming it."""
    from transformers import T5TokenizerFast

    try:
        return T5TokenizerFast.from_pretrained(str(folder))
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, tokenizers' own exceptions
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelError(f"{folder}: cannot load the T5 tokenizer ({type(e).__name__}: {first})") from None


def load_sd3_pipeline_dir(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> SD3Denoiser:
    """Load an SD3 pipeline directory; the VAE is loaded on the first ``decode``. ``text_encoder_3`` and
    ``tokenizer_3`` may both be absent (the pipeline then uses zero T5 embeddings).

    Raises:
        ModelError: ONE line: a part is missing or of an unsupported class, or the parts do not fit together.
    """
    path = Path(path)
    index = read_json(path / "model_index.json")
    check_parts(path, index, PARTS, "an SD3 text-to-image pipeline", {})
    transformer_config = read_json(path / "transformer" / "config.json")
    if transformer_config.get("_class_name") != "SD3Transformer2DModel":
        raise ModelError(f"{path}/transformer: {transformer_config.get('_class_name')} is not an SD3Transformer2DModel")
    check_parts(path, index, (), "", CLASSES)
    with_t5 = [index_class(index, part) is not None for part in T5_CLASSES]
    if with_t5[0] != with_t5[1]:
        raise ModelError(f"{path}/model_index.json: text_encoder_3 and tokenizer_3 come together (give both, or "
                         "neither for zero T5 embeddings)")
    if with_t5[0]:
        check_parts(path, index, (), "", T5_CLASSES)
    sched_config = read_scheduler_file(path / "scheduler" / "scheduler_config.json")
    if not is_flow_config(sched_config):  # before any weights load
        raise ModelError(f"{path}/scheduler: {sched_config.get('_class_name')} is not a flow-matching scheduler "
                         "(SD3 samples with FlowMatchEulerDiscreteScheduler)")
    vae_config = read_json(path / "vae" / "config.json")
    try:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelError("loading an SD3 pipeline directory needs `pip install autotune-diffusion[diffusers]` "
                         "(diffusers and transformers)") from e

    transformer = frozen(from_pretrained(SD3Transformer2DModel, path / "transformer", dtype=dtype), device)
    encoders = tuple(frozen(from_pretrained(CLIPTextModelWithProjection, path / name, dtype=dtype), device)
                     for name in ("text_encoder", "text_encoder_2"))
    tokenizers = (load_clip_tokenizer(path / "tokenizer"), load_clip_tokenizer(path / "tokenizer_2"))
    t5 = t5_tokenizer = None
    if with_t5[0]:
        t5 = frozen(from_pretrained(T5EncoderModel, path / "text_encoder_3", dtype=dtype), device)
        t5_tokenizer = _load_t5_tokenizer(path / "tokenizer_3")

    def load_vae() -> nn.Module:
        return frozen(from_pretrained(AutoencoderKL, path / "vae", dtype=dtype), device)

    return SD3Denoiser(transformer, encoders, tokenizers, sched_config, t5, t5_tokenizer, vae_loader=load_vae,
                       vae_config=vae_config, source=str(path))
