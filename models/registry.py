"""Where a MODEL argument is resolved: a diffusers pipeline directory on disk, or a built-in model name.

A built-in model is registered with one line: ``register(BuiltinModel(name, factory, description))``;
the factory returns a Denoiser that also has ``sample_shape`` (the shape of one sample) and, for
class-conditional models, ``num_classes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from autotune.errors import ModelError
from autotune.sampling.denoiser import Denoiser


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    factory: Callable[[torch.dtype], Denoiser]
    description: str


BUILTIN: dict[str, BuiltinModel] = {}


def register(model: BuiltinModel) -> BuiltinModel:
    if model.name in BUILTIN:
        raise ModelError(f"built-in model {model.name!r} registered twice")
    BUILTIN[model.name] = model
    return model


def _load_builtins() -> None:
    # importing the zoo registers its models; it is optional until the built-in models land
    try:
        import autotune.models.zoo  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "autotune.models.zoo":
            raise


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> Denoiser:
    """A Denoiser from a MODEL argument: a diffusers pipeline directory, or a built-in name.

    Raises:
        ModelError: neither a pipeline directory nor a known built-in model.
    """
    from autotune.models.diffusers_dir import is_pipeline_dir, load_pipeline_dir

    if not spec.strip():  # Path("") is the current directory: an empty name must not mean "here"
        raise ModelError("model: empty name (give a built-in model name or a pipeline directory)")
    if Path(spec).is_dir():
        if not is_pipeline_dir(spec):
            raise ModelError(f"{spec}: a directory without model_index.json (not a diffusers pipeline directory)")
        return load_pipeline_dir(spec, dtype=dtype)
    _load_builtins()
    if spec in BUILTIN:
        return BUILTIN[spec].factory(dtype)
    known = ", ".join(sorted(BUILTIN)) or "none yet"
    raise ModelError(f"model {spec!r}: no such directory and no such built-in model (built-in: {known})")


def describe(model: Denoiser) -> dict[str, object]:
    """Parameterisation, noise schedule, size and units of a loaded model, for `autotune models`."""
    module = getattr(model, "module", None)
    params = sum(p.numel() for p in module.parameters()) if module is not None else 0
    return {
        "parameterization": model.parameterization,
        "noise": model.noise.kind,
        "parameters": params,
        "sample_shape": list(getattr(model, "sample_shape", ())),
        "units": len(model.units),
        "classes": getattr(model, "num_classes", None),
    }


def builtin_names() -> list[str]:
    _load_builtins()
    return sorted(BUILTIN)
