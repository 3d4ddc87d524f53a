"""`autotune compile` on the transformer families: SD3 and Flux bake into ONNX engines equal to the executor (their
two condition inputs named as the pipelines' arguments). Flux's engine keeps the batch dynamic: exported at batch 2,
it equals the executor on batches of 1, 3 and 4 of real prompts (the rotary embedding's head-dim split is exported
with ``unflatten``, compile/onnx_export.py), in the guidance-distilled "dev" layout and in the "schnell" one (true
CFG: the engine's own batch doubles inside the graph)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from typer.testing import CliRunner  # noqa: E402

from autotune.cli import app  # noqa: E402


def _compile(model_dir, tmp_path, guidance):
    runner = CliRunner()
    schedule = tmp_path / "s.json"
    result = runner.invoke(app, ["baseline", "flow-euler", "--model", str(model_dir), "--nfe", "4", "--guidance",
                                 str(guidance), "--out", str(schedule)])
    assert result.exit_code == 0, result.output
    return runner.invoke(app, ["compile", "--model", str(model_dir), "--schedule", str(schedule), "--out",
                               str(tmp_path / "engine")])


def test_sd3_engine_equals_the_executor(tmp_path):
    import json

    from tiny_sd3 import make_tiny_sd3_dir

    result = _compile(make_tiny_sd3_dir(tmp_path / "sd3"), tmp_path, 5.0)
    assert result.exit_code == 0, result.output
    engine = float(re.search(r"engine ([0-9.e+-]+) \(max abs\)", result.output).group(1))
    assert engine <= 1e-3
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["noise", "prompt_embeds", "pooled_prompt_embeds"]


@pytest.mark.parametrize("schnell", [False, True], ids=["dev", "schnell"])
def test_flux_engine_equals_the_executor_at_other_batches(tmp_path, schnell):
    """Exported at batch 2; the build's parity run is a batch of 4 of the empty prompt, and the engine, loaded, runs
    batches of 1 and 3 of different prompts: each within 1e-3 of the executor (measured: dev 7.2e-7 at 4,
    4.8e-7 at 1, 3.6e-7 at 3; schnell 4.8e-7, 9.5e-7, 1.1e-6).
    "dev" has the guidance embedding (distilled guidance 3.5, an input of the one forward); "schnell" has none, so
    guidance 3.5 is true CFG against the empty prompt."""
    import json

    import numpy as np
    import torch

    from autotune.compile.engine import load_engine
    from autotune.models.registry import load_model
    from autotune.sampling.executor import sample
    from autotune.space.fileformat import load
    from tiny_flux import PROMPTS, make_tiny_flux_dir

    model_dir = make_tiny_flux_dir(tmp_path / "flux", schnell=schnell)
    result = _compile(model_dir, tmp_path, 3.5)
    assert result.exit_code == 0, result.output
    assert float(re.search(r"engine ([0-9.e+-]+) \(max abs\)", result.output).group(1)) <= 1e-3
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["noise", "prompt_embeds", "pooled_prompt_embeds"]
    assert manifest["parity"]["noises"] != 2  # the build's own parity run is at another batch than the export's

    model = load_model(str(model_dir))
    assert model.guidance_embeds is not schnell
    schedule = load(tmp_path / "s.json")
    engine = load_engine(tmp_path / "engine", model)
    for batch in (1, 3):
        noise = torch.randn(batch, *model.sample_shape, generator=torch.Generator().manual_seed(batch))
        cond = model.encode_prompts(list(PROMPTS[:batch]))
        with torch.no_grad():
            reference = sample(model, schedule, noise, cond).sample.numpy()
        out = engine(noise=noise.numpy(), prompt_embeds=cond.prompt_embeds.numpy(),
                     pooled_prompt_embeds=cond.pooled_embeds.numpy())
        assert out.shape == reference.shape
        assert float(np.abs(out - reference).max()) <= 1e-3, batch


def test_exported_rotary_embedding_is_diffusers_own_and_restored():
    """The export-time apply_rotary_emb gives diffusers' numbers exactly (both sequence layouts), and diffusers' own
    function is back in the Flux module after the export context, also when the export raises."""
    import torch
    from diffusers.models import embeddings
    from diffusers.models.transformers import transformer_flux

    from autotune.compile.onnx_export import _batch_free_rotary_embedding

    g = torch.Generator().manual_seed(0)
    x, cos, sin = torch.randn(3, 7, 2, 8, generator=g), torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    with _batch_free_rotary_embedding():
        patched = transformer_flux.apply_rotary_emb
        assert patched is not embeddings.apply_rotary_emb
        assert torch.equal(patched(x, (cos, sin), sequence_dim=1), embeddings.apply_rotary_emb(x, (cos, sin),
                                                                                               sequence_dim=1))
        xt = x.transpose(1, 2)
        assert torch.equal(patched(xt, (cos, sin)), embeddings.apply_rotary_emb(xt, (cos, sin)))
    assert transformer_flux.apply_rotary_emb is embeddings.apply_rotary_emb
    with pytest.raises(RuntimeError), _batch_free_rotary_embedding():
        raise RuntimeError("export failed")
    assert transformer_flux.apply_rotary_emb is embeddings.apply_rotary_emb


def test_digits_flow_engine_equals_the_executor(tmp_path):
    """The built-in flow model bakes like digits: noise + class_labels in, parity within 1e-3."""
    runner = CliRunner()
    schedule = tmp_path / "s.json"
    result = runner.invoke(app, ["baseline", "unipc-flow", "--model", "digits-flow", "--nfe", "5", "--guidance", "2",
                                 "--out", str(schedule)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compile", "--model", "digits-flow", "--schedule", str(schedule), "--out",
                                 str(tmp_path / "engine")])
    assert result.exit_code == 0, result.output
    engine = float(re.search(r"engine ([0-9.e+-]+) \(max abs\)", result.output).group(1))
    assert engine <= 1e-3
