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
- ``torch``: no serialized program: the artifact is the schedule file, and loading rebuilds the baked
  module from this package's code and the model (the caller's, or the built-in model the manifest names),
  exports it with ``torch.export`` (weights once, dynamic batch) and runs it under ``torch.compile`` with
  CUDA graphs (``mode="reduce-overhead"``) on a GPU; on a CPU it runs the exported graph eagerly unless
  compiling is asked for (Inductor took minutes per batch size on CPU for no gain on the digits UNet).
  FP16 is ``torch.autocast`` around the call: convolutions and matmuls in half precision, the solver's
  arithmetic and the state in float32.

Loading an engine directory never runs code from it: see each backend's ``load`` for why that holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from autotune.compile.manifest import BATCH, SCHEDULE_FILE, Manifest, TensorSpec, inside
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

    def load(self, engine_dir: Path, manifest: Manifest, **options: Any) -> BackendRunner:
        """The engine as a runner; ``options`` always carry ``model`` (the caller's Denoiser or None) and
        ``schedule`` (the directory's, hash-checked), plus the backend's own options."""


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


def check_provider(provider: str) -> None:
    """``provider`` names one of onnxruntime's execution providers we run engines on, and this install has it."""
    if provider not in OnnxRuntimeBackend.PROVIDERS:
        raise BackendError(f"onnxruntime: provider {provider!r} unknown "
                           f"(one of {', '.join(OnnxRuntimeBackend.PROVIDERS)})")
    if provider == "cpu" or not _has_module("onnxruntime"):
        return  # the CPU provider is in every install; a missing onnxruntime is the backend's own error
    import onnxruntime as ort

    ep = OnnxRuntimeBackend.PROVIDERS[provider]
    if ep not in ort.get_available_providers():
        raise BackendError(f"onnxruntime: {ep} is not available in this install "
                           f"(available: {', '.join(ort.get_available_providers())}; "
                           "the GPU providers need onnxruntime-gpu)")


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
        """An InferenceSession over the artifact. Safe on any directory: ONNX is a protobuf of operators,
        never Python, and the only files it can make the runtime read, external tensor data, are checked to
        lie inside the engine directory first (``check_external_data``: onnxruntime 1.32 refuses such paths
        itself, but our pin allows releases from 1.18, and its refusal is a traceback, not one line)."""
        import onnxruntime as ort

        check_provider(provider)  # before the directory is read, as the CLI checks it before any work
        artifact = inside(engine_dir, manifest.artifact, "the artifact")
        check_external_data(artifact, engine_dir)
        session = onnx_session(artifact, provider, threads)
        check_onnx_io(session, manifest, engine_dir)
        out_name = manifest.outputs[0].name

        def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
            return session.run([out_name], inputs)[0]

        return BackendRunner(run, f"onnxruntime {ort.__version__} ({session.get_providers()[0]})")


def onnx_session(path: Path, provider: str, threads: int = 0) -> Any:
    """An InferenceSession over ``path`` on ``provider`` (``threads``: intra-op threads, 0 = onnxruntime's own)."""
    import onnxruntime as ort

    check_provider(provider)
    ep = OnnxRuntimeBackend.PROVIDERS[provider]
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=[ep])
    if session.get_providers()[0] != ep:
        # onnxruntime falls back to the CPU provider with only a logged warning when a GPU provider's
        # libraries (CUDA, cuDNN, TensorRT) fail to load: say so instead of timing the CPU as the GPU
        raise BackendError(f"onnxruntime: {ep} failed to start (the session runs on "
                           f"{', '.join(session.get_providers())}); see onnxruntime's log above for the "
                           "library it could not load")
    return session


def _tensors(graph: Any):
    """Every TensorProto a graph holds: initializers, sparse initializers, and node attributes, subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node.attribute)


def _attribute_tensors(attributes: Any):
    for attr in attributes:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _tensors(attr.g)
        for sub in attr.graphs:
            yield from _tensors(sub)


def check_external_data(model_path: Path, engine_dir: Path) -> None:
    """Every external-data file the ONNX model at ``model_path`` names lies inside ``engine_dir``.

    The model is parsed without its external data (a protobuf parse: no code runs), and each tensor stored
    outside it must name a location that resolves, relative to the model's folder as ONNX defines it, to a
    file inside the engine directory; ``..``, absolute paths and symlinks leading elsewhere are refused."""
    import onnx
    from onnx import TensorProto

    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends; name it in one line
        raise BackendError(f"{model_path}: not a readable ONNX model ({type(e).__name__})") from None
    tensors = list(_tensors(proto.graph))
    for function in proto.functions:
        for node in function.node:
            tensors.extend(_attribute_tensors(node.attribute))
    for tensor in tensors:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        inside(engine_dir, location, f"{model_path.name}: the external data of initializer {tensor.name!r},",
               base=model_path.parent)


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
        """Deserialize the plan with host code refused: a version-compatible plan can embed host code
        (a lean runtime, plugins), which would run in this process; ours never embed any."""
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        runtime.engine_host_code_allowed = False  # TensorRT's default, set so no other default can change it
        engine = runtime.deserialize_cuda_engine(inside(engine_dir, manifest.artifact, "the artifact").read_bytes())
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
    """PyTorch: the baked module rebuilt from this package's code, exported and run under ``torch.compile``.

    Safety guarantee: loading a torch engine directory never deserializes code or pickles from it. A
    ``torch.export`` archive (``model.pt2``) unpickles every weight it marks ``use_pickle`` (a crafted one ran
    a shell command), and torch warns never to load one from an untrusted source; so this backend writes no
    program and ``load`` never calls ``torch.export.load``. The directory contributes only the schedule file
    (strict JSON, hash-checked) and the manifest; the network is the caller's model, or the built-in model
    the manifest names (package code and package weights, fingerprint-checked), never a path from the
    manifest. ``torch.export`` then runs here, on our own module. Directories holding a program (written
    before this change) are refused with one line saying to rebuild them.
    """

    name = "torch"
    precisions = ("fp32", "fp16")

    def missing(self) -> str | None:
        return None  # runs wherever PyTorch does

    def build(self, request: BuildRequest) -> BuiltArtifact:
        # nothing to serialize: the engine is the schedule (written by build_engine) plus the model's identity
        return BuiltArtifact(SCHEDULE_FILE, {"program": "rebuilt and exported with torch.export at load time",
                                             "torch": torch.__version__})

    def load(self, engine_dir: Path, manifest: Manifest, model: Any = None, schedule: Any = None,
             device: str | None = None, compile: str = "auto", **options: Any) -> BackendRunner:
        """``compile``: "auto" (torch.compile with CUDA graphs on a GPU, the exported graph as is on a CPU),
        "on" (torch.compile anywhere) or "off". ``model``: the Denoiser the engine was built from; None
        rebuilds the built-in model the manifest names."""
        from autotune.compile.bake import BakedSampler

        if compile not in ("auto", "on", "off"):
            raise BackendError(f"torch backend: compile={compile!r} (auto, on or off)")
        if manifest.artifact != SCHEDULE_FILE:
            raise BackendError(f"{engine_dir / manifest.artifact}: a serialized torch program; loading one can run "
                               "code (torch.export.load unpickles what the archive marks as pickled), so autotune "
                               "does not load it: rebuild the engine with `autotune compile`")
        if schedule is None:
            raise BackendError("torch backend: load needs the engine's schedule (use load_engine)")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch backend: device cuda asked for, but torch.cuda.is_available() is False")
        if model is None:
            model = _builtin_model(engine_dir, manifest)
        started = time.perf_counter()
        module = _on_device(_export(BakedSampler(model, schedule, torch.float32).eval(), manifest), dev)
        export_s = time.perf_counter() - started
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

        what = (f"torch {torch.__version__} on {dev.type}: {how}" + (", fp16 autocast" if half else "")
                + f", exported at load in {export_s:.1f} s")
        return BackendRunner(run, what)


def _builtin_model(engine_dir: Path, manifest: Manifest) -> Any:
    """The built-in model a torch engine names, from this package (never a directory), fingerprint-checked."""
    from autotune.models.registry import BUILTIN, builtin_names

    spec = str(manifest.model.get("spec", ""))
    if spec not in builtin_names():
        raise BackendError(f"{engine_dir}: a torch engine of {spec!r}, which is not a built-in model: give the model "
                           "(load_engine(DIR, model)); an engine never loads a model from a path its manifest names")
    model = BUILTIN[spec].factory(torch.float32)
    if model.fingerprint() != manifest.model.get("fingerprint"):
        raise BackendError(f"{engine_dir}: built for {spec} with fingerprint {manifest.model.get('fingerprint')}, "
                           f"this install's {spec} is {model.fingerprint()} (rebuild the engine)")
    return model


def _export(baked: torch.nn.Module, manifest: Manifest) -> torch.fx.GraphModule:
    """``torch.export`` of our own baked module (dynamic batch), traced on zero inputs of the manifest's specs."""
    batch = 2  # not 1: export specializes a dimension of size 1
    args = tuple(torch.zeros(tuple(batch if d == BATCH else int(d) for d in s.shape), dtype=getattr(torch, s.dtype))
                 for s in manifest.inputs)
    dims = [{i: torch.export.Dim.DYNAMIC for i, d in enumerate(s.shape) if d == BATCH} for s in manifest.inputs]
    dynamic = (dims[0], tuple(dims[1:]))  # as BakedSampler.forward(noise, *conditions) takes them
    with torch.no_grad():
        try:
            program = torch.export.export(baked, args, dynamic_shapes=dynamic, strict=False)
        except Exception as e:  # the exporter raises many unrelated types; name it in one line
            first = str(e).splitlines()[0] if str(e) else ""
            raise BackendError(f"torch backend: torch.export failed: {type(e).__name__}: {first}") from None
    return program.module()


def _on_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The exported graph ``module`` made to run on ``device``, the caller's model left where it is.

    ``module.to(device)`` is not enough, and wrong: the graph shares its parameters with the model it was traced
    from, and ``Module.to`` moves a shared parameter in place (the caller's network ended up on the GPU); the
    export's lifted constants are plain tensor attributes, which ``to`` leaves behind; and the graph names the
    device it was traced on (``to(dtype, device=cpu)`` after each cast, ``arange(device=cpu)``, the export's
    metadata assertions), so the first cast would bring every tensor back to the CPU mid-graph. So: device
    arguments of the graph are pointed at ``device``, parameters and buffers replaced by copies there, plain
    tensor attributes moved. Tensors already on ``device`` are left alone (no copy on the CPU)."""
    graph = getattr(module, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"] != device:
                node.update_kwarg("device", device)
            if any(isinstance(a, torch.device) and a != device for a in node.args):
                node.args = tuple(device if isinstance(a, torch.device) else a for a in node.args)
        module.recompile()
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device != device:
                sub._parameters[name] = torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.device != device:
                sub._buffers[name] = b.to(device)
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(sub, name, value.to(device))
    return module


def _drop_dtype_asserts(module: torch.fx.GraphModule) -> None:
    """Remove the export's float32 assertions before casts: under fp16 autocast the network's outputs are
    half, and the recorded ``.to(float32)`` after each call (kept) brings them back for the solver."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    module.recompile()
