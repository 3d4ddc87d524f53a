"""Which clock times a run (evaluate/clock.py), and that the search's latency and the engine bench use it."""

from __future__ import annotations

import time

import pytest
import torch

from autotune.errors import InputError
from autotune.evaluate.clock import CLOCKS, clock_words, module_device, resolve_clock, timed_seconds


def _busy(seconds: float) -> None:
    """Computes for ``seconds`` of wall time (CPU time, on a machine with a free core)."""
    end = time.perf_counter() + seconds
    total = 0
    while time.perf_counter() < end:
        total += 1


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_auto_takes_cpu_time_only_for_one_thread_on_the_cpu():
    assert resolve_clock("auto", "cpu", threads=1) == "cpu"
    assert resolve_clock("auto", "cpu", threads=2) == "wall"  # CPU time would sum the threads
    assert resolve_clock("auto", "cuda", threads=1) == "wall"  # a GPU's work is not this process's CPU time
    assert resolve_clock("auto", torch.device("cuda", 0), threads=1) == "wall"
    for explicit in ("wall", "cpu"):
        assert resolve_clock(explicit, "cuda", threads=4) == explicit
    assert CLOCKS == ("auto", "wall", "cpu") and clock_words("cpu") != clock_words("wall")


def test_auto_reads_torchs_thread_count(one_thread):
    assert resolve_clock("auto") == "cpu"
    torch.set_num_threads(2)
    assert resolve_clock("auto") == "wall"


def test_an_unknown_clock_is_refused_naming_the_choices():
    with pytest.raises(InputError, match="clock 'sundial': one of auto, wall, cpu"):
        resolve_clock("sundial")
    with pytest.raises(InputError, match="resolve it first"):
        timed_seconds(lambda: None, "auto")


def test_cpu_time_leaves_out_waiting_and_keeps_computing():
    """What the CPU clock is for: time the process waits (here a sleep, on a loaded machine the other processes'
    turns on the core) is not counted; its own computing is."""
    assert timed_seconds(lambda: time.sleep(0.3), "wall") >= 0.3
    assert timed_seconds(lambda: time.sleep(0.3), "cpu") < 0.1
    assert timed_seconds(lambda: _busy(0.3), "cpu") > 0.05


def test_module_device_is_the_first_parameters():
    assert module_device(torch.nn.Linear(2, 2)).type == "cpu"
    assert module_device(object()).type == "cpu"  # no parameters: an analytic model runs on the CPU

    class Wrapped:
        module = torch.nn.Linear(2, 2)

    assert module_device(Wrapped()).type == "cpu"


def test_the_search_latency_runs_on_its_specs_clock(monkeypatch, one_thread):
    """measure_latency: a sampler that only waits measures ~0 on the CPU clock and its wait on the wall clock;
    ``auto`` at one thread on the CPU is the CPU clock."""
    from autotune.evaluate.sets import eval_set_for
    from autotune.models.registry import load_model
    from autotune.sampling.named import build
    from autotune.search import latency

    model = load_model("gmm64")
    schedule = build("ddim", model.noise, 2)
    eval_set = eval_set_for(model, "search", 8)
    monkeypatch.setattr(latency, "sample", lambda *a, **k: time.sleep(0.1))
    wall = latency.measure_latency(model, schedule, eval_set, latency.LatencySpec(batch=2, repeats=2, clock="wall"))
    cpu = latency.measure_latency(model, schedule, eval_set, latency.LatencySpec(batch=2, repeats=2, clock="cpu"))
    auto = latency.measure_latency(model, schedule, eval_set, latency.LatencySpec(batch=2, repeats=2))
    assert wall >= 100 and cpu < 50 and auto < 50


def test_the_engine_bench_times_every_way_on_one_clock(digits, one_thread):
    from autotune.compile.timing import bench, bench_clock
    from autotune.sampling.named import build

    schedule = build("ddim", digits.noise, 2)
    assert bench_clock(digits, ["eager", "onnxruntime"], "cpu", 1) == "cpu"
    assert bench_clock(digits, ["eager", "onnxruntime"], "cpu", 2) == "wall"
    assert bench_clock(digits, ["eager", "onnxruntime"], "cuda", 1) == "wall"
    assert bench_clock(digits, ["eager", "tensorrt"], "cpu", 1) == "wall"
    assert bench_clock(digits, ["eager"], "cpu", 1, clock="wall") == "wall"
    rows = bench(digits, schedule, ["eager", "baked"], [1], repeats=1, threads=1)
    assert [r.clock for r in rows] == ["cpu", "cpu"] and all(r.seconds > 0 for r in rows)
    rows = bench(digits, schedule, ["eager"], [1], repeats=1, threads=1, clock="wall")
    assert rows[0].clock == "wall"


def test_autotune_bench_refuses_an_unknown_clock_before_loading(tmp_path):
    from typer.testing import CliRunner

    from autotune.cli import app
    from autotune.models.registry import load_model
    from autotune.sampling.named import build
    from autotune.space.fileformat import save

    path = save(build("ddim", load_model("gmm64").noise, 2), tmp_path / "s.json")
    res = CliRunner().invoke(app, ["bench", "--model", "digits", "--schedule", str(path), "--clock", "sundial"])
    assert res.exit_code == 2 and "clock 'sundial': one of auto, wall, cpu" in res.output
    assert "loading" not in res.output


def test_the_reuse_bench_times_its_rows_on_the_clock_given():
    from bench_scripts import load_bench

    reuse = load_bench("reuse")
    wait = [lambda: time.sleep(0.05)]
    assert reuse.interleaved_ms(wait, 1, clock="wall")[0] >= 50
    assert reuse.interleaved_ms(wait, 1, clock="cpu")[0] < 25
