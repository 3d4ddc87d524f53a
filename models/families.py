"""Which family a diffusers pipeline directory belongs to, and the loader of each supported family.

A family is one entry in ``FAMILIES``: a name users know, a test on ``model_index.json`` and the main
network's config, and the dotted path of its loader (imported only when a directory of that family is
loaded, so that `autotune models` does not import every family's code). Adding a family is one module with a
``load_*`` function and one line here; a directory no family claims is refused with ONE line naming what it
is and what is supported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from autotune.errors import ModelError


def _class_of(index: dict[str, Any], part: str) -> str | None:
    """The class name model_index.json gives for ``part`` (``["diffusers", "UNet2DModel"]`` -> ``UNet2DModel``)."""
    entry = index.get(part)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


@dataclass(frozen=True)
class Layout:
    """What a family test sees: model_index.json and the config of the main network (``unet`` or ``transformer``)."""

    path: Path
    index: dict[str, Any]
    network: str  # "unet" or "transformer" ("" when the directory has neither)
    network_config: dict[str, Any]

    @property
    def network_class(self) -> str | None:
        return self.network_config.get("_class_name") or _class_of(self.index, self.network)

    def has(self, part: str) -> bool:
        return _class_of(self.index, part) is not None


@dataclass(frozen=True)
class Family:
    name: str  # as users call it: "SDXL", "Flux"
    accepts: Callable[[Layout], bool]
    loader: str  # "module:function", the function taking (path, dtype=, device=)

    def load(self, path: Path, **kwargs: Any) -> Any:
        module, function = self.loader.split(":")
        return getattr(importlib.import_module(module), function)(path, **kwargs)


def _unet_class(layout: Layout) -> str | None:
    return layout.network_class if layout.network == "unet" else None


def _is_sdxl(layout: Layout) -> bool:
    return _unet_class(layout) == "UNet2DConditionModel" and layout.network_config.get("addition_embed_type") == \
        "text_time"


FAMILIES: tuple[Family, ...] = (
    Family("DDPM UNet (UNet2DModel)", lambda lay: _unet_class(lay) == "UNet2DModel",
           "autotune.models.diffusers_dir:load_unet_pipeline_dir"),
    Family("SDXL", _is_sdxl, "autotune.models.sdxl:load_sdxl_pipeline_dir"),
    Family("SD 1.x/2.x latent text-to-image",
           lambda lay: _unet_class(lay) == "UNet2DConditionModel" and not _is_sdxl(lay),
           "autotune.models.latent:load_latent_pipeline_dir"),
    Family("SD3", lambda lay: lay.network == "transformer" and lay.network_class == "SD3Transformer2DModel",
           "autotune.models.sd3:load_sd3_pipeline_dir"),
    Family("Flux", lambda lay: lay.network == "transformer" and lay.network_class == "FluxTransformer2DModel",
           "autotune.models.flux:load_flux_pipeline_dir"),
)


def supported() -> str:
    return ", ".join(f.name for f in FAMILIES)


def read_layout(path: Path) -> Layout:
    from autotune.models.diffusers_dir import read_json

    index = read_json(path / "model_index.json")
    for network in ("unet", "transformer"):
        if network in index:
            config_path = path / network / "config.json"
            return Layout(path, index, network, read_json(config_path) if config_path.exists() else {})
    return Layout(path, index, "", {})


def family_of(path: str | Path) -> Family:
    """The family that loads the pipeline directory ``path``.

    Raises:
        ModelError: ONE line naming the directory's pipeline and network classes and the supported families.
    """
    path = Path(path)
    layout = read_layout(path)
    for family in FAMILIES:
        if family.accepts(layout):
            return family
    pipeline = layout.index.get("_class_name") or "an unnamed pipeline"
    network = f" with {layout.network} {layout.network_class}" if layout.network else " without a unet or transformer"
    raise ModelError(f"{path}: {pipeline}{network} is not supported (supported: {supported()})")
