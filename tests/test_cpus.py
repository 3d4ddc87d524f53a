"""Torch threads for the CPUs other processes leave free (evaluate/cpus.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from autotune.evaluate import cpus

STAT = """cpu  900 0 300 5000 100 0 0 0 0 0
cpu0 400 0 100 2000 50 0 0 0 0 0
cpu1 300 0 100 2500 30 10 5 0 0 0
cpu2 200 0 100 500 20 0 0 0 0 0
intr 12345
"""


SPIN = "import time\nend = time.time() + 30\nwhile time.time() < end: pass"


@pytest.fixture
def threads_kept():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_ticks_are_those_of_the_cpus_this_process_may_run_on(tmp_path):
    path = tmp_path / "stat"
    path.write_text(STAT)
    # busy = all but idle and iowait; the aggregate line and the CPUs outside the set are not read
    assert cpus.cpu_ticks(frozenset({0, 1}), str(path)) == (500 + 415, 2550 + 2945)
    assert cpus.cpu_ticks(frozenset({2}), str(path)) == (300, 820)
    assert cpus.cpu_ticks(frozenset({7}), str(path)) is None
    assert cpus.cpu_ticks(frozenset({0}), str(tmp_path / "missing")) is None


def test_busy_cpus_of_others_take_out_this_process_own_time():
    # 2 CPUs, 40 ticks between the readings, 30 of them busy: 1.5 CPUs busy, 0.5 of them this process's
    assert cpus.busy_cpus_of_others((100, 1000), (130, 1040), 0.1, 0.2, 2) == pytest.approx(1.0)
    assert cpus.busy_cpus_of_others((100, 1000), (130, 1040), 0.5, 0.2, 2) == 0.0  # never below 0
    assert cpus.busy_cpus_of_others((100, 1000), (100, 1000), 0.0, 0.2, 2) is None  # no tick passed


@pytest.mark.parametrize("others, usable, ceiling, threads", [
    (0.0, 2, 2, 2), (0.3, 2, 2, 2), (0.97, 2, 2, 1), (1.9, 2, 2, 1), (0.0, 16, 8, 8), (3.4, 16, 16, 13),
])
def test_threads_are_the_free_cpus_at_least_one_never_over_the_ceiling(others, usable, ceiling, threads):
    assert cpus.threads_for(others, usable, ceiling) == threads


def test_fitting_lowers_the_threads_under_load_and_raises_them_back_to_the_ceiling(monkeypatch, threads_kept):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    load = iter([3.0, 0.0, None, 0.0, 2.0])
    monkeypatch.setattr(cpus, "other_processes_cpus", lambda cpu_set, window_s=0.0: next(load))
    torch.set_num_threads(2)  # the ceiling: 2 of the 4 CPUs
    assert cpus.fit_threads_to_free_cpus() == 1 and torch.get_num_threads() == 1
    assert cpus.fit_threads_to_free_cpus() == 2 and torch.get_num_threads() == 2
    assert cpus.fit_threads_to_free_cpus() is None and torch.get_num_threads() == 2  # unreadable: unchanged
    torch.set_num_threads(3)  # the user's count is the new ceiling
    assert cpus.fit_threads_to_free_cpus() == 3 and torch.get_num_threads() == 3
    assert cpus.fit_threads_to_free_cpus() == 2 and torch.get_num_threads() == 2


@pytest.mark.skipif(not os.path.exists(cpus.STAT) or not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_a_process_spinning_beside_this_one_counts_as_a_busy_cpu():
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(0.3)  # the interpreter started
        others = cpus.other_processes_cpus(frozenset(os.sched_getaffinity(0)), window_s=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    # at least most of one CPU (other tests may run beside it, never this process's own waiting)
    assert others is not None and others >= 0.7


@pytest.mark.parametrize("command", [
    ["compare", "--model", "gmm2d", "--nfe", "4", "--baselines", "ddim", "--size", "16", "--no-cache"],
    ["eval", "--model", "gmm2d", "--schedule", "{schedule}", "--size", "16", "--no-cache"],
])
def test_the_cli_scoring_in_its_own_process_fits_the_threads_first(tmp_path, monkeypatch, command):
    from typer.testing import CliRunner

    from autotune.cli import app

    schedule = tmp_path / "ddim.json"
    assert CliRunner().invoke(app, ["baseline", "ddim", "--model", "gmm2d", "--nfe", "4", "--out",
                                    str(schedule)]).exit_code == 0
    calls: list[int] = []
    monkeypatch.setattr(cpus, "fit_threads_to_free_cpus", lambda: calls.append(1))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [a.format(schedule=schedule) for a in command])
    assert result.exit_code == 0, result.output
    assert calls == [1]
