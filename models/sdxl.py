"""SDXL pipeline directories (``StableDiffusionXLPipeline`` layout) as a Denoiser.

A directory with ``model_index.json`` + ``unet/`` (UNet2DConditionModel, ``addition_embed_type="text_time"``)
+ ``text_encoder/`` (CLIPTextModel) + ``text_encoder_2/`` (CLIPTextModelWithProjection) + ``tokenizer/`` +
``tokenizer_2/`` + ``vae/`` + ``scheduler/``. Prompts are encoded once, as ``StableDiffusionXLPipeline.encode_prompt``
does: each tokenizer pads to its ``model_max_length``, the penultimate hidden states of both encoders are
concatenated along the feature axis (the prompt embeddings), and the second encoder's projected output is the
pooled embedding. Each sample also carries SDXL's micro-conditioning, the time ids (original size, crop
top-left, target size), by default those the pipeline uses at its default resolution: (H, W, 0, 0, H, W)
with H x W = the UNet's sample size times the VAE factor. All three travel together in an
:class:`SDXLCondition`, which indexes and expands along the batch like a tensor.

The null condition of classifier-free guidance is the pipeline's default negative: zeros for embeddings and
pooled embeddings when the pipeline config says ``force_zeros_for_empty_prompt`` (SDXL base does), else the
encoding of ``""``; its time ids are the conditional ones (the pipeline's ``negative_*_size`` default to the
positive). Guided calls run both halves in ONE batched UNet forward (``models/guidance.py``). Only the UNet runs
inside the sampling loop; ``decode`` (the VAE, in float32 when a float16 VAE asks for ``force_upcast``) runs
outside it.

Example (a directory on disk):
    >>> model = load_sdxl_pipeline_dir("path/to/sdxl")                        # doctest: +SKIP
    >>> cond = model.encode_prompts(["a photo of a cat", "a red car"])        # doctest: +SKIP
    >>> noise = torch.randn(2, *model.sample_shape)                           # doctest: +SKIP
    >>> s = dataclasses.replace(build("dpmsolver++2m", model.noise, 8), guidance=5.0)   # doctest: +SKIP
    >>> images = model.decode(sample(model, s, noise, cond).sample)          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from autotune.errors import ModelError
from autotune.models.conditions import BatchedCondition
from autotune.models.diffusers_dir import from_pretrained, read_json, read_scheduler_file
from autotune.models.guidance import ClassifierFreeGuidance, with_guidance_unit
from autotune.models.latent import (
    ENCODE_CHUNK,
    TOKENIZERS,
    LatentPipelineDenoiser,
    check_parts,
    check_unet_extras,
    frozen,
    load_clip_tokenizer,
    tokenizer_identity,
    tokenizer_max_length,
)
from autotune.sampling.denoiser import fingerprint_module

PARTS = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
CLASSES = {"text_encoder": ("CLIPTextModel",), "text_encoder_2": ("CLIPTextModelWithProjection",),
           "tokenizer": TOKENIZERS, "tokenizer_2": TOKENIZERS, "vae": ("AutoencoderKL",)}
TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)
FAMILY = "SDXL: addition_embed_type='text_time', no class, time-cond or encoder-hidden projections"


@dataclass(frozen=True)
class SDXLCondition(BatchedCondition):
    """SDXL's conditioning of a batch: what the pipeline hands its UNet besides the latents and the timestep.

    Attributes:
        prompt_embeds: ``(B, L, D1 + D2)``, the penultimate hidden states of both text encoders, concatenated
            (``encoder_hidden_states``).
        pooled_embeds: ``(B, P)``, the second encoder's projected pooled output (``added_cond_kwargs["text_embeds"]``).
        time_ids: ``(B, 6)``, original size, crop top-left and target size (``added_cond_kwargs["time_ids"]``).

    It indexes and expands along the batch like a tensor (``models/conditions.py``), so code that slices a batch
    of conditions (``cond[:n]``) or broadcasts one condition to all samples works on it unchanged.

    Example:
        >>> c = SDXLCondition(torch.zeros(1, 4, 8), torch.zeros(1, 3), torch.ones(1, 6))
        >>> len(c.expand(5)), c.expand(5)[1:3].time_ids.shape
        (5, torch.Size([2, 6]))
    """

    DIMS: ClassVar[dict[str, int]] = {"prompt_embeds": 3, "pooled_embeds": 2, "time_ids": 2}
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    time_ids: torch.Tensor

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.time_ids.shape[1] != TIME_IDS:
            raise ModelError(f"SDXLCondition.time_ids: expected {TIME_IDS} per sample (original size, crop "
                             f"top-left, target size), got {self.time_ids.shape[1]}")

    def with_null(self, null: "SDXLCondition") -> "SDXLCondition":
        """This batch followed by the null condition for each sample, for one guided forward. The null half
        keeps this batch's time ids: the pipeline's negative sizes default to the positive ones."""
        null = null.expand(self.batch).to(self.prompt_embeds.device)
        return self.cat(SDXLCondition(null.prompt_embeds, null.pooled_embeds, self.time_ids))


class SDXLDenoiser(LatentPipelineDenoiser):
    """An SDXL model: UNet2DConditionModel (text_time) + two CLIP text encoders + VAE + scheduler config.

    ``cond`` is an :class:`SDXLCondition` from :meth:`encode_prompts` (one condition is broadcast over the
    batch), or a list of B prompt strings, encoded once (the last list is memoised). ``cond=None`` samples
    unconditionally (the null condition, with the default time ids). With a ``guidance`` scale, the
    conditional and unconditional halves run in ONE batched UNet forward.

    Args:
        unet: a diffusers UNet2DConditionModel with ``addition_embed_type="text_time"``.
        text_encoders: the CLIPTextModel and the CLIPTextModelWithProjection.
        tokenizers: their CLIPTokenizers.
        scheduler_config: the pipeline's scheduler config (betas, training steps, prediction type).
        vae, vae_loader, vae_config: the AutoencoderKL, or a function loading it on the first :meth:`decode`
            and its config meanwhile.
        force_zeros_for_empty_prompt: the pipeline config's flag: the null condition is zeros (True) or the
            encoding of ``""``.
        source: where the model came from (for messages).
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoders: tuple[nn.Module, nn.Module],
        tokenizers: tuple[Any, Any],
        scheduler_config: dict[str, Any],
        vae: nn.Module | None = None,
        *,
        vae_loader: Callable[[], nn.Module] | None = None,
        vae_config: dict[str, Any] | None = None,
        force_zeros_for_empty_prompt: bool = True,
        source: str = "",
    ) -> None:
        check_sdxl_unet(unet.config, source or "unet")
        self.text_encoders = tuple(text_encoders)
        self.tokenizers = tuple(tokenizers)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        lengths = [tokenizer_max_length(tok, enc, source) for tok, enc in zip(self.tokenizers, self.text_encoders)]
        if lengths[0] != lengths[1]:  # the pipeline concatenates both encodings token by token
            raise ModelError(f"{source or 'sdxl'}: the tokenizers pad to different lengths ({lengths[0]} and "
                             f"{lengths[1]}); both encodings must have one token count")
        self.max_length = lengths[0]
        self.pooled_dim = int(self.text_encoders[1].config.projection_dim)
        vae_factor = 2 ** (len((vae.config if vae is not None else vae_config or {}).get(
            "block_out_channels", (0,) * 4)) - 1)
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.default_size = (int(h) * vae_factor, int(w) * vae_factor)  # the pipeline's default height, width
        super().__init__(unet, scheduler_config, "sdxl", vae, vae_loader=vae_loader, vae_config=vae_config,
                         source=source, extra_config={"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                                                      "default_size": list(self.default_size)})
        widths = [int(enc.config.hidden_size) for enc in self.text_encoders]
        if sum(widths) != self.embedding_dim:
            raise ModelError(f"{source or 'sdxl'}: the text encoders' widths {widths[0]} + {widths[1]} do not add "
                             f"up to the UNet's cross_attention_dim {self.embedding_dim}")
        added = getattr(getattr(unet, "add_embedding", None), "linear_1", None)
        wanted = int(unet.config.addition_time_embed_dim) * TIME_IDS + self.pooled_dim
        if added is None or added.in_features != wanted:
            got = "no add_embedding" if added is None else f"an add_embedding of {added.in_features} inputs"
            raise ModelError(f"{source or 'sdxl'}: the UNet has {got}, but {TIME_IDS} time ids x "
                             f"addition_time_embed_dim {unet.config.addition_time_embed_dim} + the pooled width "
                             f"{self.pooled_dim} is {wanted} (an SDXL refiner or img2img UNet is not supported)")
        self.null_condition = self._null_condition()
        self.cfg = ClassifierFreeGuidance(self._unet_forward, self.null_condition)
        self.units = with_guidance_unit(self.units)  # the guidance direction is a reusable unit
        self._text_fingerprint: str | None = None

    # -- text -------------------------------------------------------------------------------------

    def time_ids(self, original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``(1, 6)`` micro-conditioning as the pipeline builds it; sizes default to the default resolution."""
        values = [*(original_size or self.default_size), *crops_coords_top_left, *(target_size or self.default_size)]
        if len(values) != TIME_IDS:
            raise ModelError(f"time ids: expected (height, width) sizes and a (top, left) crop, got {values}")
        return torch.tensor([values], dtype=self.text_encoders[1].dtype)

    def encode_prompts(self, prompts: Sequence[str] | str, *, original_size: tuple[int, int] | None = None,
                       crops_coords_top_left: tuple[int, int] = (0, 0),
                       target_size: tuple[int, int] | None = None) -> SDXLCondition:
        """The condition of B prompts as StableDiffusionXLPipeline computes it (no grad)."""
        prompts = self._check_prompts(prompts)
        embeds, pooled = [], []
        with torch.no_grad():
            for i in range(0, len(prompts), ENCODE_CHUNK):
                chunk = prompts[i:i + ENCODE_CHUNK]
                outputs = []
                for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
                    ids = tokenizer(chunk, padding="max_length", max_length=self.max_length, truncation=True,
                                    return_tensors="pt").input_ids
                    outputs.append(encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True))
                # SDXL conditions on the penultimate layer of both encoders, in the second encoder's dtype
                hidden = [out.hidden_states[-2] for out in outputs]
                embeds.append(torch.cat(hidden, dim=-1).to(self.text_encoders[1].dtype))
                pooled.append(outputs[1].text_embeds)  # the projected pooled output of the second encoder
        embeds_t, pooled_t = torch.cat(embeds), torch.cat(pooled)
        time_ids = self.time_ids(original_size, crops_coords_top_left, target_size).to(embeds_t.device)
        return SDXLCondition(embeds_t, pooled_t, time_ids.expand(len(prompts), -1))

    def _null_condition(self) -> SDXLCondition:
        """One sample's null condition (the pipeline's default negative), with the default time ids."""
        empty = self.encode_prompts([""])
        if not self.force_zeros_for_empty_prompt:
            return empty
        return SDXLCondition(torch.zeros_like(empty.prompt_embeds), torch.zeros_like(empty.pooled_embeds),
                             empty.time_ids)

    def condition(self, cond: Any, x: torch.Tensor) -> SDXLCondition:
        """Validate ``cond`` (an SDXLCondition or prompt strings) for the batch ``x``, expanded to it."""
        cond = self._encoded(cond)
        where = self.source or "sdxl"
        if not isinstance(cond, SDXLCondition):
            raise ModelError(f"{where}: cond must be an SDXLCondition from encode_prompts (prompt embeddings, pooled "
                             f"embeddings and time ids), or a list of prompts; got {type(cond).__name__}")
        if cond.prompt_embeds.shape[-1] != self.embedding_dim or cond.pooled_embeds.shape[-1] != self.pooled_dim:
            raise ModelError(f"{where}: prompt embeddings {tuple(cond.prompt_embeds.shape)} and pooled embeddings "
                             f"{tuple(cond.pooled_embeds.shape)}; expected (B, L, {self.embedding_dim}) and "
                             f"(B, {self.pooled_dim})")
        return cond.expand(x.shape[0]).to(x.device)

    # -- engines (compile/engine.py) ------------------------------------------------------------------

    def engine_condition_inputs(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """The float32 engine inputs the condition is fed through, each with its shape after the batch
        (named as the pipeline's ``__call__`` arguments and ``added_cond_kwargs`` are)."""
        return (("prompt_embeds", (self.max_length, self.embedding_dim)), ("pooled_prompt_embeds", (self.pooled_dim,)),
                ("add_time_ids", (TIME_IDS,)))

    def engine_condition(self, inputs: Mapping[str, torch.Tensor]) -> SDXLCondition:
        """The condition of an engine input dict (traceable: no value is read)."""
        return SDXLCondition(inputs["prompt_embeds"], inputs["pooled_prompt_embeds"], inputs["add_time_ids"])

    def engine_null_inputs(self, batch: int) -> dict[str, torch.Tensor]:
        """The null condition (with the default time ids) for ``batch`` samples, as float32 engine inputs."""
        null = self.null_condition.expand(batch).to(torch.float32)
        return {"prompt_embeds": null.prompt_embeds.contiguous(), "pooled_prompt_embeds": null.pooled_embeds.contiguous(),
                "add_time_ids": null.time_ids.contiguous()}

    # -- the network ------------------------------------------------------------------------------

    def _unet_forward(self, x: torch.Tensor, tm: torch.Tensor, cond: SDXLCondition) -> torch.Tensor:
        dtype = self.unet.dtype
        cond = cond.to(device=x.device, dtype=dtype)
        added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids}
        return self.unet(x.to(dtype), tm, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample

    # -- identity ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """UNet weights + configs (the null-condition flag, the default size) + both text encoders' weights and
        both tokenizers' vocab, merges, special tokens and length."""
        if self._text_fingerprint is None:
            self._text_fingerprint = ",".join(fingerprint_module(enc, tokenizer_identity(tok, self.max_length))
                                              for enc, tok in zip(self.text_encoders, self.tokenizers))
        return fingerprint_module(self.unet, {**self.config, "text": self._text_fingerprint})


def check_sdxl_unet(unet_config: Any, source: str) -> None:
    """The UNet config is SDXL's: a UNet2DConditionModel with the text_time added embedding and nothing else extra."""
    cls = unet_config.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise ModelError(f"{source}: {cls} is not a UNet2DConditionModel")
    kind = unet_config.get("addition_embed_type")
    if kind != "text_time":
        raise ModelError(f"{source}: UNet2DConditionModel with addition_embed_type={kind!r} is not supported "
                         f"({FAMILY})")
    check_unet_extras(unet_config, source, {"addition_embed_type": "text_time"}, FAMILY)
    if not isinstance(unet_config.get("addition_time_embed_dim"), int):
        raise ModelError(f"{source}: addition_time_embed_dim must be an integer, got "
                         f"{unet_config.get('addition_time_embed_dim')!r}")


def load_sdxl_pipeline_dir(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> SDXLDenoiser:
    """Load an SDXL pipeline directory; the VAE is loaded on the first ``decode``.

    Raises:
        ModelError: ONE line: a part is missing or of an unsupported class, or the parts do not fit together.
    """
    path = Path(path)
    index = read_json(path / "model_index.json")
    check_parts(path, index, PARTS, "an SDXL text-to-image pipeline")
    check_sdxl_unet(read_json(path / "unet" / "config.json"), f"{path}/unet")  # before any weights load
    check_parts(path, index, classes=CLASSES)
    force_zeros = index.get("force_zeros_for_empty_prompt", True)  # the pipeline's default when unsaved
    if not isinstance(force_zeros, bool):
        raise ModelError(f"{path}/model_index.json: force_zeros_for_empty_prompt must be true or false, got "
                         f"{force_zeros!r}")
    sched_config = read_scheduler_file(path / "scheduler" / "scheduler_config.json")
    vae_config = read_json(path / "vae" / "config.json")
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelError("loading an SDXL pipeline directory needs `pip install autotune-diffusion[diffusers]` "
                         "(diffusers and transformers)") from e

    unet = frozen(from_pretrained(UNet2DConditionModel, path / "unet", dtype=dtype), device)
    encoders = (frozen(from_pretrained(CLIPTextModel, path / "text_encoder", dtype=dtype), device),
                frozen(from_pretrained(CLIPTextModelWithProjection, path / "text_encoder_2", dtype=dtype), device))
    tokenizers = (load_clip_tokenizer(path / "tokenizer"), load_clip_tokenizer(path / "tokenizer_2"))
    # the pipeline decodes a float16 VAE that asks for force_upcast in float32 (it overflows in float16)
    vae_dtype = torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype

    def load_vae() -> nn.Module:
        return frozen(from_pretrained(AutoencoderKL, path / "vae", dtype=vae_dtype), device)

    return SDXLDenoiser(unet, encoders, tokenizers, sched_config, vae_loader=load_vae, vae_config=vae_config,
                        force_zeros_for_empty_prompt=force_zeros, source=str(path))
