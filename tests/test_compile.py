"""compile/: baked module parity, ONNX engines (plain onnxruntime too), manifest checks, CLI, backends."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from autotune.compile import BakedSampler, build_engine, load_engine, read_manifest  # noqa: E402
from autotune.sampling.program import Combine, Compensate  # noqa: E402
from autotune.compile.backends import BACKENDS  # noqa: E402
from autotune.compile.engine import example_inputs, engine_io, executor_sample  # noqa: E402
from autotune.errors import BackendError  # noqa: E402
from autotune.models.registry import load_model  # noqa: E402
from autotune.sampling.named import build  # noqa: E402
from autotune.space.fileformat import load, save  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_model("digits")


def _with_steps(schedule, **per_step):
    """Replace fields of single steps: ``_with_steps(s, s2={"skip": (...)})`` edits steps[2]."""
    steps = list(schedule.steps)
    for key, changes in per_step.items():
        k = int(key[1:])
        steps[k] = dataclasses.replace(steps[k], **changes)
    return schedule.with_steps(steps)


@pytest.fixture(scope="module")
def digits_schedule(digits):
    """UniPC bh2 order 3 (predictor + corrector), one DC ratio, a pruned step, a model-time shift, a data scale,
    CFG 2: every kind of constant."""
    s = build("unipc-bh2-o3", digits.noise, 4)
    s = _with_steps(s, s1={"skip": ("mid_attn", "up1_extra"), "shift": 0.25}, s2={"ratio": 0.9, "data_scale": 0.96})
    return dataclasses.replace(s, guidance=2.0)


@pytest.fixture(scope="module")
def digits_engine(digits, digits_schedule, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "digits"
    build_engine(digits, digits_schedule, out, "onnxruntime", model_spec="digits")
    return out


def test_baked_module_matches_executor_with_skip_masks_dc_and_corrector(digits, digits_schedule):
    inputs, _ = engine_io(digits)
    data = example_inputs(digits, inputs, batch=3, seed=5)
    with torch.no_grad():
        ref = executor_sample(digits, digits_schedule, data)
        baked = BakedSampler(digits, digits_schedule)(data["noise"], data["class_labels"])
        unpruned = _with_steps(digits_schedule, s1={"skip": ()})
        ref_unpruned = executor_sample(digits, unpruned, data)
    assert (baked - ref).abs().max().item() <= 1e-5
    # the skip mask really changes the computation, so the parity above covers the pruned variant
    assert (ref_unpruned - ref).abs().max().item() > 0.1


def test_program_holds_plan_constants(digits, digits_schedule):
    prog = BakedSampler(digits, digits_schedule).program
    assert prog.nfe == digits_schedule.nfe and prog.guidance == 2.0
    calls = prog.plan.calls
    assert calls[1].skip == frozenset({"mid_attn", "up1_extra"}) and calls[0].skip == frozenset()
    # compensation from step 2 on (dc_order 2), a corrector of the previous step from step 1 on
    assert [c.target for c in prog.plan.code if isinstance(c, Compensate)][0] == 2
    corrected = [c for c in prog.plan.code if isinstance(c, Combine) and c.src != "x"]
    assert len(corrected) == len(digits_schedule.steps) - 1
    assert all(isinstance(w, float) for c in prog.plan.code if isinstance(c, Combine) for _, w in c.outputs)


def test_onnxruntime_engine_parity_and_manifest(digits_engine, digits, digits_schedule):
    man = read_manifest(digits_engine)
    assert man.backend == "onnxruntime" and man.build["opset"] == 17
    assert man.schedule["hash"] == digits_schedule.hash() and man.model["fingerprint"] == digits.fingerprint()
    assert [s.name for s in man.inputs] == ["noise", "class_labels"]
    assert man.parity["engine_vs_executor_max_abs"] <= 1e-3
    engine = load_engine(digits_engine, digits)
    inputs, _ = engine_io(digits)
    data = example_inputs(digits, inputs, batch=2, seed=11)
    out = engine(**{k: v.numpy() for k, v in data.items()})
    ref = executor_sample(digits, digits_schedule, data).numpy()
    assert np.abs(out - ref).max() <= 1e-3


def test_exported_weights_are_stored_once(digits_engine, digits):
    import onnx

    proto = onnx.load(str(digits_engine / "model.onnx"))
    stored = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    params = sum(p.numel() for p in digits.module.parameters())
    # every parameter once (4 network calls, one of them pruned), plus at most a little of folded constants
    assert params <= stored < 1.05 * params


def test_plain_onnxruntime_runs_the_engine_at_batch_1_and_3(digits_engine, digits, digits_schedule):
    """A user with only onnxruntime and numpy: nothing of ours is imported in the subprocess."""
    inputs, _ = engine_io(digits)
    refs = {}
    for b in (1, 3):
        data = example_inputs(digits, inputs, batch=b, seed=b)
        np.save(digits_engine.parent / f"noise{b}.npy", data["noise"].numpy())
        np.save(digits_engine.parent / f"labels{b}.npy", data["class_labels"].numpy())
        refs[b] = executor_sample(digits, digits_schedule, data).numpy()
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        d = {str(digits_engine.parent)!r}
        s = ort.InferenceSession(d + "/digits/model.onnx", providers=["CPUExecutionProvider"])
        for b in (1, 3):
            out = s.run(["sample"], {{"noise": np.load(f"{{d}}/noise{{b}}.npy"),
                                     "class_labels": np.load(f"{{d}}/labels{{b}}.npy")}})[0]
            np.save(f"{{d}}/out{{b}}.npy", out)
        assert not any(m.startswith("autotune") for m in sys.modules), "autotune was imported"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    for b in (1, 3):
        out = np.load(digits_engine.parent / f"out{b}.npy")
        assert out.shape == (b, 1, 16, 16)
        assert np.abs(out - refs[b]).max() <= 1e-3


def test_manifest_mismatches_fail_with_one_line(digits_engine, tmp_path, digits):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(digits_engine, bad)
    other = build("ddim", digits.noise, 3)
    save(other, bad / "schedule.json")
    with pytest.raises(BackendError, match="schedule hash .* does not match"):
        load_engine(bad)
    shutil.copy(digits_engine / "schedule.json", bad / "schedule.json")
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BackendError, match="checksum"):
        load_engine(bad)
    engine = load_engine(digits_engine)
    with pytest.raises(BackendError, match="fingerprint"):
        load_engine(digits_engine, load_model("gmm2d"))
    noise = np.zeros((2, 1, 16, 16), np.float32)
    with pytest.raises(BackendError, match="class_labels"):
        engine(noise=noise)
    with pytest.raises(BackendError, match="dtype"):
        engine(noise=noise, class_labels=np.zeros(2, np.int32))
    with pytest.raises(BackendError, match=r"shape \(2, 1, 8, 8\)"):
        engine(noise=np.zeros((2, 1, 8, 8), np.float32), class_labels=np.zeros(2, np.int64))
    with pytest.raises(BackendError, match=r"class_labels must be in 0\.\.9"):
        engine(noise=noise, class_labels=np.array([0, 10]))
    with pytest.raises(BackendError, match="batch size"):
        engine(noise=noise, class_labels=np.zeros(3, np.int64))
    shutil.copy(digits_engine / "model.onnx", bad / "model.onnx")
    doc = json.loads((digits_engine / "manifest.json").read_text())
    doc["inputs"][0]["shape"] = ["batch", 1, 8, 8]  # the manifest no longer describes the graph
    (bad / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BackendError, match="graph input 'noise'"):
        load_engine(bad)
    doc["version"] = 99
    (bad / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BackendError, match="manifest version 99"):
        load_engine(bad)


def test_build_refuses_an_engine_out_of_tolerance(digits, tmp_path, monkeypatch):
    import autotune.compile.engine as engine_mod

    monkeypatch.setitem(engine_mod.ENGINE_TOLERANCE, "fp32", 0.0)  # ORT's float rounding differs from torch's
    with pytest.raises(BackendError, match="from the executor .*not written"):
        build_engine(digits, build("ddim", digits.noise, 1), tmp_path / "e", "onnxruntime")
    with pytest.raises(BackendError, match="manifest.json: missing"):
        load_engine(tmp_path / "e")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_diffusers_pipeline_engine_parity(pipeline_dirs, prediction, tmp_path):
    model = load_model(str(pipeline_dirs[prediction]))
    s = build("dpmsolver++2m", model.noise, 4)
    s = _with_steps(s, s1={"skip": (model.units[0],)})
    man = build_engine(model, s, tmp_path / "e", "onnxruntime", model_spec=str(pipeline_dirs[prediction]))
    assert [i.name for i in man.inputs] == ["noise"]
    assert man.parity["baked_vs_executor_max_abs"] <= 1e-5
    noise = torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(3))
    out = load_engine(tmp_path / "e", model)(noise=noise.numpy())
    ref = executor_sample(model, s, {"noise": noise}).numpy()
    assert np.abs(out - ref).max() <= 1e-3


def test_cli_compile_then_sample_engine(digits, tmp_path):
    from typer.testing import CliRunner

    from autotune.cli import app

    runner = CliRunner()
    sched_path = save(dataclasses.replace(build("dpmsolver++2m", digits.noise, 2), guidance=2.0), tmp_path / "s.json")
    engine_dir = tmp_path / "engine"
    res = runner.invoke(app, ["compile", "--model", "digits", "--schedule", str(sched_path), "--backend",
                              "onnxruntime", "--out", str(engine_dir)])
    assert res.exit_code == 0, res.output
    assert "parity vs executor" in res.output
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    np.save(tmp_path / "noise.npy", noise.numpy())
    np.save(tmp_path / "labels.npy", np.array([4, 9]))
    res = runner.invoke(app, ["sample", "--engine", str(engine_dir), "--noise", str(tmp_path / "noise.npy"),
                              "--class-labels", str(tmp_path / "labels.npy"), "--out", str(tmp_path / "o.npy")])
    assert res.exit_code == 0, res.output
    ref = executor_sample(digits, load(sched_path), {"noise": noise, "class_labels": torch.tensor([4, 9])})
    assert np.abs(np.load(tmp_path / "o.npy") - ref.numpy()).max() <= 1e-3
    res = runner.invoke(app, ["sample", "--engine", str(tmp_path), "--out", str(tmp_path / "x.npy")])
    assert res.exit_code == 2 and "manifest.json: missing" in res.output


def test_cli_unsupported_backend_or_precision_is_one_line(tmp_path, digits_schedule):
    from typer.testing import CliRunner

    from autotune.cli import app

    sched_path = save(digits_schedule, tmp_path / "s.json")
    res = CliRunner().invoke(app, ["compile", "--model", "digits", "--schedule", str(sched_path), "--precision",
                                   "fp16", "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "precision fp16 is not supported" in res.output
    if BACKENDS["tensorrt"].missing() is not None:
        res = CliRunner().invoke(app, ["compile", "--model", "digits", "--schedule", str(sched_path), "--backend",
                                       "tensorrt", "--out", str(tmp_path / "t")])
        assert res.exit_code == 2 and "tensorrt" in res.output and len(res.output.strip().splitlines()) <= 2


def test_torch_backend_fp32_exact_and_fp16_close(digits, tmp_path):
    """The torch backend on this machine (torch.compile only on a GPU by default), fp32 and fp16 autocast."""
    s = _with_steps(build("dpmsolver++2m", digits.noise, 2), s1={"skip": ("mid_attn",)})
    s = dataclasses.replace(s, guidance=1.5)
    man = build_engine(digits, s, tmp_path / "t32", "torch", "fp32", parity_noises=2, model_spec="digits")
    # on a GPU the engine's float32 convolutions may use TF32 (PyTorch's cuDNN default): the engines' 1e-3 there
    assert man.parity["engine_vs_executor_max_abs"] <= (1e-3 if torch.cuda.is_available() else 1e-5)
    engine = load_engine(tmp_path / "t32")  # no model given: the built-in digits is rebuilt from the package
    assert engine(**engine.example_inputs(1)).shape == (1, 1, 16, 16)
    man16 = build_engine(digits, s, tmp_path / "t16", "torch", "fp16", parity_noises=2)
    assert 0 < man16.parity["engine_vs_executor_max_abs"] < 0.2  # half precision really ran, and stayed close


def test_torch_engine_moves_its_own_copy_to_the_device(digits):
    """The exported graph shares the caller's parameters: placing it on another device (``meta`` stands in for
    a GPU here) copies them there and leaves the caller's network where it was; the export's lifted constants
    (plain tensor attributes, which ``Module.to`` skips) move too."""
    from autotune.compile.backends import _export, _on_device

    s = dataclasses.replace(build("dpmsolver++2m", digits.noise, 3), guidance=1.5)
    inputs, outputs = engine_io(digits, s)
    exported = _export(BakedSampler(digits, s, torch.float32).eval(), _Specs(inputs))
    caller = {id(p): p.device for p in digits.module.parameters()}
    assert {id(p) for p in exported.parameters()} <= set(caller)  # shared: why a plain .to() is wrong
    constants = [v for m in exported.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    assert constants, "the export lifted no constants: this test no longer covers them"
    traced_on = [n for n in exported.graph.nodes if n.kwargs.get("device") == torch.device("cpu")]
    assert traced_on, "the graph names no device: this test no longer covers the graph's device arguments"
    moved = _on_device(exported, torch.device("meta"))
    assert all(p.device.type == "cpu" for p in digits.module.parameters())
    held = [*moved.parameters(), *moved.buffers(),
            *(v for m in moved.modules() for v in vars(m).values() if isinstance(v, torch.Tensor))]
    assert held and all(t.device.type == "meta" for t in held)
    # the whole graph runs there: a cast that still said device=cpu would copy out of a meta tensor and raise
    noise = torch.zeros(3, 1, 16, 16, device="meta")
    out = moved(noise, torch.zeros(3, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 1, 16, 16)


class _Specs:
    def __init__(self, inputs):
        self.inputs = inputs


def test_one_line_of_a_torch_compile_error():
    from autotune.compile.engine import _error_line

    e = RuntimeError("Dynamo failed to run FX node with fake tensors: call_function add(*(a, b)): got "
                     "RuntimeError('two devices')\n\nfrom user code:\n   File \"x.py\", line 3\n\n"
                     "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n"
                     "For more context, set TORCH_LOGS=\"+dynamo\"")
    assert _error_line(e).endswith("got RuntimeError('two devices')")
    assert _error_line(ValueError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT\nGot invalid dimensions")) == \
        "Got invalid dimensions"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_cuda_graphs(digits, tmp_path):
    s = build("dpmsolver++2m", digits.noise, 3)
    man = build_engine(digits, s, tmp_path / "g", "torch", "fp16", parity_noises=2)
    assert "CUDA graphs" in man.parity["engine_runtime"] and man.parity["engine_vs_executor_max_abs"] < 0.2
    assert all(p.device.type == "cpu" for p in digits.module.parameters())  # the engine holds its own copy


def test_provider_is_checked_before_any_work(digits_schedule, tmp_path):
    """``--provider``: an unknown one, one this install lacks, one given to a non-onnxruntime engine or without
    ``--engine`` are each one line before a model is loaded."""
    import onnxruntime as ort
    from typer.testing import CliRunner

    from autotune.cli import app

    sched_path = save(digits_schedule, tmp_path / "s.json")
    base = ["bench", "--model", "digits", "--schedule", str(sched_path), "--batch", "1", "--repeats", "1"]
    res = CliRunner().invoke(app, [*base, "--provider", "tpu"])
    assert res.exit_code == 2 and "provider 'tpu' unknown (one of cpu, cuda, tensorrt)" in res.output
    assert len(res.output.strip().splitlines()) <= 2
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        res = CliRunner().invoke(app, [*base, "--provider", "cuda"])
        assert res.exit_code == 2 and "CUDAExecutionProvider is not available" in res.output
        assert "onnxruntime-gpu" in res.output and len(res.output.strip().splitlines()) <= 3
    res = CliRunner().invoke(app, ["compile", "--model", "digits", "--schedule", str(sched_path), "--backend",
                                   "torch", "--provider", "cuda", "--out", str(tmp_path / "t")])
    assert res.exit_code == 2 and "only onnxruntime engines take a provider (this is torch)" in res.output
    assert not (tmp_path / "t").exists()
    res = CliRunner().invoke(app, ["sample", "--model", "digits", "--schedule", str(sched_path), "--provider",
                                   "cpu", "--out", str(tmp_path / "x.npy")])
    assert res.exit_code == 2 and "--provider: only with --engine" in res.output


def test_engine_runs_on_the_provider_asked_for(digits_engine, tmp_path):
    """``sample --engine DIR --provider cpu`` loads the session on that provider and says so."""
    from typer.testing import CliRunner

    from autotune.cli import app

    np.save(tmp_path / "labels.npy", np.array([3, 7]))
    res = CliRunner().invoke(app, ["sample", "--engine", str(digits_engine), "--num", "2", "--provider", "cpu",
                                   "--class-labels", str(tmp_path / "labels.npy"), "--out", str(tmp_path / "x.npy")])
    assert res.exit_code == 0, res.output
    assert "CPUExecutionProvider" in res.output and np.load(tmp_path / "x.npy").shape == (2, 1, 16, 16)


def _cuda_provider() -> bool:
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_provider(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_onnxruntime_cuda_engine_matches_executor_and_cpu(digits, digits_schedule, tmp_path):
    """The engine on ONNX Runtime's CUDA provider: parity with the executor checked on the GPU when built, the
    session really on CUDA (not onnxruntime's silent CPU fallback), the same samples as the CPU provider."""
    man = build_engine(digits, digits_schedule, tmp_path / "e", "onnxruntime", load_options={"provider": "cuda"})
    assert man.parity["engine_vs_executor_max_abs"] <= 1e-3
    assert "CUDAExecutionProvider" in man.parity["engine_runtime"]
    gpu, cpu = load_engine(tmp_path / "e", provider="cuda"), load_engine(tmp_path / "e", provider="cpu")
    assert "CUDAExecutionProvider" in gpu.description and "CPUExecutionProvider" in cpu.description
    data = gpu.example_inputs(5, seed=3)
    out_gpu, out_cpu = gpu(**data), cpu(**data)
    assert out_gpu.shape == (5, 1, 16, 16) and np.abs(out_gpu - out_cpu).max() <= 1e-3


def test_tensorrt_engine(digits, digits_schedule, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("tensorrt needs a CUDA GPU")
    man = build_engine(digits, digits_schedule, tmp_path / "trt", "tensorrt", "fp32", max_batch=8)
    assert man.artifact == "model.plan" and man.parity["engine_vs_executor_max_abs"] <= 1e-3
    engine = load_engine(tmp_path / "trt")
    assert engine(**engine.example_inputs(3)).shape == (3, 1, 16, 16)


def test_text_to_image_engine_takes_prompt_embeddings(tiny_sd_dir, tmp_path):
    """A latent Stable-Diffusion-layout directory: input ``prompt_embeds``, CFG baked in, one unit pruned."""
    from tiny_sd import PROMPTS

    model = load_model(str(tiny_sd_dir))
    s = dataclasses.replace(build("dpmsolver++2m", model.noise, 3), guidance=5.0)
    s = _with_steps(s, s1={"skip": (model.units[0],)})
    man = build_engine(model, s, tmp_path / "e", "onnxruntime", parity_noises=2)
    assert [(i.name, i.shape) for i in man.inputs][1] == ("prompt_embeds", ("batch", 16, 32))
    cond = model.encode_prompts(list(PROMPTS[:3]))
    noise = torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(2))
    out = load_engine(tmp_path / "e")(noise=noise.numpy(), prompt_embeds=cond.numpy())
    ref = executor_sample(model, s, {"noise": noise, "prompt_embeds": cond}).numpy()
    assert np.abs(out - ref).max() <= 1e-3
