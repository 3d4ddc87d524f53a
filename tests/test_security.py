"""Hardening: an engine directory is data, never code; its paths stay inside it; user text is never markup;
the local Ray listens on loopback only.

The engine directories here are crafted by hand, as an attacker would: their manifests are self-consistent
(checksums, schedule hash and model fingerprint all match), so only the safety checks can stop them.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from autotune.cli import app
from autotune.compile import load_engine
from autotune.compile.manifest import Manifest, TensorSpec, file_sha256, write_manifest
from autotune.errors import BackendError
from autotune.models.registry import load_model
from autotune.sampling.named import build
from autotune.space.fileformat import save


@pytest.fixture(scope="module")
def gmm():
    return load_model("gmm2d")


class _ShellPayload:
    """Unpickling this runs a shell command that creates ``marker`` (what a crafted model.pt2 carried)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _exported_program_with_payload(path: Path, marker: Path) -> Path:
    """A real ``torch.export.save`` archive whose one weight is re-marked ``use_pickle`` and replaced by the payload."""
    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w

    clean = path.with_suffix(".clean.pt2")
    torch.export.save(torch.export.export(Scale(), (torch.ones(3, 2),)), str(clean))
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                doc = json.loads(data)
                for meta in doc["config"].values():
                    meta["use_pickle"] = True
                data = json.dumps(doc).encode()
            elif "/data/weights/weight_" in info.filename:
                data = pickle.dumps(_ShellPayload(marker))
            out.writestr(info, data)
    clean.unlink()
    return path


def _engine_dir(root: Path, gmm, backend: str, artifact: str, *, schedule_file: str = "schedule.json",
                model_spec: str = "gmm2d") -> Path:
    """A self-consistent manifest for gmm2d (noise (batch, 2) -> sample) naming ``artifact`` and ``schedule_file``.

    Relative names resolve against ``root``; the files they name must exist (the caller writes them first).
    """
    root.mkdir(parents=True, exist_ok=True)
    schedule = build("ddim", gmm.noise, 3)
    sched_path = root / schedule_file
    if not sched_path.exists():
        save(schedule, sched_path)
    io = (TensorSpec("noise", "float32", ("batch", 2)),)
    write_manifest(root, Manifest(
        backend=backend, precision="fp32", artifact=artifact, artifact_sha256=file_sha256(root / artifact),
        inputs=io, outputs=(TensorSpec("sample", "float32", ("batch", 2)),),
        model={"spec": model_spec, "fingerprint": gmm.fingerprint(), "parameterization": gmm.parameterization,
               "sample_shape": [2], "num_classes": None},
        schedule={"file": schedule_file, "hash": schedule.hash(), "name": schedule.name, "nfe": schedule.nfe,
                  "guidance": None, "guidance_baked": True},
        parity={},
    ))
    return root


def _one_error_line(result) -> str:
    """The CLI refused with exit code 2 and exactly one `error: ...` line (no traceback); returns that line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# (1) a torch engine directory cannot run code ---------------------------------------------------------------

def test_the_crafted_payload_is_live(tmp_path):
    """The control: torch's own loader does run the payload, so the tests below would see it if we loaded it."""
    marker = tmp_path / "ran"
    art = _exported_program_with_payload(tmp_path / "model.pt2", marker)
    with pytest.raises(Exception):
        torch.export.load(str(art))
    assert marker.exists()


def test_loading_a_crafted_torch_engine_never_runs_its_payload(tmp_path, gmm):
    marker = tmp_path / "ran"
    engine = tmp_path / "engine"
    engine.mkdir()
    _exported_program_with_payload(engine / "model.pt2", marker)
    _engine_dir(engine, gmm, "torch", "model.pt2")
    with pytest.raises(BackendError, match="model.pt2.*can run code"):
        load_engine(engine)
    assert not marker.exists()
    res = CliRunner().invoke(app, ["sample", "--engine", str(engine), "--out", str(tmp_path / "o.npy")])
    assert "can run code" in _one_error_line(res)
    assert not marker.exists() and not (tmp_path / "o.npy").exists()


def test_a_torch_engine_never_loads_a_model_its_manifest_names_by_path(tmp_path, gmm):
    """The model is rebuilt from the package's own code: a built-in name, or a model the caller hands over."""
    engine = _engine_dir(tmp_path / "engine", gmm, "torch", "schedule.json", model_spec=str(tmp_path / "pipeline"))
    with pytest.raises(BackendError, match="not a built-in model.*give the model"):
        load_engine(engine)
    # a built-in name is rebuilt from the package; gmm2d has no network to bake, and says so in one line
    engine = _engine_dir(tmp_path / "builtin", gmm, "torch", "schedule.json")
    with pytest.raises(BackendError, match="no torch network"):
        load_engine(engine)


# (2) and (3) manifest paths stay inside the engine directory ---------------------------------------------

def _tiny_onnx(path: Path, external: str | None = None) -> Path:
    """``sample = noise + w`` with w = (1, 2); ``external``: where w's bytes live (ONNX external data), else inline."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")
    if external is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "8")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["noise", "w"], ["sample"])], "g",
        [helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("field", ["schedule", "artifact"])
@pytest.mark.parametrize("form", ["dotdot", "absolute"])
def test_manifest_paths_outside_the_directory_are_refused(tmp_path, gmm, field, form):
    pytest.importorskip("onnx")
    engine = tmp_path / "engine"
    engine.mkdir()
    outside = tmp_path / ("outside.json" if field == "schedule" else "outside.onnx")
    if field == "schedule":
        save(build("ddim", gmm.noise, 3), outside)  # a valid schedule with the right hash: only containment stops it
        _tiny_onnx(engine / "model.onnx")
    else:
        _tiny_onnx(outside)
    name = "../" + outside.name if form == "dotdot" else str(outside)
    kwargs = {"schedule_file": name} if field == "schedule" else {}
    _engine_dir(engine, gmm, "onnxruntime", name if field == "artifact" else "model.onnx", **kwargs)
    with pytest.raises(BackendError, match="outside the engine directory"):
        load_engine(engine)
    res = CliRunner().invoke(app, ["sample", "--engine", str(engine), "--out", str(tmp_path / "o.npy")])
    assert "outside the engine directory" in _one_error_line(res)


@pytest.mark.parametrize("which", ["schedule.json", "model.onnx", "manifest.json"])
def test_symlinks_leaving_the_engine_directory_are_refused(tmp_path, gmm, which):
    pytest.importorskip("onnx")
    good = tmp_path / "good"
    good.mkdir()
    _tiny_onnx(good / "model.onnx")
    _engine_dir(good, gmm, "onnxruntime", "model.onnx")
    assert load_engine(good)(noise=np.zeros((1, 2), np.float32)).tolist() == [[1.0, 2.0]]
    engine = tmp_path / "engine"
    engine.mkdir()
    for name in ("schedule.json", "model.onnx", "manifest.json"):
        target = engine / name
        if name == which:
            target.symlink_to(good / name)  # same bytes, so every checksum and hash still matches
        else:
            target.write_bytes((good / name).read_bytes())
    with pytest.raises(BackendError, match="outside the engine directory"):
        load_engine(engine)


def test_a_symlink_inside_the_directory_is_fine(tmp_path, gmm):
    pytest.importorskip("onnx")
    engine = tmp_path / "engine"
    (engine / "v1").mkdir(parents=True)
    _tiny_onnx(engine / "v1" / "model.onnx")
    (engine / "model.onnx").symlink_to(engine / "v1" / "model.onnx")
    _engine_dir(engine, gmm, "onnxruntime", "model.onnx")
    assert load_engine(engine)(noise=np.zeros((1, 2), np.float32)).tolist() == [[1.0, 2.0]]


# (4) ONNX external data stays inside the engine directory ------------------------------------------------

@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_onnx_external_data_outside_the_directory_is_refused(tmp_path, gmm, where):
    pytest.importorskip("onnxruntime")
    secret = tmp_path / "secret.bin"
    np.array([7.0, 8.0], np.float32).tofile(secret)
    engine = tmp_path / "engine"
    engine.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "weights.bin"}[where]
    if where == "symlink":
        (engine / "weights.bin").symlink_to(secret)
    _tiny_onnx(engine / "model.onnx", external=location)
    _engine_dir(engine, gmm, "onnxruntime", "model.onnx")
    with pytest.raises(BackendError, match="initializer 'w'.*outside the engine directory"):
        load_engine(engine)
    res = CliRunner().invoke(app, ["sample", "--engine", str(engine), "--out", str(tmp_path / "o.npy")])
    assert "outside the engine directory" in _one_error_line(res)


def test_onnx_external_data_inside_the_directory_loads(tmp_path, gmm):
    pytest.importorskip("onnxruntime")
    engine = tmp_path / "engine"
    engine.mkdir()
    np.array([7.0, 8.0], np.float32).tofile(engine / "weights.bin")
    _tiny_onnx(engine / "model.onnx", external="weights.bin")
    _engine_dir(engine, gmm, "onnxruntime", "model.onnx")
    assert load_engine(engine)(noise=np.ones((1, 2), np.float32)).tolist() == [[8.0, 9.0]]


# (5) user text is printed literally, never as Rich markup ------------------------------------------------

def test_markup_in_an_error_is_printed_literally(tmp_path):
    engine = tmp_path / "[/x] [bold red]E[/bold red]"  # the slashes make it nested: still one path
    engine.mkdir(parents=True)
    res = CliRunner().invoke(app, ["sample", "--engine", str(engine), "--out", str(tmp_path / "o.npy")])
    line = _one_error_line(res)
    assert f"{engine}/manifest.json: missing" in line


def test_markup_in_paths_and_schedule_names_is_printed_literally(tmp_path, gmm):
    import dataclasses

    sched = dataclasses.replace(build("ddim", gmm.noise, 3), name="[bold red]mine[/x]")
    sched_path = save(sched, tmp_path / "[red]s[/red].json")
    out = tmp_path / "[bold]o[/bold].npy"
    res = CliRunner().invoke(app, ["sample", "--model", "gmm2d", "--schedule", str(sched_path), "--num", "2",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output.replace("\n", "")
    res = CliRunner().invoke(app, ["sample", "--model", "gmm2d", "--schedule", str(tmp_path / "[/x]missing.json"),
                                   "--out", str(out)])
    assert "[/x]missing.json" in _one_error_line(res)


def test_markup_in_an_objective_name_does_not_break_the_search_progress_bar(tmp_path):
    res = CliRunner().invoke(app, ["search", "--model", "gmm2d", "--nfe", "3", "--objective", "[/x]", "--budget", "2",
                                   "--no-cache", "--out", str(tmp_path / "s.json")])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: objective '[/x]'"), res.output


def test_the_shared_consoles_render_no_markup_in_tables():
    from rich.table import Table

    from autotune.cli_common import console, err_console

    for con in (console, err_console):
        table = Table(title="[/x] [bold]title[/bold]")
        table.add_column("[red]col[/red]")
        table.add_row("[/y] cell")
        with con.capture() as cap:
            con.print(table)
        text = cap.get()
        assert all(t in text for t in ("[/x]", "[bold]title[/bold]", "[red]col[/red]", "[/y] cell")), text


# (6) the local Ray listens on loopback only -------------------------------------------------------------

def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _listening_addresses(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP/UDP socket of ``pids``, from ``ss``."""
    import re
    import subprocess

    out = subprocess.run(["ss", "-ltnupH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = [int(p) for p in re.findall(r"pid=(\d+)", line)]
        if any(p in pids for p in owners):
            found.append((line.split()[4], owners[0]))
    return found


def test_the_local_ray_pool_listens_on_loopback_only():
    import shutil

    ray = pytest.importorskip("ray")
    if shutil.which("ss") is None or not Path("/proc").is_dir():
        pytest.skip("needs ss and /proc to list the Ray processes' sockets")
    if ray.is_initialized():
        ray.shutdown()
    from autotune.evaluate.evaluator import Evaluator
    from autotune.search.runner import EvaluatorSpec, RayPool

    model = load_model("gmm2d")
    evaluator = Evaluator(model, "search", size=8)
    spec = EvaluatorSpec("gmm2d", "search", 8, 0, None, evaluator.ref_steps)
    pool = RayPool(spec, 1, references={evaluator.reference_version(None): evaluator.reference(None)})
    try:
        assert pool.map([build("ddim", model.noise, 3)])[0]["nfe"] == 3  # a worker is up and serving
        sockets = _listening_addresses(_descendants(os.getpid()))
    finally:
        pool.close()
        ray.shutdown()
    assert len({pid for _, pid in sockets}) >= 3, sockets  # gcs_server, raylet, a worker at least
    loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
    assert all(addr.startswith(loopback) for addr, _ in sockets), sockets
