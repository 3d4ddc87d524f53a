"""The `autotune` command line: the only place that prints. Library errors become one line and exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from autotune.errors import AutotuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Search, fit and compile sampling schedules.")
console = Console()
err_console = Console(stderr=True)

DTYPES = {"float32": "float32", "float64": "float64"}


def _one_line_errors(fn: Callable) -> Callable:
    """Turn every AutotuneError into `error: <what and where>` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AutotuneError as e:
            err_console.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}")
    return getattr(torch, name)


@app.command("models")
@_one_line_errors
def models_cmd(
    model: Optional[str] = typer.Option(None, "--model", help="Describe this model (a directory or built-in name)."),
) -> None:
    """List the built-in models (or describe one model) with parameterisation, noise schedule and size."""
    from autotune.models.registry import BUILTIN, builtin_names, describe, load_model

    table = Table("model", "parameterisation", "noise schedule", "parameters", "sample shape", "units", "about")
    names = [model] if model else builtin_names()
    for name in names:
        info = describe(load_model(name))
        about = BUILTIN[name].description if name in BUILTIN else "diffusers pipeline directory"
        table.add_row(
            name, str(info["parameterization"]), str(info["noise"]), f"{info['parameters']:,}",
            "x".join(map(str, info["sample_shape"])), str(info["units"]), about,
        )
    if not names:
        console.print("no built-in models installed; pass a diffusers pipeline directory as --model")
        return
    console.print(table)


@app.command("baseline")
@_one_line_errors
def baseline_cmd(
    name: str = typer.Argument(..., help="ddim, dpmsolver++2m, dpmsolver++3m, unipc-bh1-o2, unipc-bh2-o2, unipc-bh2-o3, ipndm"),
    model: str = typer.Option(..., "--model", help="diffusers pipeline directory or built-in model name"),
    nfe: int = typer.Option(..., "--nfe", min=1, help="model evaluations"),
    out: Path = typer.Option(..., "--out", help="schedule file to write"),
    final: str = typer.Option("zero", "--final", help="last step onto sigma = 0 ('zero') or to t_min ('sigma_min')"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="classifier-free guidance scale"),
) -> None:
    """Write a named hand-designed schedule for MODEL's noise schedule."""
    import dataclasses

    from autotune.models.registry import load_model
    from autotune.sampling.named import build
    from autotune.space.fileformat import save

    m = load_model(model)
    schedule = build(name, m.noise, nfe, final=final)
    if guidance is not None:
        schedule = dataclasses.replace(schedule, guidance=guidance)
    save(schedule, out)
    console.print(f"wrote {out}: {schedule.name}, NFE {schedule.nfe}, hash {schedule.hash()}")


def _load_array(path: Path, what: str):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AutotuneError(f"{what} {path}: cannot read as a .npy array ({e})") from None


@app.command("sample")
@_one_line_errors
def sample_cmd(
    model: str = typer.Option(..., "--model", help="diffusers pipeline directory or built-in model name"),
    schedule: Path = typer.Option(..., "--schedule", help="schedule file"),
    out: Path = typer.Option(..., "--out", help="where to write the final samples (.npy)"),
    noise: Optional[Path] = typer.Option(None, "--noise", help="initial standard-normal noise (.npy, shape B x sample)"),
    num: int = typer.Option(16, "--num", min=1, help="without --noise: how many samples to draw"),
    seed: int = typer.Option(0, "--seed", help="without --noise: seed of the noise"),
    class_labels: Optional[Path] = typer.Option(None, "--class-labels", help="class labels (.npy of ints, length B)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="override the schedule's guidance scale"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64"),
    png: Optional[Path] = typer.Option(None, "--png", help="also write a grid image of the samples"),
) -> None:
    """Run SCHEDULE on MODEL from the given noise and write the final samples."""
    import dataclasses

    import numpy as np
    import torch

    from autotune.models.registry import load_model
    from autotune.sampling.executor import sample
    from autotune.space.fileformat import load

    tdtype = _torch_dtype(dtype)
    sched = load(schedule)  # a bad file fails before any model is loaded
    m = load_model(model, dtype=tdtype)
    sched.check_units(m.units)
    if guidance is not None:
        sched = dataclasses.replace(sched, guidance=guidance)
    shape = tuple(getattr(m, "sample_shape", ()))
    if noise is not None:
        x = torch.from_numpy(np.ascontiguousarray(_load_array(noise, "--noise")))
        if shape and tuple(x.shape[1:]) != shape:
            raise AutotuneError(f"--noise {noise}: shape {tuple(x.shape)} does not fit samples of shape {shape}")
    else:
        if not shape:
            raise AutotuneError("this model does not declare its sample shape: pass --noise")
        x = torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cond = None
    if class_labels is not None:
        labels = _load_array(class_labels, "--class-labels")
        if labels.ndim != 1 or labels.shape[0] != x.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise AutotuneError(f"--class-labels {class_labels}: expected {x.shape[0]} integer labels")
        cond = torch.from_numpy(labels.astype(np.int64))
    result = sample(m, sched, x.to(tdtype), cond)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, result.sample.detach().cpu().numpy())
    console.print(f"wrote {out}: {tuple(result.sample.shape)} samples, NFE {result.nfe}, schedule {sched.hash()}")
    if png is not None:
        from autotune.images import save_grid

        save_grid(result.sample.detach().cpu(), png)
        console.print(f"wrote {png}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
