"""The CLI: errors are one line with exit code 2, never a traceback; files written are loadable."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from autotune.cli import app
from autotune.space.fileformat import load

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = result.output.strip()
    assert text.startswith("error:") and "\n" not in text and "Traceback" not in text, text
    for n in needles:
        assert n in text, text


@pytest.fixture(scope="module")
def baseline_file(pipeline_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "s.json"
    result = _run("baseline", "dpmsolver++2m", "--model", pipeline_dirs["epsilon"], "--nfe", 5, "--out", path)
    assert result.exit_code == 0, result.output
    return path


def test_baseline_writes_loadable_file(baseline_file):
    s = load(baseline_file)
    assert s.nfe == 5 and s.name == "dpmsolver++2m" and s.t_start == 1.0 and s.steps[-1].t == 0.0


def test_unknown_model_and_schedule_names(tmp_path, pipeline_dirs):
    _assert_one_line_error(_run("baseline", "ddim", "--model", tmp_path / "nope", "--nfe", 5, "--out", tmp_path / "x"),
                           "nope")
    _assert_one_line_error(_run("baseline", "dpm9", "--model", pipeline_dirs["epsilon"], "--nfe", 5,
                                "--out", tmp_path / "x"), "name", "dpm9")


def test_sample_rejects_bad_noise_shape(pipeline_dirs, baseline_file, tmp_path):
    np.save(tmp_path / "noise.npy", np.zeros((2, 3, 4, 4), dtype=np.float32))
    _assert_one_line_error(_run("sample", "--model", pipeline_dirs["epsilon"], "--schedule", baseline_file,
                                "--noise", tmp_path / "noise.npy", "--out", tmp_path / "o.npy"), "shape")


def test_sample_draws_noise_and_writes_png(pipeline_dirs, baseline_file, tmp_path):
    result = _run("sample", "--model", pipeline_dirs["epsilon"], "--schedule", baseline_file, "--num", 4,
                  "--out", tmp_path / "o.npy", "--png", tmp_path / "grid.png")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "o.npy").shape == (4, 3, 8, 8)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


MUTATIONS = st.one_of(
    st.tuples(st.just("top"), st.sampled_from(["t_start", "steps", "schema_version", "nfe", "guidance", "dc_order"]),
              st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.integers(-3, 3), st.floats(allow_nan=True),
                        st.lists(st.integers(), max_size=2))),
    st.tuples(st.integers(0, 4), st.sampled_from(["t", "order", "solver", "prediction", "corrector",
                                                  "corrector_order", "ratio", "skip"]),
              st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.integers(-3, 5), st.floats(allow_nan=True),
                        st.lists(st.text(max_size=2), max_size=2))),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=MUTATIONS)
def test_bad_schedule_files_give_one_line_errors(pipeline_dirs, baseline_file, tmp_path, mutation):
    doc = json.loads(baseline_file.read_text())
    where, key, value = mutation
    target = doc if where == "top" else doc["steps"][where]
    target[key] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    result = _run("sample", "--model", pipeline_dirs["epsilon"], "--schedule", bad, "--num", 1,
                  "--out", tmp_path / "o.npy")
    if result.exit_code == 0:  # the mutation happened to keep the file valid (e.g. ratio 1 -> 1.0)
        load(bad)
        return
    _assert_one_line_error(result)
