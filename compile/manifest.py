"""The engine directory's ``manifest.json``: what an engine takes, returns, was built from, and how well it matched.

An engine directory holds the backend's artifact (``model.onnx``, ``model.plan``; torch: the schedule), the
schedule file and this manifest. Loading reads the manifest strictly and checks the directory against it
(schedule hash, artifact checksum, and, when a model is given, its fingerprint); a runner checks every
call's inputs against the manifest's names, dtypes and shapes. Every mismatch is one BackendError line.

A manifest is data from whoever made the directory (its checksums catch corruption, not tampering), so every
file it names must stay inside the directory once ``..`` and symlinks are resolved (``inside``): loading an
engine never reads, hashes or hands to a runtime a file elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from autotune.errors import AutotuneError, BackendError

if TYPE_CHECKING:
    from autotune.space.schedule import Schedule

MANIFEST = "manifest.json"
SCHEDULE_FILE = "schedule.json"
FORMAT = "autotune-engine"
VERSION = 1
BATCH = "batch"  # the name of the dynamic batch dimension in shapes


@dataclass(frozen=True)
class TensorSpec:
    """A named engine input or output; ``shape`` holds ints and the string ``"batch"`` (dynamic)."""

    name: str
    dtype: str  # numpy dtype name: float32, int64
    shape: tuple[int | str, ...]

    def check(self, value: np.ndarray, where: str) -> None:
        """Raise BackendError naming the input when ``value`` does not fit this spec."""
        if value.dtype != np.dtype(self.dtype):
            raise BackendError(f"{where}: input {self.name!r} has dtype {value.dtype}, the engine takes {self.dtype}")
        fits = value.ndim == len(self.shape) and all(d == BATCH or d == n for d, n in zip(self.shape, value.shape))
        if not fits:
            want = "(" + ", ".join(str(d) for d in self.shape) + ")"
            raise BackendError(f"{where}: input {self.name!r} has shape {tuple(value.shape)}, the engine takes {want}")


@dataclass(frozen=True)
class Manifest:
    """Everything ``manifest.json`` records; see the module docstring."""

    backend: str
    precision: str
    artifact: str
    artifact_sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model: dict[str, Any]  # spec, fingerprint, parameterization, sample_shape
    schedule: dict[str, Any]  # file, hash, nfe, guidance (baked in as a constant)
    parity: dict[str, Any]  # max abs vs the executor, measured at build time
    build: dict[str, Any] = field(default_factory=dict)  # opset, exporter, versions, seconds, backend details

    def to_json(self) -> str:
        doc = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps(doc, indent=2, sort_keys=False, allow_nan=False)

    def check_inputs(self, inputs: Mapping[str, np.ndarray], where: str) -> int:
        """Check names, dtypes and shapes of one call's inputs; returns the batch size."""
        want = [s.name for s in self.inputs]
        if sorted(inputs) != sorted(want):
            raise BackendError(f"{where}: inputs {sorted(inputs)} given, the engine takes {want}")
        batches = set()
        for spec in self.inputs:
            value = inputs[spec.name]
            spec.check(value, where)
            batches.update(n for d, n in zip(spec.shape, value.shape) if d == BATCH)
        if len(batches) > 1:
            raise BackendError(f"{where}: the inputs disagree on the batch size ({sorted(batches)})")
        return batches.pop() if batches else 1


def _spec(doc: Any, where: str) -> TensorSpec:
    try:
        shape = tuple(d if d == BATCH else int(d) for d in doc["shape"])
        return TensorSpec(str(doc["name"]), str(np.dtype(doc["dtype"])), shape)
    except (KeyError, TypeError, ValueError) as e:
        raise BackendError(f"{where}: not a tensor spec ({e})") from None


def inside(engine_dir: str | Path, name: str, what: str, base: Path | None = None) -> Path:
    """``base / name`` (``base`` defaults to ``engine_dir``), refused unless it resolves inside ``engine_dir``.

    ``..``, absolute names and symlinks pointing elsewhere all resolve outside and raise one BackendError
    line; a symlink to another file inside the directory is fine. Returns the path as joined (not resolved),
    so messages keep the user's spelling.
    """
    engine_dir = Path(engine_dir)
    root = engine_dir.resolve()
    path = (base if base is not None else engine_dir) / name
    if not path.resolve().is_relative_to(root):
        raise BackendError(f"{engine_dir}: {what} {name!r} is outside the engine directory "
                           "(an engine may only name files inside its own directory)")
    return path


def read_manifest(engine_dir: str | Path) -> Manifest:
    """The manifest of an engine directory, read strictly (one BackendError line naming what is wrong)."""
    path = inside(engine_dir, MANIFEST, "the manifest")
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackendError(f"{path}: missing (not an engine directory; build one with `autotune compile`)") from None
    except json.JSONDecodeError as e:
        raise BackendError(f"{path}: not valid JSON ({e})") from None
    except (UnicodeDecodeError, RecursionError, IsADirectoryError) as e:  # not UTF-8, nested too deeply
        raise BackendError(f"{path}: not a readable manifest ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BackendError(f"{path}: not an autotune engine manifest (format must be {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise BackendError(f"{path}: manifest version {doc.get('version')!r}, this autotune reads version {VERSION}")
    try:
        return Manifest(
            backend=str(doc["backend"]),
            precision=str(doc["precision"]),
            artifact=str(doc["artifact"]),
            artifact_sha256=str(doc["artifact_sha256"]),
            inputs=tuple(_spec(d, f"{path}: inputs[{i}]") for i, d in enumerate(doc["inputs"])),
            outputs=tuple(_spec(d, f"{path}: outputs[{i}]") for i, d in enumerate(doc["outputs"])),
            model=dict(doc["model"]),
            schedule=dict(doc["schedule"]),
            parity=dict(doc["parity"]),
            build=dict(doc.get("build", {})),
        )
    except KeyError as e:
        raise BackendError(f"{path}: missing field {e}") from None


def write_manifest(engine_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(engine_dir) / MANIFEST
    path.write_text(manifest.to_json() + "\n")
    return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_directory(engine_dir: str | Path, manifest: Manifest, model_fingerprint: str | None = None) -> Schedule:
    """The directory matches its manifest: schedule hash, artifact checksum, and the model's fingerprint.

    Returns the engine's schedule (read and hash-checked here, so no one reads it twice)."""
    from autotune.space.fileformat import load

    engine_dir = Path(engine_dir)
    sched_path = inside(engine_dir, str(manifest.schedule.get("file", SCHEDULE_FILE)), "the schedule file")
    try:
        schedule = load(sched_path)
    except AutotuneError as e:
        raise BackendError(f"{engine_dir}: schedule file unusable ({e})") from None
    if schedule.hash() != manifest.schedule.get("hash"):
        raise BackendError(f"{sched_path}: schedule hash {schedule.hash()} does not match the manifest's "
                           f"{manifest.schedule.get('hash')} (the engine was built from another schedule)")
    artifact = inside(engine_dir, manifest.artifact, "the artifact")
    if not artifact.is_file():
        raise BackendError(f"{artifact}: missing (the manifest names it as the {manifest.backend} artifact)")
    digest = file_sha256(artifact)
    if digest != manifest.artifact_sha256:
        raise BackendError(f"{artifact}: checksum {digest[:16]} does not match the manifest's "
                           f"{manifest.artifact_sha256[:16]} (replaced or corrupted after the build)")
    if model_fingerprint is not None and model_fingerprint != manifest.model.get("fingerprint"):
        raise BackendError(f"{engine_dir}: built for model fingerprint {manifest.model.get('fingerprint')}, "
                           f"the given model is {model_fingerprint}")
    return schedule
