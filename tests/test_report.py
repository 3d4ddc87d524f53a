"""Reports: `autotune report search|compare` render markdown with tables and the PNG plots it embeds."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("matplotlib")

from autotune.cache.store import open_store  # noqa: E402
from autotune.cli import app  # noqa: E402
from autotune.evaluate.evaluator import Evaluator  # noqa: E402
from autotune.report import (  # noqa: E402
    ReportError,
    peer_nfe_to_match,
    plot_schedule,
    write_search_report,
)
from autotune.sampling.named import build  # noqa: E402
from autotune.space.fileformat import dumps, save  # noqa: E402
from autotune.space.schedule import Schedule, Step  # noqa: E402

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _embedded_pngs(md_path):
    """The PNG files report.md embeds; each must exist and be a real, non-trivial PNG."""
    names = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md_path.read_text())
    for name in names:
        data = (md_path.parent / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    return names


def _fake_search(store, sid, gmm, objectives=("mse_ref",), n=12):
    """Trials as the search runner stores them (the shared contract), from real evaluations on gmm2d."""
    evaluator = Evaluator(gmm, "search", size=32, store=store)
    names = ["ddim", "dpmsolver++2m", "unipc-bh2-o3", "ipndm"]
    best = None
    for i in range(n):
        s = build(names[i % 4], gmm.noise, 3 + i % 3)
        m = evaluator.evaluate(s)
        value = math.inf if i == 5 else m["mse_ref"]  # one diverged trial, drawn on the top edge
        metrics = {"value": value, "mse_ref": m["mse_ref"], "nfe": s.nfe, "cached": m["cached"],
                   "schedule": dumps(s), "method": "random", "elapsed": 0.1 * i}
        if len(objectives) > 1:
            metrics["objectives"] = {"mse_ref": value, "nfe": float(s.nfe)}
        store.add_trial(sid, i, s.hash(), metrics)
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, s)
    return dataclasses.replace(best[1], name="random-nfe5", metadata={
        "search_id": sid, "method": "random", "model": "gmm2d", "nfe": best[1].nfe, "objectives": list(objectives)})


@pytest.mark.parametrize("objectives", [("mse_ref",), ("mse_ref", "nfe")])
def test_report_search_cli(gmm, tmp_path, objectives):
    cache = tmp_path / "cache.sqlite"
    store = open_store(cache)
    searched = _fake_search(store, "sid-" + "-".join(objectives), gmm, objectives)
    path = save(searched, tmp_path / "searched.json")
    out = tmp_path / "report"
    result = _run("report", "search", "--schedule", path, "--cache", cache, "--out", out, "--nfe", "3,4,5",
                  "--size", 32)
    assert result.exit_code == 0, result.output
    md = out / "report.md"
    text = md.read_text()
    pngs = _embedded_pngs(md)
    expected = {"error_vs_nfe.png", "progress.png", "schedule.png"} | ({"pareto.png"} if len(objectives) > 1 else set())
    assert set(pngs) == expected  # gmm2d is not an image model: no sample grids
    assert f"| search_id | sid-{'-'.join(objectives)} |" in text and "| trials | 12 |" in text
    assert "| diverged trials | 1 |" in text
    # every named baseline at every NFE asked for, the searched schedule at its own
    for name in ("ddim", "dpmsolver++3m", "unipc-bh1-o2", "ipndm"):
        assert re.search(rf"^\| {re.escape(name)} \|( [^|]+ \|){{3}}$", text, re.M), name
    assert "NFE each named schedule needs to match random-nfe5" in text
    if len(objectives) > 1:
        assert "## Pareto front" in text and "| trial | schedule hash | mse_ref | nfe |" in text


def test_report_search_errors(gmm, tmp_path):
    cache = tmp_path / "cache.sqlite"
    plain = save(build("ddim", gmm.noise, 4), tmp_path / "plain.json")
    result = _run("report", "search", "--schedule", plain, "--cache", cache, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "no metadata.search_id" in result.output
    orphan = save(dataclasses.replace(build("ddim", gmm.noise, 4), metadata={"search_id": "nope", "model": "gmm2d"}),
                  tmp_path / "orphan.json")
    result = _run("report", "search", "--schedule", orphan, "--cache", cache, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "no trials of search nope" in result.output
    with pytest.raises(ReportError, match="no trials"):
        write_search_report(tmp_path, schedule=build("ddim", gmm.noise, 4), trials=[], baselines=[{}], title="x")


def test_report_compare_cli(tmp_path):
    """Named baselines at every NFE plus two given schedules, each with its time-grid plot."""
    from autotune.models.registry import load_model

    noise = load_model("gmm2d").noise
    a = save(dataclasses.replace(build("unipc-bh2-o3", noise, 5), name="mine"), tmp_path / "a.json")
    steps = (Step(0.7), Step(0.4, order=2, corrector="bh2", corrector_order=2),
             Step(0.2, order=3, ratio=0.95, skip=()), Step(0.0))
    b = save(Schedule(1.0, steps, name="odd"), tmp_path / "b.json")
    out = tmp_path / "cmp"
    result = _run("report", "compare", "--model", "gmm2d", "--schedules", f"{a},{b}", "--nfe", "4,5,6",
                  "--size", 32, "--out", out, "--no-cache")
    assert result.exit_code == 0, result.output
    md = out / "report.md"
    assert set(_embedded_pngs(md)) == {"error_vs_nfe.png", "schedule-mine.png", "schedule-odd.png"}
    text = md.read_text()
    assert "| schedule | NFE 4 | NFE 5 | NFE 6 |" in text and "## mine" in text and "## odd" in text
    assert text.count("**") >= 6  # the best value of each NFE column is in bold
    # the distribution metrics against the best named schedule, each with the paired interval of the report set
    assert re.search(r"SWD: mine \S+ vs \S+ \S+, the best named \(lower is better\): (worse|better) by \S+; "
                     r"paired 95% CI of how much worse \[\S+, \S+\]: (worse|better|not decided)", text), text


def test_report_compare_errors(tmp_path):
    result = _run("report", "compare", "--model", "gmm2d", "--baselines", "nope", "--out", tmp_path)
    assert result.exit_code == 2 and "--baselines: unknown schedule 'nope'" in result.output
    result = _run("report", "compare", "--model", "gmm2d", "--nfe", "4,x", "--out", tmp_path)
    assert result.exit_code == 2 and "--nfe" in result.output


def test_search_report_with_images(gmm, tmp_path):
    """Image models get a side-by-side sample grid; the library call works without the CLI."""
    store = open_store(":memory:")
    searched = _fake_search(store, "img", gmm, n=4)
    rows = [{"name": searched.name, "nfe": searched.nfe, "mse_ref": 0.01},
            {"name": "ddim", "nfe": searched.nfe, "mse_ref": 0.1}]
    g = torch.Generator().manual_seed(0)
    images = {"reference": torch.rand(4, 1, 8, 8, generator=g) * 2 - 1,
              "best peer": torch.rand(4, 3, 8, 8, generator=g) * 2 - 1,
              "searched": np.zeros((10, 10, 3), dtype=np.uint8)}
    path = write_search_report(tmp_path, schedule=searched, trials=store.trials("img"), baselines=rows,
                               title="t", images=images)
    assert "samples.png" in _embedded_pngs(path)
    assert "**10.00x better**" in path.read_text()


def test_peer_nfe_to_match():
    rows = [{"name": "a", "nfe": n, "mse_ref": v} for n, v in ((4, 1.0), (6, 0.3), (8, 0.05))]
    rows += [{"name": "ours", "nfe": 4, "mse_ref": 0.2}, {"name": "b", "nfe": 4, "mse_ref": 0.5}]
    assert peer_nfe_to_match(rows, "ours", 4, 0.2) == [("a", "8"), ("b", "> 4")]


def test_schedule_plot_draws_every_decision(tmp_path):
    """The schedule plot carries a marker per step and the ratio axis only when a ratio is not 1."""
    from matplotlib.image import imread

    steps = (Step(0.8), Step(0.5, order=2, solver="unip-bh2", corrector="bh2", corrector_order=2),
             Step(0.3, order=3, ratio=1.1, skip=("mid",)), Step(0.1, order=4, solver="ipndm", prediction="noise"))
    plain = plot_schedule(Schedule(1.0, steps[:2] + (Step(0.3, order=3), steps[3]), final_denoise=True),
                          tmp_path / "plain.png")
    fancy = plot_schedule(Schedule(1.0, steps, final_denoise=True), tmp_path / "fancy.png")
    a, b = imread(plain), imread(fancy)
    assert a.shape == b.shape and np.abs(a - b).max() > 0.5  # the ratio axis and skip label are drawn


def test_schedule_table_shows_shifts_and_data_scales_only_where_a_step_has_one():
    from autotune.report import schedule_table
    from autotune.sampling.noise import VPLinear

    plain = build("unipc-bh2-o2", VPLinear(), 4)
    header = schedule_table(plain).splitlines()[0]
    assert "shift" not in header and "data scale" not in header
    steps = list(plain.steps)
    steps[2] = dataclasses.replace(steps[2], data_scale=0.97)
    table = schedule_table(plain.with_steps(steps)).splitlines()
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    assert "data scale" in columns and "shift" not in columns
    at = columns.index("data scale")
    assert [row.strip("|").split("|")[at].strip() for row in table[2:6]] == ["1", "1", "0.97", "1"]
