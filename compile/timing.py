"""Latency of the same schedule run different ways, side by side (for ``autotune bench`` and bench/compile.py).

Ways: ``eager`` (``sampling.executor.sample``: plan computed per call, the Python loop), ``baked`` (the
BakedSampler in eager PyTorch), every engine backend (built into a scratch directory), and ``bare``:
NFE times one ONNX Runtime forward of the network call alone (CFG included), the floor an engine's loop
overhead is measured against. Every way of one bench is timed on one clock (evaluate/clock.py): by default the
process's CPU time when every way runs on the CPU in one thread, else the wall clock.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from autotune.compile.backends import BACKENDS, check_provider
from autotune.compile.bake import BakedSampler, condition_of_inputs
from autotune.compile.engine import build_engine, engine_io, example_inputs, executor_sample, load_engine
from autotune.errors import BackendError
from autotune.evaluate.clock import median_seconds, module_device, resolve_clock
from autotune.sampling.denoiser import Denoiser
from autotune.space.schedule import Schedule

WAYS = ("eager", "baked", *BACKENDS, "bare")


@dataclass(frozen=True)
class BenchRow:
    way: str
    batch: int
    seconds: float  # median of the timed repeats
    note: str = ""
    clock: str = "wall"  # the clock of ``seconds``: wall or cpu (evaluate/clock.py)


def bench_clock(model: Denoiser, ways: list[str], provider: str, threads: int, clock: str = "auto") -> str:
    """The one clock every way of a bench is timed on: ``auto`` takes CPU time when each way runs on the CPU in one
    thread (torch on the model's device; ONNX Runtime on ``provider``; TensorRT, and the torch engine where CUDA
    is present, on the GPU)."""
    on_gpu = (provider != "cpu" or "tensorrt" in ways or module_device(model).type != "cpu"
              or ("torch" in ways and torch.cuda.is_available()))
    return resolve_clock(clock, "cuda" if on_gpu else "cpu", threads)


class NetworkCall(torch.nn.Module):
    """One model call of the schedule (first step's time, its guidance): the unit ``bare`` is NFE times."""

    def __init__(self, model: Denoiser, schedule: Schedule) -> None:
        super().__init__()
        self.network = model.module
        self.model = model
        self.t = torch.tensor(schedule.t_start, dtype=torch.float64)
        self.guidance = schedule.guidance

    def forward(self, x: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.t, condition_of_inputs(self.model, conditions), guidance=self.guidance)


def _bare_session(model: Denoiser, schedule: Schedule, workdir: Path, threads: int, provider: str):
    """An ONNX Runtime session over the bare network call on ``provider`` (an onnxruntime engine's provider)."""
    from autotune.compile.backends import onnx_session
    from autotune.compile.onnx_export import export_onnx

    inputs, outputs = engine_io(model)
    names = [s.name for s in inputs]
    path = workdir / "bare.onnx"
    export_onnx(NetworkCall(model, schedule), example_inputs(model, inputs, 2), path, names, ["out"])
    return onnx_session(path, provider, threads)


def bench(
    model: Denoiser,
    schedule: Schedule,
    ways: list[str],
    batches: list[int],
    *,
    repeats: int = 5,
    threads: int = 1,
    provider: str = "cpu",
    workdir: str | Path | None = None,
    on_row: Callable[[BenchRow], None] | None = None,
    clock: str = "auto",
) -> list[BenchRow]:
    """Time each of ``ways`` at each batch size on the same inputs; ``on_row`` sees each row as it is measured.
    ``clock``: ``auto``, ``wall`` or ``cpu`` (``bench_clock``; each row records the one used).

    ``provider`` is onnxruntime's execution provider ("cpu", "cuda", "tensorrt") for the ``onnxruntime`` engine
    and for ``bare``; the engine's parity with the executor is checked on it when the engine is built.
    Raises BackendError for an unknown way, provider, or a backend missing here (before anything is timed).
    """
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        raise BackendError(f"bench: unknown {', '.join(unknown)} (one of {', '.join(WAYS)})")
    for w in ways:
        if w in BACKENDS and BACKENDS[w].missing() is not None:
            raise BackendError(f"backend {w!r}: {BACKENDS[w].missing()}")
    check_provider(provider)
    clock = bench_clock(model, ways, provider, threads, clock)
    device = "cuda" if clock == "wall" and torch.cuda.is_available() else "cpu"  # a GPU way is synchronised
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="autotune-bench-") as tmp:
        root = Path(workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        inputs, _ = engine_io(model, schedule)
        runners: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {}
        notes: dict[str, str] = {}
        baked = BakedSampler(model, schedule).eval()
        for w in ways:
            if w == "eager":
                runners[w] = lambda d: executor_sample(model, schedule, d)
            elif w == "baked":
                runners[w] = lambda d: baked(*[d[s.name] for s in inputs])
            elif w == "bare":
                session = _bare_session(model, schedule, root, threads, provider)
                nfe = schedule.nfe
                notes[w] = f"{nfe} x one network forward (onnxruntime, {session.get_providers()[0]})"

                def run_bare(d, session=session, nfe=nfe):
                    feed = {k: v.numpy() for k, v in d.items()}
                    for _ in range(nfe):
                        session.run(None, feed)
                runners[w] = run_bare
            else:
                options = {"threads": threads, "provider": provider} if w == "onnxruntime" else {}
                build_engine(model, schedule, root / w, w, model_spec="bench", parity_noises=2,
                             load_options=options)
                engine = load_engine(root / w, model, **options)  # a torch engine is rebuilt from the model
                notes[w] = engine.description
                runners[w] = lambda d, engine=engine: engine(**{k: v.numpy() for k, v in d.items()})
        for batch in batches:
            data = example_inputs(model, inputs, batch, seed=1)
            for w in ways:
                with torch.no_grad():
                    seconds = median_seconds(lambda: runners[w](data), repeats, clock=clock, device=device)
                row = BenchRow(w, batch, seconds, notes.get(w, ""), clock)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def ratios(rows: list[BenchRow]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (way, batch): speed-up over ``eager`` and latency over ``bare`` (NFE x bare forward), where present."""
    by = {(r.way, r.batch): r.seconds for r in rows}
    out: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        entry = {}
        if ("eager", r.batch) in by:
            entry["speedup_vs_eager"] = by[("eager", r.batch)] / r.seconds
        if ("bare", r.batch) in by:
            entry["vs_bare"] = r.seconds / by[("bare", r.batch)]
        out[(r.way, r.batch)] = entry
    return out

