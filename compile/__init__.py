"""Compile a searched schedule and a model into a deployable engine (ONNX Runtime, TensorRT, torch).

``BakedSampler`` unrolls the schedule's loop with every coefficient a constant; ``build_engine`` exports
it with a backend into an engine directory (artifact + schedule file + ``manifest.json``) and measures
parity against the executor; ``load_engine`` loads one back, checked against its manifest.
"""

from autotune.compile.backends import BACKENDS, Backend, get_backend
from autotune.compile.bake import BakedSampler, Program, bake_program
from autotune.compile.engine import Engine, build_engine, engine_io, load_engine
from autotune.compile.manifest import Manifest, TensorSpec, read_manifest

__all__ = ["BACKENDS", "Backend", "BakedSampler", "Engine", "Manifest", "Program", "TensorSpec", "bake_program",
           "build_engine", "engine_io", "get_backend", "load_engine", "read_manifest"]
