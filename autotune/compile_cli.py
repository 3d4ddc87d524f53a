"""`autotune compile` (schedule + model -> engine directory) and `autotune bench` (eager vs baked vs engines)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from autotune.sampling.capabilities import check_guidance_applies
from autotune.cli_common import MAX_BATCH, MAX_ITERATIONS, MAX_THREADS, check_guidance
from autotune.cli_common import check_output_dir, console, one_line_errors
from autotune.errors import AutotuneError, InputError
from autotune.progress_cli import step


def _csv(text: str, what: str) -> list[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items:
        raise AutotuneError(f"{what}: give a comma-separated list")
    return items


def _batches(text: str) -> list[int]:
    try:
        values = [int(p) for p in _csv(text, "--batch")]
    except ValueError:
        raise AutotuneError(f"--batch {text!r}: expected comma-separated positive integers, e.g. 1,16") from None
    if any(v < 1 or v > MAX_BATCH for v in values):
        raise InputError(f"--batch {text!r}: batch sizes must be in 1..{MAX_BATCH}")
    return values


def _model_and_schedule(model: str, schedule: Path, guidance: Optional[float]):
    import dataclasses

    from autotune.models.registry import load_model
    from autotune.space.fileformat import load

    check_guidance(guidance)
    sched = load(schedule)  # a bad file fails before any model is loaded
    m = load_model(model)
    sched.check_units(m.units)
    if guidance is not None:
        sched = dataclasses.replace(sched, guidance=guidance)
    check_guidance_applies(m, sched.guidance, model)
    return m, sched


def compile_cmd(
    model: str = typer.Option(..., "--model", help="diffusers pipeline directory or built-in model name"),
    schedule: Path = typer.Option(..., "--schedule", help="schedule file"),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, tensorrt or torch"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16 (tensorrt, torch)"),
    out: Path = typer.Option(..., "--out", help="engine directory to write"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="override the schedule's guidance (baked in)"),
    max_batch: int = typer.Option(64, "--max-batch", min=1, max=MAX_BATCH, help="tensorrt: largest batch of the profile"),
    provider: str = typer.Option(
        "cpu", "--provider", help="onnxruntime: the execution provider the parity check runs on (cpu, cuda, tensorrt)"),
) -> None:
    """Bake SCHEDULE on MODEL into an engine directory (artifact, schedule file, manifest.json)."""
    import torch

    from autotune.compile import build_engine

    check_output_dir(out, "--out")
    load_options = _provider_options(backend, provider)
    torch.set_num_threads(1)
    with step(f"loading {model}"):
        m, sched = _model_and_schedule(model, schedule, guidance)
    with step(f"baking, exporting ({backend}) and checking parity"):
        man = build_engine(m, sched, out, backend, precision, model_spec=model, max_batch=max_batch,
                           load_options=load_options)
    p = man.parity
    console.print(f"wrote {out}: {man.backend} {man.precision}, {man.artifact}, NFE {sched.nfe}, "
                  f"schedule {sched.hash()}")
    ins = ", ".join(f"{s.name} {s.dtype} ({', '.join(map(str, s.shape))})" for s in man.inputs)
    console.print(f"inputs: {ins} -> {man.outputs[0].name}")
    console.print(f"parity vs executor on {p['noises']} noises: baked {p['baked_vs_executor_max_abs']:.2e}, "
                  f"engine {p['engine_vs_executor_max_abs']:.2e} (max abs)")
    console.print(f"runs on: {p['engine_runtime']}")


def bench_cmd(
    model: str = typer.Option(..., "--model", help="diffusers pipeline directory or built-in model name"),
    schedule: Path = typer.Option(..., "--schedule", help="schedule file"),
    backends: str = typer.Option("eager,baked,onnxruntime", "--backends",
                                 help="comma list of eager, baked, onnxruntime, tensorrt, torch, bare"),
    batch: str = typer.Option("1,16", "--batch", help="comma list of batch sizes"),
    repeats: int = typer.Option(5, "--repeats", min=1, max=MAX_ITERATIONS,
                                help="timed calls per cell (the median is shown)"),
    threads: int = typer.Option(1, "--threads", min=1, max=MAX_THREADS, help="CPU threads for torch and onnxruntime"),
    provider: str = typer.Option("cpu", "--provider",
                                 help="execution provider of the onnxruntime and bare ways: cpu, cuda or tensorrt"),
    clock: str = typer.Option("auto", "--clock", help="auto, wall or cpu; auto: this process's CPU time when every "
                              "way runs on the CPU in one thread (the machine's other load does not inflate it), "
                              "else the wall clock"),
) -> None:
    """Latency of SCHEDULE on MODEL: eager executor vs baked module vs engines, side by side."""
    import torch

    from autotune.compile.backends import check_provider
    from autotune.compile.timing import bench, ratios
    from autotune.evaluate.clock import clock_words, resolve_clock

    check_provider(provider)
    resolve_clock(clock)  # a clock it does not know is refused before the model loads
    torch.set_num_threads(threads)
    ways = _csv(backends, "--backends")
    sizes = _batches(batch)
    with step(f"loading {model}"):
        m, sched = _model_and_schedule(model, schedule, None)
    with step(f"building and timing {', '.join(ways)} at batch {', '.join(map(str, sizes))}"):
        rows = bench(m, sched, ways, sizes, repeats=repeats, threads=threads, provider=provider, clock=clock)
    rel = ratios(rows)
    from autotune.tables import bench_table

    console.print(bench_table(rows, rel, f"{model}, schedule {sched.hash()}, NFE {sched.nfe}, {threads} thread(s), "
                                         f"{clock_words(rows[0].clock)}"))
    for way, note in dict((r.way, r.note) for r in rows if r.note).items():
        console.print(f"{way}: {note}", highlight=False)


def _provider_options(backend: str, provider: Optional[str]) -> dict[str, str]:
    """The loader options ``--provider`` asks for: onnxruntime's execution provider, checked before any work."""
    from autotune.compile.backends import check_provider

    if provider is None:
        return {}
    if backend != "onnxruntime":
        if provider == "cpu":
            return {}
        raise InputError(f"--provider {provider}: only onnxruntime engines take a provider (this is {backend})")
    check_provider(provider)
    return {"provider": provider}


def sample_engine(engine_dir: Path, out: Path, noise: Optional[Path], num: Optional[int], seed: int,
                  class_labels: Optional[Path], png: Optional[Path], columns: Optional[int],
                  provider: Optional[str] = None) -> None:
    """`autotune sample --engine DIR`: run a compiled engine on the noise (and labels) and write the samples."""
    import numpy as np

    from autotune.cli import _load_array, check_finite_samples, read_noise, save_npy

    if not engine_dir.is_dir():
        raise InputError(f"--engine {engine_dir}: not a directory (an engine directory from `autotune compile`)")
    with step(f"loading the engine in {engine_dir}"):  # the runtime's import and session start are this wait
        from autotune.compile import load_engine, read_manifest

        eng = load_engine(engine_dir, **_provider_options(read_manifest(engine_dir).backend, provider))
    specs = {s.name: s for s in eng.manifest.inputs}
    if noise is not None:
        x = read_noise(noise).astype(np.float32)
    else:
        shape = tuple(int(d) for d in specs["noise"].shape[1:])
        x = np.random.default_rng(seed).standard_normal((num or 16, *shape)).astype(np.float32)
    feed = {"noise": x}
    if "class_labels" in specs:
        if class_labels is None:
            raise AutotuneError(f"--engine {engine_dir}: a class-conditional engine; give --class-labels")
        labels = _load_array(class_labels, "--class-labels")
        if not np.issubdtype(labels.dtype, np.integer):
            raise AutotuneError(f"--class-labels {class_labels}: expected integer labels, got {labels.dtype}")
        feed["class_labels"] = labels.astype(np.int64)
    elif class_labels is not None:
        raise AutotuneError(f"--class-labels: the engine {engine_dir} is not class-conditional")
    missing = sorted(set(specs) - set(feed))
    if missing:
        raise AutotuneError(f"--engine {engine_dir}: needs inputs {missing}, which `sample` cannot provide")
    result = eng(**feed)
    check_finite_samples(result)
    save_npy(out, result)
    sched = eng.manifest.schedule
    console.print(f"wrote {out}: {tuple(result.shape)} samples, NFE {sched['nfe']}, schedule {sched['hash']}, "
                  f"engine {eng.manifest.backend} {eng.manifest.precision} ({eng.description})")
    if png is not None:
        import torch

        from autotune.images import save_grid

        save_grid(torch.from_numpy(result), png, columns=columns)
        console.print(f"wrote {png}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `autotune` app."""
    app.command("compile")(one_line_errors(compile_cmd))
    app.command("bench")(one_line_errors(bench_cmd))
