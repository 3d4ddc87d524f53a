"""The `autotune` command line: the only place that prints. Library errors become one line and exit 2."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer

from autotune.cli_common import CACHE_HELP, console, err_console, one_line_errors, open_store_option
from autotune.cli_common import MAX_BATCH, MAX_ITERATIONS, MAX_SEED, MAX_THREADS, check_guidance
from autotune.cli_common import check_output_dir, check_output_file
from autotune.errors import AutotuneError, InputError
from autotune.sampling.capabilities import capabilities_of, check_guidance_applies
from autotune.search.job import DEFAULT_METHOD, DEFAULT_PARETO_METHOD, DEFAULT_REFINE  # torch-free; helps name them
from autotune.space.fileformat import MAX_NFE

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Search, fit and compile sampling schedules.",
                  context_settings={"help_option_names": ["-h", "--help"]})  # sub-commands inherit -h


def _flags_without_type() -> None:
    """typer 0.2x shows every on/off flag (--help too) with a `<bool>` type, as if it took a value; a flag
    takes none, so its type column stays empty. (Older typer has no display_type_rich and no such type.)"""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "autotune_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.autotune_flags = True
    TyperOption.display_type_rich = display_type_rich


_flags_without_type()


def _print_version(value: bool) -> None:
    if value:
        from autotune import __version__

        console.print(f"autotune {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _app_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Search, fit and compile sampling schedules."""


DTYPES = ("float32", "float64")


_one_line_errors = one_line_errors


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}")
    return getattr(torch, name)


@app.command("models")
@_one_line_errors
def models_cmd(
    name: Optional[str] = typer.Argument(None, metavar="MODEL",
                                         help="Describe this model (a directory or built-in name)."),
    model: Optional[str] = typer.Option(None, "--model", help="The same as MODEL."),
) -> None:
    """List the built-in models (or describe one model) with parameterisation, noise schedule and size."""
    if name is not None and model is not None and name != model:
        raise AutotuneError(f"models: give one model, as MODEL or --model (got {name!r} and {model!r})")
    model = name or model
    from autotune.models.registry import BUILTIN, builtin_names, describe, load_model

    from autotune.tables import model_notes, models_table

    names = [model] if model else builtin_names()
    infos = [{**describe(load_model(name)), "name": name,
              "about": BUILTIN[name].description if name in BUILTIN else "diffusers pipeline directory"}
             for name in names]
    if not names:
        console.print("no built-in models installed; pass a diffusers pipeline directory as --model")
        return
    console.print(models_table(infos))
    for line in model_notes(infos):
        console.print(line, highlight=False)


@app.command("baseline")
@_one_line_errors
def baseline_cmd(
    name: str = typer.Argument(..., help="ddim, dpmsolver++2m, dpmsolver++3m, unipc-bh1-o2, "
                              "unipc-bh1-o3 (diffusers' bh1: unipc-bh1-o2|3-smin), unipc-bh2-o2, "
                              "unipc-bh2-o3, ipndm; "
                              "flow models also flow-euler, flow-euler-shift1|3|6, unipc-flow, dpmsolver++2m-flow"),
    model: str = typer.Option(..., "--model", help="diffusers pipeline directory or built-in model name"),
    nfe: int = typer.Option(..., "--nfe", min=1, max=MAX_NFE, help=f"model evaluations (1..{MAX_NFE})"),
    out: Path = typer.Option(..., "--out", help="schedule file to write"),
    final: Optional[str] = typer.Option(None, "--final", help="last step onto sigma = 0 ('zero') or to t_min "
                                        "('sigma_min'); default: the name's (sigma = 0 but the *-smin ones)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="classifier-free guidance scale"),
) -> None:
    """Write a named hand-designed schedule for MODEL's noise schedule."""
    import dataclasses

    from autotune.models.registry import load_model
    from autotune.sampling.named import build
    from autotune.space.fileformat import save

    check_output_file(out, "--out")
    check_guidance(guidance)
    m = load_model(model)
    check_guidance_applies(m, guidance, model)
    schedule = build(name, m.noise, nfe, final=final)
    if guidance is not None:
        schedule = dataclasses.replace(schedule, guidance=guidance)
    save(schedule, out)
    console.print(f"wrote {out}: {schedule.name}, NFE {schedule.nfe}, hash {schedule.hash()}")
    has = capabilities_of(m)
    if guidance is None and has.guidance_input:  # Flux dev: the guidance is a network input
        console.print("note: a guidance-distilled model; without --guidance it runs at the pipeline's default scale")
    elif guidance is None and has.prompts:
        console.print("note: a text-to-image model; this schedule is unguided (pass --guidance, e.g. 7.5, for CFG)")


def _load_array(path: Path, what: str):
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{what} {path}: cannot read as a .npy array ({e})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        array.close()
        raise InputError(f"{what} {path}: an .npz archive, not one .npy array")
    return array


def read_noise(path: Path):
    """``--noise``: a (batch >= 1, ...) array of finite real floats, refused otherwise (NaN noise gives NaN
    samples; complex, boolean or string arrays are not noise)."""
    import numpy as np

    x = _load_array(path, "--noise")
    if x.dtype.kind != "f":
        raise InputError(f"--noise {path}: expected floating-point noise, got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise InputError(f"--noise {path}: expected shape (batch >= 1, *sample), got {x.shape}")
    if x.shape[0] > MAX_BATCH:
        raise InputError(f"--noise {path}: {x.shape[0]} samples; at most {MAX_BATCH} per call")
    if not np.isfinite(x).all():
        raise InputError(f"--noise {path}: holds NaN or infinite values")
    return x


def check_finite_samples(samples, diverged_at: Optional[int] = None) -> None:
    """Refuse to write samples holding NaN or inf (a diverging schedule, an overflowing dtype)."""
    import numpy as np

    if diverged_at is not None or not np.isfinite(samples).all():
        where = f" from step {diverged_at} on" if diverged_at is not None else ""
        raise InputError(f"the samples are not finite{where} (the schedule diverges on this noise and model); "
                         "nothing written")


def save_npy(path: Path, array) -> None:
    """Write one .npy file atomically, at exactly ``path`` (np.save alone appends .npy to other names)."""
    import io

    import numpy as np

    from autotune.space.fileformat import write_atomically

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomically(path, buffer.getvalue())


@app.command("sample")
@_one_line_errors
def sample_cmd(
    model: Optional[str] = typer.Option(None, "--model", help="diffusers pipeline directory or built-in model name"),
    schedule: Optional[Path] = typer.Option(None, "--schedule", help="schedule file"),
    out: Path = typer.Option(..., "--out", help="where to write the final samples (.npy)"),
    engine: Optional[Path] = typer.Option(None, "--engine",
                                          help="engine directory from `autotune compile` (instead of --model/--schedule)"),
    noise: Optional[Path] = typer.Option(None, "--noise", help="initial standard-normal noise (.npy, shape B x sample)"),
    num: Optional[int] = typer.Option(None, "--num", min=1, max=MAX_BATCH,
                                      help="without --noise: how many samples to draw (default 16, or one per prompt)"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="without --noise: seed of the noise"),
    class_labels: Optional[Path] = typer.Option(None, "--class-labels", help="class labels (.npy of ints, length B)"),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="text-to-image models: a text file, one prompt per line (one for all, or one per sample)"
    ),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="override the schedule's guidance scale"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64"),
    png: Optional[Path] = typer.Option(None, "--png", help="also write a grid image of the samples"),
    columns: Optional[int] = typer.Option(None, "--columns", min=1, help="samples per row of the --png grid"),
    provider: Optional[str] = typer.Option(
        None, "--provider", help="with --engine (onnxruntime): execution provider cpu, cuda or tensorrt"),
) -> None:
    """Run SCHEDULE on MODEL (or a compiled --engine) from the given noise and write the final samples."""
    import dataclasses

    from autotune.progress_cli import step
    from autotune.space.fileformat import load

    check_output_file(out, "--out")
    check_output_file(png, "--png")
    if png is not None and png.suffix.lower() != ".png":
        raise InputError(f"--png {png}: name a .png file")
    if noise is not None and num is not None:
        raise InputError("--noise and --num: the noise file sets the number of samples; give one or the other")
    check_guidance(guidance)
    if engine is not None:
        if model is not None or schedule is not None or prompts is not None or guidance is not None:
            raise AutotuneError("--engine: the engine holds its model, schedule and guidance; drop --model, "
                                "--schedule, --prompts and --guidance")
        from autotune.compile_cli import sample_engine

        sample_engine(engine, out, noise, num, seed, class_labels, png, columns, provider)
        return
    if provider is not None:
        raise InputError("--provider: only with --engine (an onnxruntime engine directory)")
    if model is None or schedule is None:
        raise AutotuneError("sample: give --model and --schedule, or --engine")
    sched = load(schedule)  # a bad file fails before any model is loaded
    with step(f"loading {model}"):  # importing torch (with the executor) is much of this wait
        from autotune.models.registry import load_model
        from autotune.sampling.executor import sample

        tdtype = _torch_dtype(dtype)
        m = load_model(model, dtype=tdtype)
    sched.check_units(m.units)
    if guidance is not None:
        sched = dataclasses.replace(sched, guidance=guidance)
    check_guidance_applies(m, sched.guidance, model)
    texts = _sample_prompts(m, model, prompts, class_labels)
    if num is None:
        num = len(texts) if texts is not None else 16
    x = _initial_noise(m, noise, num, seed)
    cond = _sample_condition(m, x.shape[0], class_labels, prompts, texts)
    result = sample(m, sched, x.to(tdtype), cond, check_finite=True)
    check_finite_samples(result.sample.detach().cpu().numpy(), result.diverged_at)
    save_npy(out, result.sample.detach().cpu().numpy())
    console.print(f"wrote {out}: {tuple(result.sample.shape)} samples, NFE {result.nfe}, schedule {sched.hash()}")
    if png is not None:
        from autotune.images import save_grid

        images = result.sample.detach()
        if capabilities_of(m).decodes:  # latents: the VAE turns them into images (outside the sampling loop)
            images = m.decode(images)
        save_grid(images.cpu(), png, columns=columns)
        console.print(f"wrote {png}")


def _sample_prompts(m, model: str, prompts: Optional[Path], class_labels: Optional[Path]) -> Optional[list[str]]:
    """`sample --prompts`: the prompt texts, refused with class labels or for a model without text."""
    if prompts is None:
        return None
    if class_labels is not None:
        raise AutotuneError("--prompts and --class-labels: give one or the other")
    if not capabilities_of(m).prompts:
        raise AutotuneError(f"--prompts: {model} is not a text-to-image model")
    from autotune.models.latent import read_prompts

    return read_prompts(prompts)


def _initial_noise(m, noise: Optional[Path], num: int, seed: int):
    """The starting noise: the --noise file (checked against the model's sample shape), or ``num`` seeded draws."""
    import numpy as np
    import torch

    shape = capabilities_of(m).sample_shape or ()
    if noise is not None:
        x = torch.from_numpy(np.ascontiguousarray(read_noise(noise)))
        if shape and tuple(x.shape[1:]) != shape:
            raise AutotuneError(f"--noise {noise}: shape {tuple(x.shape)} does not fit samples of shape {shape}")
        return x
    if not shape:
        raise AutotuneError("this model does not declare its sample shape: pass --noise")
    return torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sample_condition(m, batch: int, class_labels: Optional[Path], prompts: Optional[Path],
                      texts: Optional[list[str]]):
    """The condition of ``batch`` samples: class labels, encoded prompts, or None."""
    import numpy as np
    import torch

    cond = None
    if class_labels is not None:
        labels = _load_array(class_labels, "--class-labels")
        if labels.ndim != 1 or labels.shape[0] != batch or not np.issubdtype(labels.dtype, np.integer):
            raise AutotuneError(f"--class-labels {class_labels}: expected {batch} integer labels")
        cond = torch.from_numpy(labels.astype(np.int64))
    if texts is not None:
        if len(texts) not in (1, batch):
            raise AutotuneError(f"--prompts {prompts}: {len(texts)} prompts for {batch} samples "
                                "(give one prompt, or one per sample)")
        cond = m.encode_prompts(texts)  # once, before the loop; (1, L, D) is broadcast over the batch
    return cond


def _cached_eval(store, model: str, sched, kind: str, size: int):
    """(metrics, eval-set id) of a stored evaluation, found through the model memo, or None."""
    from autotune.cache.store import EvalKey
    from autotune.evaluate.ids import DEFAULT_SIZE, METRIC_VERSION, eval_set_id, model_memo_key
    from autotune.evaluate.ids import ref_steps_for, ref_version

    if kind not in DEFAULT_SIZE:
        return None  # the full path reports the bad --set
    # caches written before the memo table kept the memo among the search states
    memo = store.get_model_memo(model_memo_key(model)) or store.get_search_state(model_memo_key(model))
    if memo is None:
        return None
    set_id = eval_set_id(kind, 0, size or DEFAULT_SIZE[kind], memo["sample_shape"], memo["num_classes"])
    version = ref_version(sched.guidance, ref_steps_for(sched.nfe))  # the Evaluator's rule (Evaluator.key)
    key = EvalKey(memo["fingerprint"], f"{set_id}/{version}", sched.hash(), METRIC_VERSION)
    found = store.get_evaluation(key)
    return None if found is None else ({**found, "cached": True}, set_id)


def _parse_nfes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AutotuneError(f"--nfe: expected comma-separated integers like 4,5,6,8,10, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > MAX_NFE:
        raise InputError(f"--nfe: expected integers in 1..{MAX_NFE}, got {text!r}")
    return values


@app.command("eval")
@_one_line_errors
def eval_cmd(
    model: str = typer.Option(..., "--model", help="diffusers pipeline directory or built-in model name"),
    schedule: Path = typer.Option(..., "--schedule", help="schedule file"),
    eval_set: str = typer.Option("report", "--set", help="report (final figures) or search (what searches see)"),
    size: int = typer.Option(0, "--size", min=0, max=MAX_BATCH, help="evaluation-set size (0: the default of the set)"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as one JSON object"),
    cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the cache"),
) -> None:
    """Score a schedule file on MODEL: mse_ref against the reference ODE solution, trajectory error, NFE, time."""
    from autotune.evaluate.ids import DATA_DRAWS, PER_SAMPLE, metrics_json
    from autotune.space.fileformat import load

    sched = load(schedule)
    store = open_store_option(cache, no_cache)
    found = _cached_eval(store, model, sched, eval_set, size) if store is not None else None
    if found is not None:  # answered from the cache without importing torch or loading the model
        metrics, set_id = found
    else:
        from autotune.evaluate.cpus import fit_threads_to_free_cpus
        from autotune.evaluate.evaluator import Evaluator
        from autotune.models.registry import load_model
        from autotune.progress_cli import step

        with step(f"loading {model}"):
            m = load_model(model)
        sched.check_units(m.units)
        check_guidance_applies(m, sched.guidance, model)
        evaluator = Evaluator(m, eval_set, size=size, store=store, model_spec=model)
        fit_threads_to_free_cpus()
        with step(f"scoring the schedule, {evaluator.eval_set.kind} set") as progress:
            evaluator.progress = progress  # the set's reference, solved first unless cached
            metrics, set_id = evaluator.evaluate(sched), evaluator.eval_set.id
    if as_json:
        shown = {k: v for k, v in metrics.items() if k not in (PER_SAMPLE, DATA_DRAWS)}  # payloads for pairing
        console.print_json(metrics_json({**shown, "eval_set": set_id}))
        return
    from autotune.tables import metrics_table

    console.print(metrics_table(metrics, f"{sched.name or schedule.name} on {model} ({set_id})"))


@app.command("compare")
@_one_line_errors
def compare_cmd(
    model: str = typer.Option(..., "--model", help="diffusers pipeline directory or built-in model name"),
    nfe: str = typer.Option("4,5,6,8,10", "--nfe", help=f"comma-separated NFE values (each 1..{MAX_NFE})"),
    schedules: list[Path] = typer.Option([], "--schedules", help="schedule files to compare (repeatable)"),
    baselines: str = typer.Option("all", "--baselines", help="'all', 'none' or comma-separated named schedules"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="guidance scale for the named schedules"),
    eval_set: str = typer.Option("report", "--set", help="report or search"),
    size: int = typer.Option(0, "--size", min=0, max=MAX_BATCH, help="evaluation-set size (0: the default of the set)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="text-to-image models: evaluate on these prompts "
                                           "(one per line, cycled over the set); without it, the empty prompt"),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help="folder for compare.csv and compare.json (default compare-MODEL), "
                                            "or a file name ending in .csv or .json: that file, with the other "
                                            "format beside it"),
    cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the cache"),
) -> None:
    """Every named hand-designed schedule and every given schedule, side by side: mse_ref per NFE."""
    import csv
    import dataclasses
    import json

    from autotune.evaluate.cpus import fit_threads_to_free_cpus
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.latent import read_prompts
    from autotune.models.registry import load_model
    from autotune.sampling.named import build, names_for
    from autotune.space.fileformat import load

    from autotune.evaluate.progress import report
    from autotune.progress_cli import step

    nfes = _parse_nfes(nfe)
    check_guidance(guidance)
    csv_path, json_path = _compare_paths(out or Path(f"compare-{Path(model).name}"))
    check_output_file(csv_path, "--out")
    check_output_file(json_path, "--out")
    given = [load(p) for p in schedules]
    with step(f"loading {model}"):
        m = load_model(model)
    for s in given:
        s.check_units(m.units)
        check_guidance_applies(m, s.guidance, model)
    check_guidance_applies(m, guidance, model)
    names = names_for(m.noise) if baselines == "all" else [] if baselines == "none" else [
        b.strip() for b in baselines.split(",") if b.strip()]
    prompt_list = tuple(read_prompts(prompts)) if prompts is not None else ()
    evaluator = Evaluator(m, eval_set, size=size, store=open_store_option(cache, no_cache), prompts=prompt_list,
                          model_spec=model)
    jobs: list[tuple[str, str, object]] = []  # (label, file, schedule)
    for name in names:
        for n in nfes:
            s = build(name, m.noise, n)
            if guidance is not None:
                s = dataclasses.replace(s, guidance=guidance)
            jobs.append((name, "", s))
    labels = [s.name or path.stem for path, s in zip(schedules, given)]
    # files of one search command share its name (s3-nfe5): the rows would not tell them apart, so those get the file
    taken = {label for label, _, _ in jobs}  # the named schedules' rows
    labels = [path.stem if labels.count(label) > 1 or label in taken else label
              for path, label in zip(schedules, labels)]
    jobs += [(label, str(path), s) for path, label, s in zip(schedules, labels, given)]
    rows: list[dict] = []
    what = f"scoring {len(jobs)} schedule{'' if len(jobs) == 1 else 's'}, {evaluator.eval_set.kind} set"
    fit_threads_to_free_cpus()
    with step(what) as progress:
        evaluator.progress = progress  # the set's reference, solved first unless cached
        for label, file, s in jobs:
            rows.append({"schedule": label, "file": file, **evaluator.evaluate(s)})
            report(progress, "schedules", len(rows), len(jobs))
    from autotune.evaluate.metrics import ERROR_FIGURES
    from autotune.tables import compare_tables, data_metric_names

    shown = [{**r, "name": r["schedule"]} for r in rows]
    for table in compare_tables(shown, names, f"{model}, {evaluator.eval_set.id}"):
        console.print(table)
    _print_reference_metrics(evaluator, [s for _, _, s in jobs])
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["schedule", "file", "nfe", *ERROR_FIGURES, *data_metric_names(rows), "traj_err", "diverged",
            "diverged_at", "seconds", "cached", "schedule_hash"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(
        {"model": model, "eval_set": evaluator.eval_set.id, "rows": [{k: r.get(k) for k in keys} for r in rows]},
        indent=1, default=str))
    console.print(f"wrote {csv_path} and {json_path}", highlight=False, soft_wrap=True)


def _print_reference_metrics(evaluator, schedules) -> None:
    """A line per reference the schedules were scored against (its steps differ with the NFE) with that
    reference solution's own distribution metrics; nothing for a model without them."""
    from autotune.tables import reference_metrics_line

    lines = {}
    for s in schedules:
        version = evaluator.reference_version(s.guidance, evaluator.partial_start(s), s.nfe)
        if version not in lines:
            metrics = evaluator.reference_data_metrics(s)
            lines[version] = reference_metrics_line(metrics, evaluator.steps_for(s.nfe), s.guidance) if metrics else ""
    for line in filter(None, lines.values()):
        console.print(line, highlight=False)


def _compare_paths(out: Path) -> tuple[Path, Path]:
    """(csv, json) that `compare --out` names: a name ending in .csv or .json is that file, the other format
    beside it with the same stem (what `--out cmp.csv` asks for); otherwise a folder holding compare.csv and
    compare.json."""
    if out.suffix.lower() in (".csv", ".json") and not out.is_dir():
        return out.with_suffix(".csv"), out.with_suffix(".json")
    if out.exists() and not out.is_dir():
        raise AutotuneError(f"--out {out}: exists and is not a folder (name a folder, or a .csv or .json file)")
    return out / "compare.csv", out / "compare.json"


class _SearchCommand(typer.core.TyperCommand):
    """`autotune search`, whose --method help lists the registered methods. They are looked up only when the
    help is shown: importing the strategies takes seconds that no search should pay before its work."""

    def format_help(self, ctx, formatter) -> None:
        from autotune.search.strategy import method_names

        for param in self.params:
            if param.name == "method":
                param.help = (f"search method: {', '.join(method_names())} (default: {DEFAULT_METHOD}, or "
                              f"{DEFAULT_PARETO_METHOD} with --objectives; the README says what each does)")
        super().format_help(ctx, formatter)


@app.command("search", cls=_SearchCommand)
@_one_line_errors
def search_cmd(
    model: str = typer.Option("digits", "--model", help="diffusers pipeline directory or built-in model name"),
    nfe: str = typer.Option("5", "--nfe", help="model evaluations of the searched schedule: 5, or a range like 4-10 "
                                                f"(at most {MAX_NFE})"),
    method: Optional[str] = typer.Option(None, "--method", help="search method"),
    budget: int = typer.Option(96, "--budget", min=1, max=MAX_ITERATIONS,
                               help="true evaluations to spend (cache hits are free)"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="seed of the search"),
    workers: int = typer.Option(2, "--workers", min=0, help="Ray workers (0: evaluate in this process)"),
    address: Optional[str] = typer.Option(None, "--address", help="join this Ray cluster instead of a local Ray"),
    candidate_timeout: float = typer.Option(0.0, "--candidate-timeout", min=0.0,
                                            help="Ray: seconds a candidate may take before its worker counts as "
                                                 "stalled and is replaced (0: 20x the slowest measured, >= 60 s)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="guidance scale the schedule is tuned for"),
    batch: int = typer.Option(8, "--batch", min=1, max=MAX_BATCH, help="candidates per generation / batch"),
    set_size: int = typer.Option(0, "--set-size", min=0, max=MAX_BATCH,
                                 help="search-set size (0: 128, or 512 for a model that samples cheaply)"),
    cache: Optional[str] = typer.Option(None, "--cache", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help="keep evaluations in memory only (no resume)"),
    refine: Optional[int] = typer.Option(None, "--refine", min=0, max=MAX_ITERATIONS,
                                         help="gradient steps on the winner's time grid, model-time shifts and ratios, "
                                              "and as many again without the shifts when validating "
                                              f"(0: none; default {DEFAULT_REFINE} for an mse_ref search from noise "
                                              "without prompts)"),
    objective: str = typer.Option("mse_ref", "--objective",
                                  help="metric to optimise: mse_ref, traj_err, nfe, latency_ms or a model's metric "
                                       "(minimised; class_acc maximised)"),
    objectives: Optional[str] = typer.Option(
        None, "--objectives", help="several, comma-separated (e.g. mse_ref,nfe or mse_ref,latency_ms): a Pareto search "
                                   "(--method evolution, optuna-nsga2, optuna-tpe, random); the front goes to "
                                   "<out stem>.pareto.json"),
    stage2_budget: int = typer.Option(0, "--stage2-budget", min=0, max=MAX_ITERATIONS,
                                      help="true evaluations for stage 2, skip masks under --latency-budget (0: off)"),
    latency_budget: float = typer.Option(0.8, "--latency-budget", min=0.0,
                                         help="stage 2: latency limit as a fraction of the unpruned schedule's"),
    report_dir: Optional[Path] = typer.Option(None, "--report",
                                              help="also write a report (report.md and plots) to this folder"),
    report_size: int = typer.Option(0, "--report-size", min=0, max=MAX_BATCH,
                                    help="samples of the closing table's report set (0: 1024)"),
    validate: Optional[int] = typer.Option(None, "--validate", min=0, max=MAX_BATCH,
                                           help="choose among the finalists (best trials, refined grids) on a held-out "
                                                "validation set of this many samples (0: keep the search-set best; "
                                                "default 512, or 4096 for a model that samples cheaply)"),
    ratios: Optional[str] = typer.Option(None, "--ratios",
                                         help="fit | cpr:FILE — score every candidate with DC-Solver ratios fitted for "
                                              "it (or predicted by a CPR file) instead of searching them"),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="text-to-image models: evaluate on these prompts (a text file, one per line, cycled "
                                "over every evaluation set); without it, on the empty prompt"),
    strength: Optional[float] = typer.Option(
        None, "--strength", help="image-to-image: search the schedule an img2img pipeline runs at this strength "
                                 "(0 < s < 1), starting below T from the eval set's images noised there"),
    reuse: bool = typer.Option(False, "--reuse", help="stage 2 may also reuse a unit's output cached at an earlier "
                                                       "step (DeepCache), copied or forecast from its last two or "
                                                       "three, not only skip units; with --guidance also the guidance "
                                                       "direction (those steps run the conditional half only)"),
    solvers: Optional[str] = typer.Option(
        None, "--solvers", help="the solvers each step may choose, comma-separated (default: dpm, unip-bh1, "
                                "unip-bh2, ipndm; also dpm-single)"),
    screen: bool = typer.Option(True, "--screen/--no-screen",
                                help="stop a candidate after 32 noises when it is over 3x the best there (an mse_ref "
                                     "search without --ratios)"),
    warm_start: bool = typer.Option(False, "--warm-start/--no-warm-start",
                                    help="also start from the best schedules this model's earlier searches found at "
                                         "NFE within 2 of this one (from the cache)"),
    analytic_first: bool = typer.Option(
        True, "--analytic-first/--no-analytic-first",
        help="also refine the best named schedule whose first step is analytic (no model call at T: one more step "
             "for the same NFE) as a validation finalist; such a schedule cannot replay in a diffusers pipeline"),
    final: str = typer.Option("zero", "--final", help="where every searched schedule ends: 'zero' (onto the data) "
                              "or 'sigma_min' (the model's t_min, as diffusers' final_sigmas_type='sigma_min')"),
    out: Path = typer.Option(..., "--out", help="schedule file to write"),
) -> None:
    """Search the unified space for the schedule with the lowest objective (or a Pareto front) at NFE model
    evaluations; every trial is also an Optuna study in the cache (`optuna-dashboard <cache url>`)."""
    from autotune.search.job import JobConfig, run_search_job

    names = _objective_names(objective, objectives)
    check_output_file(out, "--out")
    check_output_dir(report_dir, "--report")
    check_guidance(guidance)
    config = JobConfig(
        model=model, out=out, nfe=nfe, method=method, budget=budget, seed=seed, objectives=names, workers=workers,
        address=address, candidate_timeout=candidate_timeout, guidance=guidance, batch=batch, set_size=set_size,
        refine=refine, stage2_budget=stage2_budget, latency_budget=latency_budget, validate=validate, ratios=ratios,
        prompts=_read_prompt_file(prompts), strength=strength, report_size=report_size,
        solvers=tuple(x.strip() for x in solvers.split(",")) if solvers else (), reuse=reuse, screen=screen,
        warm_start=warm_start, analytic_first=analytic_first, final=final)
    store = open_store_option(cache, no_cache)
    outcome = run_search_job(config, store, hooks=_search_hooks(names[0]))
    _print_search(outcome)
    if report_dir is not None:
        _write_search_report(outcome, report_dir, store)
    _print_finished(outcome)


def _objective_names(objective: str, objectives: Optional[str]) -> tuple[str, ...]:
    """--objective or --objectives as a tuple of distinct metric names."""
    names = tuple(o.strip() for o in (objectives or objective).split(",") if o.strip())
    if objectives is not None and objective != "mse_ref":
        raise AutotuneError("--objective and --objectives: give one or the other")
    if not names or len(set(names)) != len(names):
        raise AutotuneError(f"--objectives: expected distinct comma-separated metric names, got {objectives!r}")
    return names


def _read_prompt_file(prompts: Optional[Path]) -> tuple[str, ...]:
    if prompts is None:
        return ()
    from autotune.models.latent import read_prompts

    return tuple(read_prompts(prompts))


def _search_hooks(objective: str):
    """The job's steps as progress_cli lines, its search loop as a bar with the best value so far, its notes on
    stderr."""
    from autotune import progress_cli
    from autotune.search.job import JobHooks

    @contextlib.contextmanager
    def search_bar(description: str, budget: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}", style="bold", markup=False), BarColumn(),  # user text: no markup
                   TextColumn("{task.completed}/{task.total} evals"),
                   TextColumn(f"best {objective} " + "{task.fields[best]}", markup=False), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=err_console, transient=False) as progress:
            task = progress.add_task(description, total=budget, best="-")
            # a search with partial scores (s3-mf) counts its budget in whole-set evaluations: show what it spent
            yield lambda p: progress.update(task, completed=p.true_evaluations if p.spent == p.true_evaluations
                                            else round(p.spent, 1), best=f"{p.best_value:.3e}")

    def notify(line: str) -> None:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)

    return JobHooks(step=progress_cli.step, search_progress=search_bar, notify=notify)


def _partial_note(result) -> str:
    """How much of a multi-fidelity search's budget its partial scores took (empty for any other search)."""
    partial = [t for t in result.trials if t.cost is not None]
    if not partial:
        return ""
    return (f", {len(partial)} of them on the first {partial[0].screened} noises only ({result.spent:.1f} whole-set "
            "evaluations in all)")


def _print_search(outcome) -> None:
    """stdout of a search, in the order its stages ran: refinement, finalists, the files, the study, the
    report set's tables."""
    from autotune.search.job import refinement_suffix
    from autotune.tables import finalists_table, pareto_table

    config, result, names = outcome.config, outcome.search, outcome.config.objectives
    if outcome.refinement is not None:
        before, after = outcome.refinement.before, outcome.refinement.after
        console.print(f"refined the grid: search-set mse_ref {before:.3e} -> {after:.3e}"
                      + ("" if after < before else " (kept the unrefined)")
                      + refinement_suffix(outcome.refinement.gave_up_after, outcome.refinement.quasi_newton))
    if outcome.validation is not None:
        v = outcome.validation
        console.print(finalists_table(v.scored, v.chosen, v.search_values, v.set_id))
    console.print(f"wrote {outcome.schedule_path}: best search-set {names[0]} {outcome.best_value:.4e} after "
                  f"{result.true_evaluations} true evaluations ({result.cache_hits} cache hits)"
                  + (f", {result.screened} of them stopped early by the screen" if result.screened else "")
                  + _partial_note(result) + (" (resumed)" if result.resumed else "")
                  + (f"; the search ending at t_min {outcome.t_min_search.true_evaluations} more"
                     if outcome.t_min_search else ""))
    _print_stage2(outcome.stage2, outcome.best, config.latency_budget)
    if outcome.pareto_path is not None:
        console.print(pareto_table(result.front, names))
        console.print(f"wrote {outcome.pareto_path}")
    if outcome.study_url is not None:
        from autotune.search.optuna_record import study_name

        console.print(f"Optuna study {study_name(outcome.search_id)}; browse it with:")
        console.print(f"optuna-dashboard {outcome.study_url}", highlight=False, soft_wrap=True)  # one line, to copy
    from autotune.tables import dist_lines, reference_metrics_line, report_tables, tail_line

    shown = [{**r.metrics, "name": r.name} for r in outcome.ours + outcome.peers]
    title = f"report set {outcome.report_set}, NFE {outcome.best.nfe}"
    for table in report_tables(shown, shown[len(outcome.ours):], title):
        console.print(table)
    peers = shown[len(outcome.ours):]
    for r in shown[:len(outcome.ours)]:
        for line in filter(None, [tail_line(r, peers), *dist_lines(r, peers)]):
            console.print(line, highlight=False, markup=False)  # a schedule name is not markup
    if outcome.reference_metrics:
        steps = outcome.report_evaluator.steps_for(outcome.best.nfe)
        console.print(reference_metrics_line(outcome.reference_metrics, steps, outcome.best.guidance),
                      highlight=False)


def _print_stage2(stage2, best, latency_budget: float) -> None:
    if stage2 and stage2.result is None:
        console.print(f"stage 2: no skip mask met the latency limit {stage2.limit_ms:.2f} ms ({stage2.reason}); "
                      "kept the stage-1 schedule")
    elif stage2:
        t = stage2.best_trial
        console.print(f"stage 2: {sum(len(st.skip) for st in best.steps)} unit calls skipped, "
                      f"{sum(len(st.reuse) for st in best.steps)} reused"
                      f"{f' (forecast, order {best.reuse_order})' if best.reuse_order else ''}, "
                      f"latency {t.latency_ms:.2f} ms, limit {stage2.limit_ms:.2f} ms ({latency_budget:g} x "
                      f"unpruned {stage2.unpruned_ms:.2f} ms)"
                      + (f", timed again {stage2.retimed[t.hash]:.3f} x unpruned" if t.hash in stage2.retimed else "")
                      + f", search-set mse_ref {t.mse_ref:.4e}"
                      + (f", validation {stage2.validation[t.hash]:.4e} (best of {len(stage2.validation)} "
                         "finalists)" if t.hash in stage2.validation else ""))


def _write_search_report(outcome, report_dir: Path, store) -> None:
    """report.md and its plots from the job's trials and report-set rows (with sample images for image models)."""
    from autotune.progress_cli import step
    from autotune.report import is_image_model, sample_images, write_search_report

    config, best = outcome.config, outcome.best
    images = None
    with step(f"writing the report to {report_dir}"):
        if is_image_model(outcome.model):
            peer = min(outcome.peers, key=lambda r: r.metrics["mse_ref"]).schedule
            images = sample_images(outcome.report_evaluator, {"best peer": peer, "searched": best},
                                   reference_guidance=config.guidance)
        path = write_search_report(report_dir, schedule=best, trials=outcome.trial_records(store),
                                   baselines=[{"name": r.name, **r.metrics} for r in outcome.ours + outcome.peers],
                                   title=f"{outcome.method} search on {config.model}, NFE {config.nfe}",
                                   objectives=config.objectives, images=images)
    console.print(f"wrote {path}")


def _print_finished(outcome) -> None:
    from autotune.progress_cli import command_seconds

    loops = "the search loops" if outcome.t_min_search else "the search loop"  # T_MIN_SEARCH: two
    console.print(f"finished in {command_seconds():.1f} s ({loops}: {outcome.search_seconds:.1f} s"
                  + (", over several runs)" if outcome.search.resumed else ")"), highlight=False)


zoo_app = typer.Typer(no_args_is_help=True, help="Train the built-in models (reproduces the shipped weights).")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("train")
@_one_line_errors
def zoo_train_cmd(
    name: str = typer.Argument(..., help="digits (the UNet), digits-flow (the same UNet as a rectified flow), "
                                         "digits-dit (a small DiT as a rectified flow) or digits-classifier"),
    out: Path = typer.Option(Path("zoo-weights"), "--out", help="folder for the weights and the training record"),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED),
    steps: int = typer.Option(1200, "--steps", min=1, max=MAX_ITERATIONS,
                              help="optimiser steps (the shipped digits-dit took 1600)"),
    threads: int = typer.Option(2, "--threads", min=1, max=MAX_THREADS, help="torch threads"),
) -> None:
    """Train a built-in model with the project's own script on data that ships in a package."""
    check_output_dir(out, "--out")
    from autotune.progress_cli import step

    with step("loading torch and the training code"):  # the import is most of the wait before step 1
        from autotune.models import digits_train

    def log(msg: str) -> None:
        err_console.print(msg, highlight=False)

    if name in digits_train.MODELS:
        record = digits_train.train_digits(out, seed=seed, steps=steps, threads=threads, log=log, model_name=name,
                                           argv=["autotune", "zoo", "train", name, "--seed", str(seed),
                                                 "--steps", str(steps), "--threads", str(threads)])
    elif name == "digits-classifier":
        record = digits_train.train_classifier(out, seed=seed, threads=threads, log=log)
    else:
        raise AutotuneError(f"zoo train: unknown model {name!r} ({', '.join(digits_train.MODELS)}, digits-classifier; "
                            "gmm* are analytic)")
    console.print(f"wrote {out}: {json_summary(record)}")


@zoo_app.command("export")
@_one_line_errors
def zoo_export_cmd(
    name: str = typer.Argument(..., help="digits"),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers: a DDPMPipeline directory"),
    out: Path = typer.Option(..., "--out", help="pipeline directory to write"),
) -> None:
    """Write a built-in model as a diffusers pipeline directory that DDPMPipeline.from_pretrained loads."""
    if fmt != "diffusers":
        raise AutotuneError(f"zoo export: --format {fmt!r} is not supported (diffusers)")
    if name != "digits":
        raise AutotuneError(f"zoo export: unknown model {name!r} (digits; gmm* are analytic, without a network)")
    check_output_dir(out, "--out")
    from autotune.progress_cli import step

    with step(f"writing {out}"):  # importing diffusers is most of this wait
        from autotune.models.digits_diffusers import export_diffusers

        export_diffusers(out)
    console.print(f"wrote {out}: DDPMPipeline (unet DigitsUNet2DModel, scheduler DDPMScheduler); load it with "
                  "DigitsDDPMPipeline.from_pretrained (from autotune.models.digits_diffusers)", highlight=False)


def json_summary(record: dict) -> str:
    keys = [k for k in ("steps", "seconds", "wall_seconds", "final_loss", "held_out_accuracy") if k in record]
    return ", ".join(f"{k} {record[k]}" for k in keys) or "done"


from autotune.cache_cli import cache_app  # noqa: E402  (the `cache` sub-commands)

app.add_typer(cache_app, name="cache")

from autotune import compile_cli, dc_cli, report_cli  # noqa: E402  (compile/bench, dc/cpr, report commands)

for _module in (compile_cli, dc_cli, report_cli):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
