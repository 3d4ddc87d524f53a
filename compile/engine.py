"""Build an engine directory from a model and a schedule, and load one back as a checked callable.

``build_engine`` bakes the schedule (``bake.BakedSampler``), hands it to a backend, writes the schedule
file and ``manifest.json``, and measures parity at build time: the baked module and the loaded engine
against ``sampling.executor.sample`` from the same noises. An fp32 engine further than 1e-3 (or a baked
module further than 1e-5) from the executor is not written as good: the build fails with the figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autotune.compile.backends import BuildRequest, check_precision, get_backend
from autotune.compile.bake import BakedSampler
from autotune.compile.manifest import (BATCH, MANIFEST, SCHEDULE_FILE, Manifest, TensorSpec, check_directory,
                                       file_sha256, read_manifest, write_manifest)
from autotune.errors import BackendError
from autotune.sampling.capabilities import capabilities_of
from autotune.sampling.coefficients import make_plan
from autotune.sampling.denoiser import Denoiser
from autotune.sampling.executor import sample
from autotune.space.schedule import Schedule

BAKE_TOLERANCE = 1e-5  # baked eager module vs executor, float32
ENGINE_TOLERANCE = {"fp32": 1e-3}  # engine vs executor; fp16 is recorded, not enforced
PARITY_NOISES = 4
PARITY_SEED = 0
STEP_NOISE = "step_noise"  # the engine input holding a stochastic schedule's fresh draws


def engine_io(model: Denoiser, schedule: Schedule | None = None
              ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Engine inputs and output: ``noise`` (+ ``class_labels`` or ``prompt_embeds``) (+ ``step_noise``, the fresh
    draws of a stochastic ``schedule``, batch first) -> ``sample``."""
    has = capabilities_of(model)
    shape = has.sample_shape
    if not shape:
        raise BackendError(f"{type(model).__name__}: the model does not declare its sample shape")
    inputs = [TensorSpec("noise", "float32", (BATCH, *shape))]
    if has.num_classes:
        inputs.append(TensorSpec("class_labels", "int64", (BATCH,)))
    elif has.engine_conditions:  # a condition of several tensors (SDXL, SD3, Flux)
        inputs += [TensorSpec(name, "float32", (BATCH, *dims)) for name, dims in model.engine_condition_inputs()]
    elif has.prompts:
        emb = tuple(int(d) for d in model.null_embedding.shape[1:])
        inputs.append(TensorSpec("prompt_embeds", "float32", (BATCH, *emb)))
    draws = 0 if schedule is None else schedule_noise_draws(schedule, model)
    if draws:
        inputs.append(TensorSpec(STEP_NOISE, "float32", (BATCH, draws, *shape)))
    return tuple(inputs), (TensorSpec("sample", "float32", (BATCH, *shape)),)


def schedule_noise_draws(schedule: Schedule, model: Denoiser) -> int:
    """How many fresh standard normal draws one run of ``schedule`` makes (0 for an ODE schedule)."""
    return make_plan(schedule, model.noise).noise_draws if schedule.stochastic else 0


def example_inputs(model: Denoiser, inputs: tuple[TensorSpec, ...], batch: int,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs for ``batch`` samples: standard normal noise, labels 0, 1, 2, ..., the empty prompt."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    nulls = model.engine_null_inputs(batch) if hasattr(model, "engine_null_inputs") else {}
    for spec in inputs:
        dims = tuple(batch if d == BATCH else int(d) for d in spec.shape)
        if spec.name in ("noise", STEP_NOISE):
            out[spec.name] = torch.randn(dims, generator=g, dtype=torch.float32)
        elif spec.name == "class_labels":
            out[spec.name] = torch.arange(batch, dtype=torch.int64) % int(model.num_classes)
        elif spec.name in nulls:
            out[spec.name] = nulls[spec.name]
        else:
            out[spec.name] = model.null_embedding.to(torch.float32).expand(dims).contiguous()
    return out


def executor_sample(model: Denoiser, schedule: Schedule, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the executor gives for one engine input dict (the reference every engine is measured against)."""
    if hasattr(model, "engine_condition"):  # a condition of several named inputs (SDXL)
        cond = model.engine_condition(inputs)
    else:
        cond = next((v for k, v in inputs.items() if k not in ("noise", STEP_NOISE)), None)
    return sample(model, schedule, inputs["noise"], cond, step_noise=inputs.get(STEP_NOISE)).sample


@dataclass
class Engine:
    """A loaded engine: ``engine(noise=..., class_labels=...) -> sample`` (numpy), inputs checked first."""

    directory: Path
    manifest: Manifest
    runner: Any  # BackendRunner
    description: str

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        arrays = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        self.manifest.check_inputs(arrays, str(self.directory))
        labels, classes = arrays.get("class_labels"), self.manifest.model.get("num_classes")
        # the graph cannot check values (an out-of-range label would index past the embedding): check here
        if labels is not None and classes and labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise BackendError(f"{self.directory}: class_labels must be in 0..{classes - 1}")
        return self.runner.run(arrays)

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded standard-normal noise (and labels 0, 1, ...) fitting this engine, for smoke runs and benches."""
        rng = np.random.default_rng(seed)
        out = {}
        for spec in self.manifest.inputs:
            dims = tuple(batch if d == BATCH else int(d) for d in spec.shape)
            if spec.dtype == "int64":
                out[spec.name] = (np.arange(batch) % int(self.manifest.model.get("num_classes") or 1)).astype(np.int64)
            else:
                out[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        return out


def load_engine(engine_dir: str | Path, model: Denoiser | None = None, **options: Any) -> Engine:
    """Load an engine directory, checked against its manifest (and ``model``'s fingerprint when given).

    ``options`` go to the backend's loader: onnxruntime ``provider`` ("cpu", "cuda", "tensorrt") and
    ``threads``; torch ``device`` and ``compile`` ("auto", "on", "off").

    Loading never runs code from the directory: every file the manifest names stays inside it, ONNX external
    data too, and a torch engine is rebuilt from this package's code (``backends.TorchBackend``), so a torch
    engine of a model that is not built in needs ``model``.

    Example:
        >>> engine = load_engine("engines/digits-5")                          # doctest: +SKIP
        >>> engine(**engine.example_inputs(batch=2)).shape                     # doctest: +SKIP
        (2, 1, 16, 16)
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    schedule = check_directory(engine_dir, manifest, None if model is None else model.fingerprint())
    backend = get_backend(manifest.backend)
    runner = backend.load(engine_dir, manifest, model=model, schedule=schedule, **options)
    return Engine(engine_dir, manifest, runner, runner.description)


def _error_line(e: Exception) -> str:
    """The line of a runtime's error that says what failed: ONNX Runtime and most put it last; torch.compile
    puts it first, above "from user code:" and its hints (TORCHDYNAMO_VERBOSE, TORCH_LOGS)."""
    text = str(e).split("from user code:")[0]
    lines = [ln.strip() for ln in text.strip().splitlines()
             if ln.strip() and "TORCHDYNAMO_VERBOSE" not in ln and "TORCH_LOGS" not in ln]
    return (lines or [""])[-1][:300]


def _max_abs(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def build_engine(
    model: Denoiser,
    schedule: Schedule,
    out_dir: str | Path,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    *,
    model_spec: str = "",
    parity_noises: int = PARITY_NOISES,
    max_batch: int = 64,
    load_options: dict[str, Any] | None = None,
) -> Manifest:
    """Bake ``schedule`` on ``model``, build it with ``backend`` into ``out_dir`` and check parity.

    Args:
        model: a Denoiser with a torch network (``digits``, a diffusers pipeline directory, ...), float32.
        schedule: the schedule to bake; its guidance scale becomes a constant of the engine.
        out_dir: the engine directory (created; an existing manifest and artifact there are replaced).
        backend: ``onnxruntime``, ``tensorrt`` or ``torch``.
        precision: ``fp32`` or ``fp16`` (tensorrt, torch).
        model_spec: how the model was named (a built-in name or a directory), recorded in the manifest.
        parity_noises: how many seeded noises the build-time parity check samples.
        max_batch: the largest batch of TensorRT's optimisation profile.
        load_options: passed to the backend's loader for the parity run.

    Returns:
        The manifest written to ``out_dir/manifest.json``.

    Raises:
        BackendError: the backend is missing here, the export fails, or parity is out of tolerance.

    Example:
        >>> from autotune.models.registry import load_model                     # doctest: +SKIP
        >>> from autotune.sampling.named import build                           # doctest: +SKIP
        >>> m = load_model("digits")                                            # doctest: +SKIP
        >>> build_engine(m, build("dpmsolver++2m", m.noise, 6), "engines/d6").parity   # doctest: +SKIP
    """
    from autotune.space.fileformat import save

    be = get_backend(backend)
    check_precision(be, precision)
    schedule.check_units(model.units)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    has = capabilities_of(model)
    baked = BakedSampler(model, schedule, torch.float32).eval()
    inputs, outputs = engine_io(model, schedule)
    examples = example_inputs(model, inputs, batch=2, seed=PARITY_SEED + 1)
    built = be.build(BuildRequest(baked, examples, inputs, outputs, out_dir, precision, max_batch=max_batch,
                                  opt_batch=min(16, max_batch)))
    save(schedule, out_dir / SCHEDULE_FILE)
    build_s = time.perf_counter() - started

    check = example_inputs(model, inputs, batch=parity_noises, seed=PARITY_SEED)
    with torch.no_grad():
        reference = executor_sample(model, schedule, check)
        baked_out = baked(*[check[s.name] for s in inputs])
    manifest = Manifest(
        backend=backend,
        precision=precision,
        artifact=built.artifact,
        artifact_sha256=file_sha256(out_dir / built.artifact),
        inputs=inputs,
        outputs=outputs,
        model={
            "spec": model_spec,
            "fingerprint": model.fingerprint(),
            "parameterization": model.parameterization,
            "sample_shape": list(has.sample_shape or ()),
            "num_classes": has.num_classes,
        },
        schedule={"file": SCHEDULE_FILE, "hash": schedule.hash(), "name": schedule.name, "nfe": schedule.nfe,
                  "guidance": schedule.guidance, "guidance_baked": True},
        parity={},
        build={**built.details, "build_s": round(build_s, 2)},
    )
    write_manifest(out_dir, manifest)  # without parity first: the loader checks the directory against it
    engine = load_engine(out_dir, model, **(load_options or {}))
    try:
        engine_out = engine(**{k: v.numpy() for k, v in check.items()})
    except Exception as e:  # noqa: BLE001 - runtimes raise their own types; the user gets one line
        (out_dir / MANIFEST).unlink()
        first = _error_line(e)
        raise BackendError(f"{out_dir}: the {backend} engine fails on a batch of {parity_noises} (exported at batch "
                           f"{len(next(iter(examples.values())))}): {type(e).__name__}: {first}; the engine was not "
                           "written") from None
    parity = {
        "noises": parity_noises,
        "seed": PARITY_SEED,
        "baked_vs_executor_max_abs": _max_abs(baked_out, reference),
        "engine_vs_executor_max_abs": _max_abs(engine_out, reference),
        "engine_runtime": engine.description,
    }
    failure = None
    if parity["baked_vs_executor_max_abs"] > BAKE_TOLERANCE:
        failure = (f"the baked module is {parity['baked_vs_executor_max_abs']:.2e} from the executor "
                   f"(> {BAKE_TOLERANCE:g})")
    tol = ENGINE_TOLERANCE.get(precision)
    if tol is not None and parity["engine_vs_executor_max_abs"] > tol:
        failure = (f"the {backend} engine is {parity['engine_vs_executor_max_abs']:.2e} from the executor "
                   f"(> {tol:g} for {precision})")
    if failure is not None:
        (out_dir / MANIFEST).unlink()  # no manifest, no loadable engine
        raise BackendError(f"{out_dir}: {failure}; the engine was not written")
    manifest = Manifest(**{**manifest.__dict__, "parity": parity})
    write_manifest(out_dir, manifest)
    return manifest

