"""Adapter for a diffusers pipeline directory on disk (``model_index.json`` + ``unet/`` + ``scheduler/``).

The UNet is loaded with diffusers' own ``from_pretrained`` (safetensors, or ``.bin`` through
``torch.load(weights_only=True)``); the noise schedule (betas, number of training steps) and the
prediction type come from the scheduler config. Only the UNet2DModel (unconditional pixel models) is
handled here; conditional and latent pipelines come with the built-in models issue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from autotune.errors import ModelError
from autotune.models.unet_branches import attach_branches, branched_forward
from autotune.sampling.denoiser import TorchDenoiser, fingerprint_module
from autotune.sampling.noise import FlowMatching, VPDiscrete

PREDICTION_TYPES = {"epsilon": "epsilon", "sample": "sample", "v_prediction": "v_prediction",
                    "flow_prediction": "flow"}
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
FLOW_KEYS = ("_class_name", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
             "max_image_seq_len", "time_shift_type", "shift_terminal", "use_flow_sigmas", "flow_shift")
# sigma conversions the flow peers do not reproduce: refused at load rather than replayed wrongly
FLOW_UNSUPPORTED = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "stochastic_sampling")


def read_json(path: Path) -> dict[str, Any]:
    """A config file of a pipeline directory: a JSON object, or ONE ModelError naming the file."""
    from autotune.space.fileformat import read_json_file

    if not path.exists():
        raise ModelError(f"{path}: missing (not a diffusers pipeline directory?)")
    doc = read_json_file(path, ModelError, "config file")
    if not isinstance(doc, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def from_pretrained(cls: Any, folder: Path, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)`` with every failure of the user's files (missing, truncated or garbage
    weights, a pickle ``.bin`` the weights-only loader refuses, config values the class rejects) as ONE
    ModelError naming the folder. ``low_cpu_mem_usage=False``: the other path only asks for `accelerate`."""
    try:
        return cls.from_pretrained(str(folder), low_cpu_mem_usage=False, **kwargs)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers raises OSError, ValueError, RuntimeError, safetensors' own
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelError(f"{folder}: cannot load {cls.__name__} ({type(e).__name__}: {first})") from None


def _positive_int(config: dict[str, Any], key: str, where: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


SCHEDULER_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                  "prediction_type")


MAX_TRAIN_STEPS = 100_000  # diffusers models train on 1000 steps; beyond this a config is a mistake, not a model


def _check_scheduler_values(config: dict[str, Any]) -> None:
    """Types and sizes of the keys the noise schedule is built from, checked before any array is made."""
    def bad(key: str, why: str) -> ModelError:
        return ModelError(f"scheduler config: {key} {config.get(key)!r}: {why}")

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    steps = config.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 2 <= steps <= MAX_TRAIN_STEPS:
        raise bad("num_train_timesteps", f"must be an integer in 2..{MAX_TRAIN_STEPS}")
    for key in ("beta_start", "beta_end"):
        if key in config and not number(config[key]):
            raise bad(key, "must be a number")
    betas = config.get("trained_betas")
    if betas is not None and not (isinstance(betas, list) and 2 <= len(betas) <= MAX_TRAIN_STEPS
                                  and all(number(b) for b in betas)):
        raise ModelError(f"scheduler config: trained_betas must be a list of 2..{MAX_TRAIN_STEPS} numbers")
    if not isinstance(config.get("beta_schedule", "linear"), str):
        raise bad("beta_schedule", "must be a name")
    prediction = config.get("prediction_type", "epsilon")
    if not isinstance(prediction, str) or prediction not in PREDICTION_TYPES:
        raise bad("prediction_type", f"is not supported ({', '.join(PREDICTION_TYPES)})")


def read_scheduler_file(path: Path) -> dict[str, Any]:
    """A pipeline's ``scheduler/scheduler_config.json``, its noise-schedule values checked (errors name the file)."""
    config = read_json(path)
    try:
        _check_scheduler_values(config)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    return config


def is_flow_config(config: dict[str, Any]) -> bool:
    """A flow-matching scheduler config: FlowMatchEuler, or a multistep scheduler with ``use_flow_sigmas``.

    The config of a scheduler built in Python (``pipe.scheduler.config``) has no ``_class_name``: there a
    FlowMatch scheduler is told by its ``shift`` with no betas (every DDPM-family scheduler has betas)."""
    flow_match_keys = "shift" in config and "beta_schedule" not in config and "trained_betas" not in config
    return (config.get("_class_name") in FLOW_SCHEDULERS or flow_match_keys or bool(config.get("use_flow_sigmas"))
            or config.get("prediction_type") == "flow_prediction")


def dynamic_shift_mu(config: dict[str, Any], image_seq_len: int) -> float:
    """mu of resolution-dependent shifting: linear in the image's token count, as the SD3 / Flux pipelines set it."""
    base_len = float(config.get("base_image_seq_len", 256))
    max_len = float(config.get("max_image_seq_len", 4096))
    base_shift = float(config.get("base_shift", 0.5))
    max_shift = float(config.get("max_shift", 1.15))
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def _check_flow_values(config: dict[str, Any]) -> None:
    def number(key: str, low: float = 0.0) -> None:
        value = config.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > low):
            raise ModelError(f"scheduler config: {key} {value!r}: must be a number above {low:g}")

    for key in ("shift", "flow_shift", "base_image_seq_len", "max_image_seq_len"):
        number(key)
    for key in ("base_shift", "max_shift"):
        number(key, low=-1e9)
    if config.get("base_image_seq_len", 256) == config.get("max_image_seq_len", 4096):
        raise ModelError("scheduler config: base_image_seq_len equals max_image_seq_len (mu is undefined)")
    for key in FLOW_UNSUPPORTED:
        if config.get(key):
            raise ModelError(f"scheduler config: {key}=true is not supported for flow-matching models")
    if config.get("use_flow_sigmas") and config.get("prediction_type") != "flow_prediction":
        raise ModelError(f"scheduler config: prediction_type {config.get('prediction_type')!r} with use_flow_sigmas "
                         "is not supported (flow_prediction)")


def read_flow_scheduler_config(config: dict[str, Any], image_seq_len: int | None = None) -> FlowMatching:
    """The FlowMatching schedule of a flow scheduler config, with the shift its pipeline applies.

    ``image_seq_len`` (the number of image tokens the transformer sees) fixes mu when the config asks for
    ``use_dynamic_shifting``; a model without a fixed resolution cannot give one and is refused.
    """
    _check_flow_values(config)
    steps = int(config.get("num_train_timesteps", 1000))
    mu = None
    if config.get("use_dynamic_shifting"):
        if image_seq_len is None:
            raise ModelError("scheduler config: use_dynamic_shifting=true needs the image sequence length, which "
                             "only transformer pipelines (SD3, Flux) give")
        mu = dynamic_shift_mu(config, image_seq_len)
    shift = config.get("flow_shift") if config.get("use_flow_sigmas") else config.get("shift", 1.0)
    terminal = config.get("shift_terminal")
    return FlowMatching(t_min=1.0 / steps, time_scale=float(steps), shift=float(shift or 1.0), mu=mu,
                        time_shift_type=str(config.get("time_shift_type", "exponential")),
                        shift_terminal=float(terminal) if terminal else None)


def read_scheduler_config(config: dict[str, Any], image_seq_len: int | None = None
                          ) -> tuple[VPDiscrete | FlowMatching, str, dict[str, Any]]:
    """(noise schedule, parameterisation, the keys that define them) of a diffusers scheduler config.

    A flow-matching config (FlowMatchEulerDiscreteScheduler, or ``use_flow_sigmas``) gives a FlowMatching
    schedule and the velocity ("flow") parameterisation; anything else a discrete VP (DDPM) schedule.
    """
    _check_scheduler_values(config)
    if is_flow_config(config):
        noise = read_flow_scheduler_config(config, image_seq_len)
        keys = {k: config.get(k) for k in ("num_train_timesteps", *FLOW_KEYS) if k in config}
        return noise, "flow", keys
    prediction = config.get("prediction_type", "epsilon")
    return VPDiscrete.from_diffusers_config(config), PREDICTION_TYPES[prediction], {k: config.get(k) for k in
                                                                                   SCHEDULER_KEYS}


class DiffusersUNetDenoiser(TorchDenoiser):
    """A diffusers UNet2DModel with the noise schedule of its pipeline's scheduler config."""

    def __init__(self, unet: torch.nn.Module, scheduler_config: dict[str, Any], source: str = "") -> None:
        noise, parameterization, scheduler_keys = read_scheduler_config(scheduler_config)
        config = {
            # private keys (_name_or_path, _diffusers_version) say where it was loaded from, not what it computes
            "unet": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
            "scheduler": scheduler_keys,
        }

        # DeepCache's deep branches as reusable units where the layout allows (models/unet_branches.py); the
        # branched forward is diffusers' own, computed in the same order
        branched = bool(attach_branches(unet))

        def forward(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            try:
                return branched_forward(unet, x, timestep) if branched else unet(x, timestep).sample
            except (RuntimeError, ValueError, TypeError, ZeroDivisionError, IndexError) as e:
                # a network whose config loads but whose forward fails (e.g. 0 attention heads): the user's
                # directory, not a bug of ours, so one line naming it
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise ModelError(f"{source or 'unet'}: the UNet fails on a batch of shape {tuple(x.shape)} "
                                 f"({type(e).__name__}: {first})") from None

        # a discrete DDPM model is fed integer steps; a flow model sigma x N as a float, as its scheduler does
        super().__init__(forward, noise, parameterization, module=unet, round_time=noise.kind != "flow", config=config)
        self.unet = unet
        self.scheduler_config = scheduler_config
        self.source = source
        self.sample_shape = (int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size))

    def fingerprint(self) -> str:
        return fingerprint_module(self.unet, self.config)


def load_pipeline_dir(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> TorchDenoiser:
    """The Denoiser of a diffusers pipeline directory, by the loader of its family (``models/families.py``).

    Raises:
        ModelError: ONE line: the directory lacks a part, or its family is not supported (naming those that are).
    """
    from autotune.models.families import family_of

    return family_of(path).load(Path(path), dtype=dtype, device=device)


def load_unet_pipeline_dir(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> TorchDenoiser:
    """Load the UNet2DModel and scheduler config of a DDPM-layout pipeline directory (pixel space, unconditional).

    Raises:
        ModelError: the directory lacks a part, or its UNet is not a UNet2DModel.
    """
    path = Path(path)
    index = read_json(path / "model_index.json")
    for part in ("unet", "scheduler"):
        if part not in index:
            raise ModelError(f"{path}/model_index.json: no '{part}' entry (not a UNet diffusion pipeline)")
    unet_config = read_json(path / "unet" / "config.json")
    sched_dir = path / "scheduler"
    sched_config = read_scheduler_file(sched_dir / "scheduler_config.json")
    cls = unet_config.get("_class_name")
    if cls != "UNet2DModel":
        raise ModelError(f"{path}/unet: {cls} is not a UNet2DModel")
    for key in ("in_channels", "sample_size"):  # the sample shape is read from these
        _positive_int(unet_config, key, path / "unet" / "config.json")
    try:
        from diffusers import UNet2DModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModelError("loading a diffusers directory needs `pip install autotune-diffusion[diffusers]`") from e
    unet = from_pretrained(UNet2DModel, path / "unet", torch_dtype=dtype).to(device).eval()
    return DiffusersUNetDenoiser(unet, sched_config, source=str(path))
