"""The CLI's manners (issue 14): help and version, positional MODEL, compare --out, file errors, progress
events from the library, the dashboard line, exported weights' mode, a quiet pipeline load."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import typer
from typer.testing import CliRunner

import autotune
from autotune.cli import app

runner = CliRunner()


def _run(*args, **env):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "80", **env})


def _command_paths(command, path: tuple[str, ...] = ()):
    """Every command of the app, as the argument path that reaches it."""
    yield path
    if hasattr(command, "commands"):  # a group (typer's, which is not click.Group)
        for name, sub in command.commands.items():
            yield from _command_paths(sub, (*path, name))


# -- help, version, metavars ---------------------------------------------------------------------------------


def test_short_help_everywhere():
    for args in (["-h"], ["models", "-h"], ["cache", "stats", "-h"], ["zoo", "export", "-h"]):
        result = _run(*args)
        assert result.exit_code == 0, (args, result.output)
        assert "Usage:" in result.output and "Show this message and exit" in result.output


def test_version_prints_the_package_version():
    result = _run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"autotune {autotune.__version__}"


def test_no_command_shows_a_bool_type():
    """Flags (--no-cache, --json, --yes, --help itself) take no value: no `<bool>` in any help page."""
    paths = list(_command_paths(typer.main.get_command(app)))
    assert len(paths) > 15
    for path in paths:
        result = _run(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, path


def test_method_help_lists_the_registered_methods():
    from autotune.search.strategy import method_names

    result = runner.invoke(app, ["search", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    line = next(ln for ln in result.output.splitlines() if "--method" in ln)
    for name in method_names():
        assert name in line, name
    assert "see `autotune search --help`" not in result.output  # the old help pointed at its own page


def test_models_takes_the_model_as_an_argument():
    result = _run("models", "gmm2d")
    assert result.exit_code == 0, result.output
    assert "gmm2d" in result.output and "gmm64" not in result.output  # one model described, not the list
    same = _run("models", "--model", "gmm2d")
    assert same.exit_code == 0 and same.output == result.output
    both = _run("models", "gmm2d", "--model", "gmm64")
    assert both.exit_code == 2 and both.stderr.startswith("error:") and "\n" not in both.stderr.strip()


def test_file_errors_name_the_file_plainly(tmp_path):
    missing, garbage = tmp_path / "missing.json", tmp_path / "garbage.json"
    garbage.write_text("{")
    for path, what in ((missing, "cannot read"), (garbage, "not valid JSON")):
        result = runner.invoke(app, ["eval", "--model", "gmm2d", "--schedule", str(path), "--no-cache"],
                               env={"COLUMNS": "300"})
        assert result.exit_code == 2
        assert result.stderr.startswith(f"error: {path}: {what}"), result.stderr
        assert "(file)" not in result.stderr


# -- compare --out -------------------------------------------------------------------------------------------

COMPARE = ("compare", "--model", "gmm2d", "--nfe", "3", "--baselines", "ddim", "--size", "16", "--no-cache")


def test_compare_out_csv_name_is_the_csv_file(tmp_path):
    result = _run(*COMPARE, "--out", tmp_path / "cmp.csv")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp.csv").is_file()
    assert (tmp_path / "cmp.csv").read_text().splitlines()[0].startswith("schedule,file,nfe")
    assert json.loads((tmp_path / "cmp.json").read_text())["rows"][0]["schedule"] == "ddim"
    # gmm2d has distribution metrics: the reference solution's own are printed beside the table (NFE 3: the
    # few-step reference of 40 steps)
    assert re.search(r"reference solution \(the ODE solved in 40 steps\): NLL gap \d.*SWD \d",
                     " ".join(result.output.split()))


def test_compare_names_files_of_one_name_by_their_file(tmp_path):
    """Two files of one search command (both named s3-nfe3) and one named like a baseline: each row says which
    file it is; a file whose name is its own keeps it."""
    import dataclasses

    from autotune.models.registry import load_model
    from autotune.sampling.named import build
    from autotune.space.fileformat import save

    noise = load_model("gmm2d").noise
    paths = []
    for stem, name, base in (("seed0", "s3-nfe3", "ddim"), ("seed1", "s3-nfe3", "dpmsolver++2m"),
                             ("mine", "ddim", "unipc-bh2-o2"), ("other", "my-grid", "dpmsolver++3m")):
        paths.append(save(dataclasses.replace(build(base, noise, 3), name=name), tmp_path / f"{stem}.json"))
    result = _run(*COMPARE, *[a for p in paths for a in ("--schedules", p)], "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r["schedule"] for r in rows] == ["ddim", "seed0", "seed1", "mine", "my-grid"]


def test_compare_gives_a_schedule_its_distribution_metrics_paired_intervals(tmp_path):
    """A schedule that is not a named one gets a line per distribution metric against the best named schedule:
    the figures, better or worse, and the paired 95 % interval of how much worse from both rows' bootstrap draws
    on the same resamples (report sets carry them); the named rows get none."""
    import dataclasses

    from autotune.models.registry import load_model
    from autotune.sampling.named import build
    from autotune.space.fileformat import save

    noise = load_model("gmm2d").noise
    mine = save(dataclasses.replace(build("unipc-bh2-o2", noise, 3), name="mine"), tmp_path / "mine.json")
    result = _run("compare", "--model", "gmm2d", "--nfe", "3", "--baselines", "ddim", "--size", "64", "--no-cache",
                  "--schedules", mine, "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for label in ("NLL gap", "SWD"):
        found = re.search(label + r": mine (\S+) vs ddim (\S+), the best named \(lower is better\): "
                          r"(worse|better) by \S+; paired 95% CI of how much worse \[(\S+), (\S+)\]: "
                          r"(worse|better|not decided by these 64 noises \(--size\))", text)
        assert found, (label, text)
        low, high, verdict = float(found[4]), float(found[5]), found[6]
        assert low <= high
        assert verdict == ("worse" if low > 0 else "better" if high < 0 else found[6])
        assert found[3] == ("worse" if float(found[1]) > float(found[2]) else "better")
    assert "SWD: ddim" not in text  # the named schedule is the yardstick, not a line of its own


def test_compare_out_folder_holds_both_files(tmp_path):
    result = _run(*COMPARE, "--out", tmp_path / "results")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results" / "compare.csv").is_file() and (tmp_path / "results" / "compare.json").is_file()


def test_compare_out_an_existing_file_is_one_error(tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    result = _run(*COMPARE, "--out", taken)
    assert result.exit_code == 2 and result.stderr.startswith("error: --out") and "\n" not in result.stderr.strip()
    assert taken.read_text() == "mine"


# -- progress events -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gmm():
    from autotune.models.registry import load_model

    return load_model("gmm2d", torch.float64)


def _assert_counts_up(events, task):
    mine = [e for e in events if e.task == task]
    assert mine, f"no {task!r} events in {sorted({e.task for e in events})}"
    done = [e.done for e in mine]
    assert done == sorted(done) and done[0] == 0 and done[-1] == mine[-1].total > 0
    return mine


def test_reference_reports_every_step(gmm):
    from autotune.evaluate.reference import compute_reference
    from autotune.evaluate.sets import eval_set_for

    events = []
    compute_reference(gmm, eval_set_for(gmm, "search", 8), steps=10, progress=events.append)
    mine = _assert_counts_up(events, "reference, search set")
    assert len(mine) >= 10 + 15  # both solvers, step by step


def test_evaluator_reports_its_reference_once(gmm):
    from autotune.evaluate.evaluator import Evaluator
    from autotune.sampling.named import build

    events = []
    ev = Evaluator(gmm, "report", size=8, ref_steps=10)
    ev.progress = events.append
    ev.evaluate(build("ddim", gmm.noise, 4))
    _assert_counts_up(events, "reference, report set")
    before = len(events)
    ev.evaluate(build("ipndm", gmm.noise, 4))  # the reference is known now: nothing long to report
    assert len(events) == before


def test_validation_reports_each_finalist(gmm):
    from autotune.evaluate.evaluator import Evaluator
    from autotune.sampling.named import build
    from autotune.search.validate import pick_on_validation

    events = []
    held_out = Evaluator(gmm, "validation", size=8, ref_steps=10)
    candidates = [(n, build(n, gmm.noise, 4)) for n in ("ddim", "ipndm", "dpmsolver++2m")]
    pick_on_validation(held_out, candidates, progress=events.append)
    assert [(e.done, e.total) for e in events] == [(0, 3), (1, 3), (2, 3), (3, 3)]


@pytest.fixture
def recorded_steps(monkeypatch):
    """The steps a command shows, each with the events the library sent it: {description: [events]}."""
    import contextlib

    import autotune.progress_cli as progress_cli

    seen: dict[str, list] = {}

    @contextlib.contextmanager
    def recording_step(description):
        seen[description] = []
        yield seen[description].append

    monkeypatch.setattr(progress_cli, "step", recording_step)
    return seen


def test_compare_hands_the_library_events_to_its_step(tmp_path, recorded_steps):
    """The CLI side: `compare` shows its steps, and the reference's events reach the step that draws them."""
    result = _run(*COMPARE, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "loading gmm2d" in recorded_steps
    scoring = next(events for d, events in recorded_steps.items() if d.startswith("scoring 1 schedule,"))
    _assert_counts_up(scoring, "reference, report set")
    assert [(e.done, e.total) for e in scoring if e.task == "schedules"] == [(1, 1)]


@pytest.mark.parametrize("command", ["eval", "report compare"])
def test_eval_and_report_show_their_reference(tmp_path, recorded_steps, command):
    from autotune.models.registry import load_model
    from autotune.sampling.named import build
    from autotune.space.fileformat import save

    if command == "report compare":
        pytest.importorskip("matplotlib")
    schedule = tmp_path / "ddim.json"
    save(build("ddim", load_model("gmm2d").noise, 3), schedule)
    args = {"eval": ["eval", "--schedule", schedule],
            "report compare": ["report", "compare", "--schedules", schedule, "--baselines", "none",
                               "--out", tmp_path / "r"]}[command]
    result = _run(*args, "--model", "gmm2d", "--size", "16", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "loading gmm2d" in recorded_steps
    _assert_counts_up([e for events in recorded_steps.values() for e in events], "reference, report set")


def test_a_failing_step_leaves_only_the_error_line(tmp_path):
    result = _run("compare", "--model", tmp_path / "no-such-model", "--nfe", "3", "--no-cache")
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "\n" not in result.stderr.strip(), result.stderr


# -- the end of a search: the dashboard line -----------------------------------------------------------------


def test_dashboard_command_is_one_unbroken_line(tmp_path):
    folder = tmp_path / ("a-folder-with-a-long-name-" * 3)
    folder.mkdir()
    cache = folder / "cache.sqlite"
    result = _run("search", "--model", "gmm2d", "--nfe", "3", "--budget", "2", "--batch", "2", "--workers", "0",
                  "--validate", "0", "--set-size", "16", "--cache", cache, "--out", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    command = f"optuna-dashboard sqlite:///{cache}"
    assert len(command) > 80  # would wrap at 80 columns
    assert command in result.stdout.splitlines()
    assert any(ln.startswith("finished in ") for ln in result.stdout.splitlines())


def test_a_long_step_line_folds_and_keeps_its_time_in_80_columns():
    """A step's description too long for an 80-column terminal goes on a second line, whole; its bar, percentage
    and elapsed time stay (rich alone keeps the description on one line and cuts the time)."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from autotune.progress_cli import _columns

    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    progress = Progress(*_columns(), console=console, auto_refresh=False)
    long = "polishing validation's choice: refined from dpmsolver++3m+afs (L-BFGS, gave up after 20 steps)"
    progress.add_task(long, total=None)
    progress.update(progress.add_task("  reference solution, 2048 samples", total=200), completed=74)
    console.print(progress.get_renderable())
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in out.getvalue()
    assert " ".join(w for line in lines for w in line.split()).count("0:00:00") == 2  # both elapsed times
    assert "37%" in out.getvalue() and " ".join(out.getvalue().split()).find(long.split()[-1]) > 0
    words = [w for line in lines for w in line.split() if w.isascii() and not w.startswith("0:00")]
    assert " ".join(words).startswith(long)  # the description, whole, folded


def test_finished_in_counts_the_command_not_what_its_process_ran_before(tmp_path):
    """A shell that runs `install && autotune ...` may exec autotune in its own process (bash -c, a Dockerfile's
    RUN): the process then started when the install did, and "finished in" must not count the install."""
    code = "from autotune.progress_cli import command_seconds; print(command_seconds())"
    out = subprocess.run(["bash", "-c", f"sleep 3 && exec {sys.executable} -c '{code}'"], capture_output=True,
                         text=True, check=True, cwd=tmp_path)
    assert 0.0 < float(out.stdout) < 2.5, out.stdout  # the 3 s the shell slept are not the command's


# -- diffusers export and load -------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_exported_weights_follow_the_umask(tmp_path, mask):
    pytest.importorskip("diffusers")
    from autotune.models.digits_diffusers import export_diffusers

    old = os.umask(mask)
    try:
        out = export_diffusers(tmp_path / "pipe")
    finally:
        os.umask(old)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert oct(weights.stat().st_mode & 0o777) == oct(0o666 & ~mask)
    assert (weights.stat().st_mode & 0o777) == ((out / "unet" / "config.json").stat().st_mode & 0o777)


def test_loading_the_exported_pipeline_is_quiet(tmp_path):
    """DigitsDDPMPipeline loads without diffusers' warnings; plain DDPMPipeline, for contrast, still warns
    (which shows the check can see them)."""
    pytest.importorskip("diffusers")
    from autotune.models.digits_diffusers import export_diffusers

    export_diffusers(tmp_path / "pipe")
    code = textwrap.dedent("""
        import sys
        from diffusers import DDPMPipeline
        from autotune.models.digits_diffusers import DigitsDDPMPipeline, DigitsUNet2DModel
        pipe = DigitsDDPMPipeline.from_pretrained("pipe")
        assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.unet, DigitsUNet2DModel)
        print("--- plain DDPMPipeline ---", file=sys.stderr, flush=True)
        DDPMPipeline.from_pretrained("pipe")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, plain = proc.stderr.split("--- plain DDPMPipeline ---")
    for warning in ("accelerate", "Expected types"):
        assert warning not in ours, ours
    assert "Expected types" in plain
