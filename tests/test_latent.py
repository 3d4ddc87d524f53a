"""Latent text-to-image pipeline directories: our executor reproduces diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autotune.errors import ModelError  # noqa: E402
from autotune.models.latent import (  # noqa: E402
    LatentTextToImageDenoiser,
    is_latent_pipeline_dir,
    load_latent_pipeline_dir,
    read_prompts,
)
from autotune.sampling.denoiser import Denoiser  # noqa: E402
from autotune.sampling.executor import sample  # noqa: E402
from autotune.sampling.named import build  # noqa: E402
from autotune.sampling.noise import VPDiscrete  # noqa: E402
from peers import PEERS  # noqa: E402
from tiny_sd import PROMPTS, load_sd_pipeline  # noqa: E402

TOL = 1e-4
IMAGE = 32  # pixels; latents 8 x 8


@pytest.fixture(scope="module")
def sd_dir(tiny_sd_dir):
    return tiny_sd_dir


@pytest.fixture(scope="module")
def model(sd_dir):
    return load_latent_pipeline_dir(sd_dir)


def _latents(n=len(PROMPTS), seed=1, dtype=torch.float32):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _peer_pipeline(sd_dir, name, scheduler_config, dtype=torch.float32):
    import diffusers

    cls_name, kwargs = PEERS[name]
    scheduler = getattr(diffusers, cls_name).from_config(scheduler_config, **kwargs)
    return load_sd_pipeline(sd_dir, scheduler=scheduler, dtype=dtype)


def _run_pipeline(pipe, prompts, latents, nfe, guidance, output_type="latent"):
    with torch.no_grad():
        return pipe(prompt=list(prompts), height=IMAGE, width=IMAGE, num_inference_steps=nfe,
                    guidance_scale=guidance, latents=latents.clone(), output_type=output_type).images


def test_round_trip(sd_dir, model):
    """The directory written by save_pretrained loads back with every part and the declared attributes."""
    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["text_encoder"][1] == "CLIPTextModel"
    assert sorted(p.name for p in (sd_dir / "tokenizer").iterdir()) == ["merges.txt", "tokenizer_config.json",
                                                                         "vocab.json"]
    assert is_latent_pipeline_dir(sd_dir)
    assert isinstance(model, Denoiser) and isinstance(model, LatentTextToImageDenoiser)
    assert model.sample_shape == (4, 8, 8) and model.num_classes is None and model.module is model.unet
    assert model.parameterization == "epsilon" and model.vae_scale_factor == 4
    assert model.units and all(u in dict(model.unet.named_modules()) for u in model.units)
    config = json.loads((sd_dir / "scheduler" / "scheduler_config.json").read_text())
    assert isinstance(model.noise, VPDiscrete)
    assert torch.allclose(torch.tensor(model.noise.alphas_cumprod),
                          torch.tensor(VPDiscrete.from_diffusers_config(config).alphas_cumprod), atol=0, rtol=0)
    assert not any(p.requires_grad for p in model.unet.parameters())
    pipe = load_sd_pipeline(sd_dir)
    for ours, theirs in ((model.unet, pipe.unet), (model.text_encoder, pipe.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(model.fingerprint()) == 16


def test_fingerprint(sd_dir, model, tmp_path):
    """Same weights in another place: same fingerprint; other UNet weights or another text encoder: another."""
    copy = tmp_path / "copied"
    shutil.copytree(sd_dir, copy)
    assert load_latent_pipeline_dir(copy).fingerprint() == model.fingerprint()
    fresh = load_latent_pipeline_dir(copy)
    with torch.no_grad():
        next(fresh.text_encoder.parameters()).add_(1e-3)
    assert fresh.fingerprint() != model.fingerprint()
    fresh = load_latent_pipeline_dir(copy)
    with torch.no_grad():
        next(fresh.unet.parameters()).add_(1e-3)
    assert fresh.fingerprint() != model.fingerprint()


def test_prompt_embeddings_match_pipeline(sd_dir, model):
    """encode_prompts and the null condition are the pipeline's prompt and negative-prompt ("") embeddings."""
    pipe = load_sd_pipeline(sd_dir)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(PROMPTS), "cpu", 1, True)
    ours = model.encode_prompts(PROMPTS)
    assert ours.shape == (len(PROMPTS), 16, 32)
    assert torch.equal(ours, cond)
    assert model.null_embedding.shape == (1, 16, 32)
    # the pipeline encodes B copies of "" in one batch, we encode one: equal up to batched-matmul rounding
    assert (model.null_embedding.expand_as(uncond) - uncond).abs().max().item() <= 1e-6


CASES = [(name, nfe) for name in ("dpmsolver++2m", "unipc-bh2-o2") for nfe in (5, 8)]


@pytest.mark.parametrize("guidance", [7.5, None])
@pytest.mark.parametrize("name,nfe", CASES)
def test_executor_matches_stable_diffusion_pipeline(sd_dir, model, name, nfe, guidance):
    """Same latents, prompts and scheduler: our final latents are diffusers' to 1e-4 (guided and unguided;
    the unguided pipeline is guidance_scale=1, which skips classifier-free guidance)."""
    cond = model.encode_prompts(PROMPTS)
    latents = _latents()
    schedule = build(name, model.noise, nfe)
    if guidance is not None:
        schedule = dataclasses.replace(schedule, guidance=guidance)
    result = sample(model, schedule, latents, cond)
    assert result.nfe == nfe
    ref = _run_pipeline(_peer_pipeline(sd_dir, name, model.scheduler_config), PROMPTS, latents, nfe, guidance or 1.0)
    assert torch.isfinite(ref).all() and ref.shape == result.sample.shape
    diff = (result.sample - ref).abs().max().item()
    print(f"{name} nfe={nfe} guidance={guidance}: max abs diff {diff:.3g} (|ref| max {ref.abs().max().item():.3g})")
    assert diff <= TOL


def test_float64_matches_pipeline_in_float64(sd_dir):
    m64 = load_latent_pipeline_dir(sd_dir, dtype=torch.float64)
    assert m64.unet.dtype == torch.float64 and m64.encode_prompts(["a red car"]).dtype == torch.float64
    latents = _latents(dtype=torch.float64)
    schedule = dataclasses.replace(build("dpmsolver++2m", m64.noise, 8), guidance=7.5)
    ours = sample(m64, schedule, latents, m64.encode_prompts(PROMPTS)).sample
    pipe = _peer_pipeline(sd_dir, "dpmsolver++2m", m64.scheduler_config, dtype=torch.float64)
    ref = _run_pipeline(pipe, PROMPTS, latents, 8, 7.5)
    # diffusers keeps alphas_cumprod and sigmas in float32 even in a float64 pipeline; we use float64
    diff = (ours - ref).abs().max().item()
    print(f"float64 dpmsolver++2m nfe=8 guidance=7.5: max abs diff {diff:.3g}")
    assert ours.dtype == torch.float64 and diff <= TOL


def test_decode_matches_pipeline_images(sd_dir, model):
    """decode(latents) = the pipeline's VAE decode (scaling_factor from the VAE config), in [-1, 1]."""
    latents = _latents()
    schedule = dataclasses.replace(build("dpmsolver++2m", model.noise, 5), guidance=7.5)
    images = model.decode(sample(model, schedule, latents, model.encode_prompts(PROMPTS)).sample)
    assert images.shape == (len(PROMPTS), 3, IMAGE, IMAGE) and images.min() >= -1 and images.max() <= 1
    ref = _run_pipeline(_peer_pipeline(sd_dir, "dpmsolver++2m", model.scheduler_config), PROMPTS, latents, 5, 7.5,
                        output_type="pt")  # postprocessed to [0, 1]
    assert (images / 2 + 0.5 - ref).abs().max().item() <= TOL


def test_guided_call_is_one_batched_unet_forward(model):
    """Guidance doubles the batch of ONE UNet forward per model call; the text encoder never runs in the loop."""
    batches, text_calls = [], []
    h1 = model.unet.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))
    h2 = model.text_encoder.register_forward_hook(lambda *a: text_calls.append(1))
    cond = model.encode_prompts(PROMPTS)
    text_calls.clear()
    try:
        schedule = dataclasses.replace(build("unipc-bh2-o2", model.noise, 5), guidance=7.5)
        sample(model, schedule, _latents(), cond)
        unguided = sample(model, build("unipc-bh2-o2", model.noise, 5), _latents(), cond)
    finally:
        h1.remove()
        h2.remove()
    n = len(PROMPTS)
    assert batches == [2 * n] * 5 + [n] * 5 and unguided.nfe == 5 and not text_calls


def test_cond_forms(model):
    """Embeddings, a list of prompts (encoded once), one embedding for all, and None (the empty prompt)."""
    x = _latents()
    t = torch.tensor(0.7)
    emb = model.encode_prompts(PROMPTS)
    ref = model(x, t, emb, guidance=3.0)
    assert torch.equal(model(x, t, list(PROMPTS), guidance=3.0), ref)
    one = model(x, t, emb[:1])
    assert torch.equal(one, model(x, t, emb[:1].expand(len(PROMPTS), -1, -1)))
    assert torch.allclose(model(x, t, None), model(x, t, model.null_embedding), atol=1e-6)
    with pytest.raises(ModelError, match="prompt embeddings for a batch"):
        model(x, t, emb[:2])
    with pytest.raises(ModelError, match="expected"):
        model(x, t, emb[..., :8])
    with pytest.raises(ModelError, match="cond must be"):
        model(x, t, torch.zeros(len(PROMPTS), dtype=torch.long))


def test_skipping_units_changes_the_output(model):
    x, t, emb = _latents(), torch.tensor(0.5), model.encode_prompts(PROMPTS)
    full = model(x, t, emb, guidance=7.5)
    skipped = model(x, t, emb, skip=frozenset(model.units[:1]), guidance=7.5)
    assert skipped.shape == full.shape and not torch.allclose(skipped, full)
    assert torch.equal(model(x, t, emb, guidance=7.5), full)  # the patch is undone


def test_read_prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("  a photo of the cat \n\n\t\na red car\n   \n")
    assert read_prompts(f) == ["a photo of the cat", "a red car"]
    f.write_text("\n  \n")
    with pytest.raises(ModelError, match="no prompts"):
        read_prompts(f)
    with pytest.raises(ModelError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_load_errors(sd_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sd_dir, bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="no 'text_encoder' entry"):
        load_latent_pipeline_dir(bad)
    index["text_encoder"] = ["transformers", "CLIPTextModel"]
    (bad / "model_index.json").write_text(json.dumps(index))
    unet = json.loads((bad / "unet" / "config.json").read_text())
    unet["_class_name"] = "UNet2DModel"
    (bad / "unet" / "config.json").write_text(json.dumps(unet))
    assert not is_latent_pipeline_dir(bad)
    with pytest.raises(ModelError, match="not a UNet2DConditionModel"):
        load_latent_pipeline_dir(bad)
    with pytest.raises(ModelError, match="missing"):
        load_latent_pipeline_dir(tmp_path)


def _cli_has_prompts() -> bool:
    import inspect

    from autotune import cli

    return "prompts" in inspect.signature(cli.sample_cmd).parameters


@pytest.mark.skipif(not _cli_has_prompts(), reason="`autotune sample --prompts` is not wired in yet")
def test_cli_baseline_and_sample_with_prompts(sd_dir, tmp_path):
    """`autotune baseline --guidance 7.5` + `autotune sample --prompts FILE` reproduce the pipeline."""
    import numpy as np
    from typer.testing import CliRunner

    from autotune.cli import app

    runner = CliRunner()
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n")
    latents = _latents()
    np.save(tmp_path / "noise.npy", latents.numpy())
    sched_file, out = tmp_path / "s.json", tmp_path / "out.npy"
    for args in (["baseline", "unipc-bh2-o2", "--model", sd_dir, "--nfe", 8, "--guidance", 7.5, "--out", sched_file],
                 ["sample", "--model", sd_dir, "--schedule", sched_file, "--noise", tmp_path / "noise.npy",
                  "--prompts", prompts_file, "--out", out, "--png", tmp_path / "grid.png"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    ours = torch.from_numpy(np.load(out))
    pipe = _peer_pipeline(sd_dir, "unipc-bh2-o2", load_latent_pipeline_dir(sd_dir).scheduler_config)
    ref = _run_pipeline(pipe, PROMPTS, latents, 8, 7.5)
    assert (ours - ref).abs().max().item() <= TOL and (tmp_path / "grid.png").is_file()
    # one prompt for all samples; a count that fits neither is an error
    prompts_file.write_text("a red car\n")
    result = runner.invoke(app, [str(a) for a in ["sample", "--model", sd_dir, "--schedule", sched_file, "--prompts",
                                                  prompts_file, "--num", 2, "--out", out]])
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (2, 4, 8, 8)
    prompts_file.write_text("a red car\nthe dog\n")
    result = runner.invoke(app, [str(a) for a in ["sample", "--model", sd_dir, "--schedule", sched_file, "--prompts",
                                                  prompts_file, "--num", 3, "--out", out]])
    assert result.exit_code == 2 and "2 prompts for 3 samples" in result.output
