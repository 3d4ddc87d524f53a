"""Engine backends: a small Protocol and a registry (``onnxruntime``, ``tensorrt``, ``torch``).

A backend turns a baked sampler into an artifact in the engine directory (``build``) and an artifact
back into a callable (``load``). The heavy packages are imported only inside a backend's methods; a
backend whose package (or device) is missing says so in one line through ``missing()``, and building or
loading it raises that line as a BackendError.

- ``onnxruntime``: ``model.onnx`` (see ``onnx_export``), run by an InferenceSession; CPU execution provider
  by default, the CUDA / TensorRT execution providers on request when onnxruntime-gpu is installed. fp32.
- ``tensorrt``: ``model.onnx`` plus ``model.plan``, a serialized TensorRT engine built with the TensorRT
  Python API (FP32 or FP16, one optimisation profile over batch sizes), run on CUDA. Written against the
  documented TensorRT 10 API; not run here (its wheels cannot be installed on these machines).
- ``torch``: ``model.pt2``, the baked module as a ``torch.export`` program (weights once, dynamic batch),
  run under ``torch.compile`` with CUDA graphs (``mode="reduce-overhead"``) on a GPU; on a CPU it runs
  the exported graph eagerly unless compiling is asked for (Inductor took minutes per batch size on CPU
  for no gain on the digits UNet). FP16 is ``torch.autocast`` around the call: convolutions and matmuls
  in half precision, the solver's arithmetic and the state in float32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from autotune.compile.manifest import BATCH, Manifest, TensorSpec
from autotune.errors import BackendError

PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class BuildRequest:
    """What every backend's ``build`` receives."""

    baked: torch.nn.Module  # a BakedSampler (fp32)
    example_inputs: dict[str, torch.Tensor]  # in the order of ``inputs``
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    out_dir: Path
    precision: str
    max_batch: int = 64
    opt_batch: int = 16


@dataclass(frozen=True)
class BuiltArtifact:
    artifact: str  # file name inside the engine directory
    details: dict[str, Any]  # goes to the manifest's "build" section


@dataclass
class BackendRunner:
    """A loaded engine's raw run function (inputs already checked) and what it runs on, in words."""

    run: Callable[[dict[str, np.ndarray]], np.ndarray]
    description: str


class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]

    def missing(self) -> str | None:
        """None when usable here, else one line saying what is missing."""

    def build(self, request: BuildRequest) -> BuiltArtifact: ...

    def load(self, engine_dir: Path, manifest: Manifest, **options: Any) -> BackendRunner: ...


BACKENDS: dict[str, Backend] = {}


def register(cls: type) -> type:
    """Class decorator: one instance of the backend class joins the registry under its ``name``."""
    BACKENDS[cls.name] = cls()
    return cls


def get_backend(name: str) -> Backend:
    """The registered backend ``name``, usable here (else one BackendError line saying what is missing)."""
    if name not in BACKENDS:
        raise BackendError(f"backend {name!r}: unknown (one of {', '.join(BACKENDS)})")
    backend = BACKENDS[name]
    reason = backend.missing()
    if reason is not None:
        raise BackendError(f"backend {name!r}: {reason}")
    return backend


def check_precision(backend: Backend, precision: str) -> None:
    if precision not in PRECISIONS:
        raise BackendError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision not in backend.precisions:
        raise BackendError(f"backend {backend.name!r}: precision {precision} is not supported "
                           f"(supported: {', '.join(backend.precisions)})")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@register
class OnnxRuntimeBackend:
    """ONNX Runtime over ``model.onnx`` (CPU by default; ``provider="cuda"`` / ``"tensorrt"`` with onnxruntime-gpu)."""

    name = "onnxruntime"
    precisions = ("fp32",)
    PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}

    def missing(self) -> str | None:
        for mod in ("onnx", "onnxruntime"):
            if not _has_module(mod):
                return f"needs the {mod} package (pip install 'autotune-diffusion[onnx]')"
        return None

    def build(self, request: BuildRequest) -> BuiltArtifact:
        from autotune.compile.onnx_export import export_onnx

        info = export_onnx(request.baked, request.example_inputs, request.out_dir / "model.onnx",
                           [s.name for s in request.inputs], [s.name for s in request.outputs])
        return BuiltArtifact("model.onnx", info)

    def load(self, engine_dir: Path, manifest: Manifest, provider: str = "cpu", threads: int = 0,
             **options: Any) -> BackendRunner:
        import onnxruntime as ort

        if provider not in self.PROVIDERS:
            raise BackendError(f"onnxruntime: provider {provider!r} unknown (one of {', '.join(self.PROVIDERS)})")
        ep = self.PROVIDERS[provider]
        if ep not in ort.get_available_providers():
            raise BackendError(f"onnxruntime: {ep} is not available in this install "
                               f"(available: {', '.join(ort.get_available_providers())}; "
                               "the GPU providers need onnxruntime-gpu)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(engine_dir / manifest.artifact), opts, providers=[ep])
        check_onnx_io(session, manifest, engine_dir)
        out_name = manifest.outputs[0].name

        def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
            return session.run([out_name], inputs)[0]

        return BackendRunner(run, f"onnxruntime {ort.__version__} ({ep})")


_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
              "tensor(int32)": "int32", "tensor(double)": "float64"}


def check_onnx_io(session: Any, manifest: Manifest, where: Path) -> None:
    """The ONNX graph's inputs and outputs are the manifest's (names, dtypes, shapes with a dynamic batch)."""
    for kind, got, specs in (("input", session.get_inputs(), manifest.inputs),
                             ("output", session.get_outputs(), manifest.outputs)):
        if [g.name for g in got] != [s.name for s in specs]:
            raise BackendError(f"{where}: the graph's {kind}s {[g.name for g in got]} are not the manifest's "
                               f"{[s.name for s in specs]}")
        for g, s in zip(got, specs):
            dtype = _ORT_TYPES.get(g.type, g.type)
            shape = tuple(BATCH if isinstance(d, str) or d is None else int(d) for d in g.shape)
            if dtype != s.dtype or shape != s.shape:
                raise BackendError(f"{where}: graph {kind} {g.name!r} is {dtype} {shape}, the manifest says "
                                   f"{s.dtype} {s.shape}")


@register
class TensorRTBackend:
    """TensorRT: ``model.plan`` built from the exported ONNX (FP32 / FP16, a profile over batch sizes), on CUDA."""

    name = "tensorrt"
    precisions = ("fp32", "fp16")

    def missing(self) -> str | None:
        if not _has_module("tensorrt"):
            return ("needs the tensorrt package and an NVIDIA GPU (its wheels fetch their libraries from "
                    "NVIDIA's index at install time)")
        if not torch.cuda.is_available():
            return "needs a CUDA GPU (torch.cuda.is_available() is False)"
        return None

    def build(self, request: BuildRequest) -> BuiltArtifact:
        import tensorrt as trt

        from autotune.compile.onnx_export import export_onnx

        onnx_path = request.out_dir / "model.onnx"
        info = export_onnx(request.baked, request.example_inputs, onnx_path,
                           [s.name for s in request.inputs], [s.name for s in request.outputs])
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"tensorrt: cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 2 << 30)
        if request.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for spec in request.inputs:
            def dims(batch: int) -> tuple[int, ...]:
                return tuple(batch if d == BATCH else int(d) for d in spec.shape)

            profile.set_shape(spec.name, dims(1), dims(request.opt_batch), dims(request.max_batch))
        config.add_optimization_profile(profile)
        started = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError("tensorrt: the engine build failed (see TensorRT's log above)")
        (request.out_dir / "model.plan").write_bytes(bytes(plan))
        info.update(tensorrt=trt.__version__, trt_build_s=round(time.perf_counter() - started, 2),
                    profile={"min": 1, "opt": request.opt_batch, "max": request.max_batch})
        return BuiltArtifact("model.plan", info)

    def load(self, engine_dir: Path, manifest: Manifest, **options: Any) -> BackendRunner:
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine((engine_dir / manifest.artifact).read_bytes())
        if engine is None:
            raise BackendError(f"{engine_dir / manifest.artifact}: TensorRT cannot deserialize it "
                               "(built by another TensorRT version or for another GPU?)")
        context = engine.create_execution_context()
        out_name = manifest.outputs[0].name
        device = torch.device("cuda")

        def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
            tensors = {k: torch.from_numpy(v).to(device).contiguous() for k, v in inputs.items()}
            for name, t in tensors.items():
                context.set_input_shape(name, tuple(t.shape))
                context.set_tensor_address(name, t.data_ptr())
            out = torch.empty(tuple(context.get_tensor_shape(out_name)), dtype=torch.float32, device=device)
            context.set_tensor_address(out_name, out.data_ptr())
            stream = torch.cuda.current_stream()
            if not context.execute_async_v3(stream.cuda_stream):
                raise BackendError("tensorrt: execution failed")
            stream.synchronize()
            return out.cpu().numpy()

        return BackendRunner(run, f"tensorrt {trt.__version__} ({manifest.precision}, "
                                  f"{torch.cuda.get_device_name()})")


@register
class TorchBackend:
    """PyTorch: a ``torch.export`` program of the baked module, under ``torch.compile`` (CUDA graphs on a GPU)."""

    name = "torch"
    precisions = ("fp32", "fp16")

    def missing(self) -> str | None:
        return None  # runs wherever PyTorch does

    def build(self, request: BuildRequest) -> BuiltArtifact:
        args = tuple(request.example_inputs[s.name] for s in request.inputs)
        batch = torch.export.Dim.DYNAMIC
        dynamic = tuple({i: batch for i, d in enumerate(s.shape) if d == BATCH} for s in request.inputs)
        started = time.perf_counter()
        with torch.no_grad():
            program = torch.export.export(request.baked.eval(), args, dynamic_shapes=dynamic, strict=False)
        seconds = time.perf_counter() - started
        torch.export.save(program, str(request.out_dir / "model.pt2"))
        return BuiltArtifact("model.pt2", {"exporter": "torch.export (non-strict)", "export_s": round(seconds, 2),
                                           "torch": torch.__version__})

    def load(self, engine_dir: Path, manifest: Manifest, device: str | None = None, compile: str = "auto",
             **options: Any) -> BackendRunner:
        """``compile``: "auto" (torch.compile with CUDA graphs on a GPU, the exported graph as is on a CPU),
        "on" (torch.compile anywhere) or "off"."""
        if compile not in ("auto", "on", "off"):
            raise BackendError(f"torch backend: compile={compile!r} (auto, on or off)")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: device cuda asked for, but torch.cuda.is_available() is False")
        module = torch.export.load(str(engine_dir / manifest.artifact)).module().to(dev)
        half = manifest.precision == "fp16"
        if half:
            _drop_dtype_asserts(module)
        use_compile = compile == "on" or (compile == "auto" and dev.type == "cuda")
        if use_compile:
            # reduce-overhead records a CUDA graph per input shape; on a CPU it is plain Inductor
            mode = "reduce-overhead" if dev.type == "cuda" else "default"
            module = torch.compile(module, mode=mode)
            how = f"torch.compile(mode={mode!r})" + (" with CUDA graphs" if dev.type == "cuda" else "")
        else:
            how = "exported graph, eager (no torch.compile)"
        half_dtype = torch.float16

        def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
            args = [torch.from_numpy(inputs[s.name]).to(dev) for s in manifest.inputs]
            with torch.no_grad(), torch.autocast(dev.type, dtype=half_dtype, enabled=half):
                out = module(*args)
            return out.float().cpu().numpy()

        what = f"torch {torch.__version__} on {dev.type}: {how}" + (", fp16 autocast" if half else "")
        return BackendRunner(run, what)


def _drop_dtype_asserts(module: torch.fx.GraphModule) -> None:
    """Remove the export's float32 assertions before casts: under fp16 autocast the network's outputs are
    half, and the recorded ``.to(float32)`` after each call (kept) brings them back for the solver."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    module.recompile()
