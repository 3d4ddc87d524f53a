"""Flux pipeline directories: our executor, on unpacked latents, reproduces diffusers' FluxPipeline.

The directory (tests/tiny_flux.py) is FluxPipeline.save_pretrained of random-weight parts; every comparison
runs the pipeline itself from the same (packed) latents and prompts, with output_type="latent", and unpacks
its result. The multistep peers (UniPC, DPM-Solver++ with use_flow_sigmas) cast their flow timesteps to int64,
so their runs here use a subclass whose timesteps are the float sigma x 1000 the solver steps from (the
truncation alone is measured in tests/test_flow.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autotune.errors import ModelError  # noqa: E402
from autotune.models.flux import (  # noqa: E402
    FluxDenoiser,
    PooledTextCondition,
    latent_image_ids,
    load_flux_pipeline_dir,
    pack_latents,
    unpack_latents,
)
from autotune.models.registry import load_model  # noqa: E402
from autotune.sampling.denoiser import Denoiser  # noqa: E402
from autotune.sampling.executor import sample  # noqa: E402
from autotune.sampling.named import build  # noqa: E402
from autotune.sampling.noise import FlowMatching  # noqa: E402
from tiny_flux import IMAGE, PROMPTS, SCHEDULER, load_flux_pipeline, make_tiny_flux_dir  # noqa: E402

TOL = 1e-4
LATENT = IMAGE // 2  # VAE factor 2


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return make_tiny_flux_dir(tmp_path_factory.mktemp("flux") / "tiny-flux-dev")


@pytest.fixture(scope="module")
def model(flux_dir):
    return load_model(str(flux_dir))


@pytest.fixture(scope="module")
def pipe(flux_dir):
    return load_flux_pipeline(flux_dir)


def _latents(n=len(PROMPTS), seed=1, dtype=torch.float32):
    return torch.randn(n, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _run(pipe, latents, nfe, prompts=PROMPTS, **kwargs):
    """The pipeline's final latents from our unpacked ``latents``, unpacked again."""
    with torch.no_grad():
        out = pipe(prompt=list(prompts), height=IMAGE, width=IMAGE, num_inference_steps=nfe,
                   latents=pack_latents(latents), output_type="latent", **kwargs).images
    return unpack_latents(out, LATENT, LATENT)


def _float_timesteps(cls):
    """``cls`` whose timesteps are the float sigma x N its sigmas give, instead of their int64 truncation."""
    class FloatTimesteps(cls):
        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            self.timesteps = (self.sigmas[:-1] * self.config.num_train_timesteps).to(torch.float32)

    return FloatTimesteps


def test_loads_through_the_registry(flux_dir, model, pipe):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from autotune.models.families import family_of

    assert family_of(flux_dir).name == "Flux"
    assert isinstance(model, FluxDenoiser) and isinstance(model, Denoiser)
    assert model.sample_shape == (4, LATENT, LATENT) and model.num_classes is None and model.guidance_embeds
    assert model.parameterization == "flow" and not model.round_time and model.module is model.transformer
    tokens = (LATENT // 2) ** 2  # what FluxPipeline's image_seq_len is at this resolution
    assert isinstance(model.noise, FlowMatching) and model.noise.pipeline_sigmas
    assert model.noise.mu == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15), abs=1e-12)
    assert model.noise.shift == SCHEDULER["shift"] and model.vae_scale_factor == 2
    for ours, theirs in ((model.transformer, pipe.transformer), (model.text_encoders[0], pipe.text_encoder),
                         (model.text_encoders[1], pipe.text_encoder_2)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in model.transformer.parameters())
    assert len(model.fingerprint()) == 16


def test_fingerprint(flux_dir, model, tmp_path):
    """Same files elsewhere: same fingerprint; other weights in any of the three networks, or another padded T5
    length: another."""
    copied = tmp_path / "copied"
    shutil.copytree(flux_dir, copied)
    assert load_flux_pipeline_dir(copied).fingerprint() == model.fingerprint()

    def variant(part=None, **kwargs):
        encoders = list(model.text_encoders)
        transformer = model.transformer
        if part == "transformer":
            transformer = copy.deepcopy(transformer)
            module = transformer
        elif part is not None:
            encoders[part] = copy.deepcopy(encoders[part])
            module = encoders[part]
        if part is not None:
            with torch.no_grad():
                next(module.parameters()).add_(1e-3)
        return FluxDenoiser(transformer, tuple(encoders), model.tokenizers, model.scheduler_config,
                            vae_config=model.vae_config, **kwargs).fingerprint()

    assert variant() == model.fingerprint()
    others = {variant("transformer"), variant(0), variant(1), variant(max_sequence_length=64)}
    assert len(others) == 4 and model.fingerprint() not in others


def test_prompt_embeddings_equal_encode_prompt(model, pipe):
    """T5 hidden states and CLIP pooled output exactly as FluxPipeline.encode_prompt (which its __call__ runs
    under no_grad); the null condition is the empty prompt's."""
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(list(PROMPTS), device="cpu")
        empty = pipe.encode_prompt([""], device="cpu")
    cond = model.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape == (len(PROMPTS), 512, 32) and cond.pooled_embeds.shape == (len(PROMPTS), 24)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled_embeds, pooled)
    assert torch.equal(model.null_condition.prompt_embeds, empty[0])
    assert torch.equal(model.null_condition.pooled_embeds, empty[1])
    assert text_ids.shape == (512, 3) and not text_ids.any()  # what the adapter feeds: zeros, one row per token


def test_packing_is_the_pipelines():
    from diffusers import FluxPipeline

    x = _latents(2)
    packed = FluxPipeline._pack_latents(x, 2, 4, LATENT, LATENT)
    assert torch.equal(pack_latents(x), packed)
    assert torch.equal(unpack_latents(packed, LATENT, LATENT), x)
    assert torch.equal(unpack_latents(packed, LATENT, LATENT), FluxPipeline._unpack_latents(packed, IMAGE, IMAGE, 2))
    assert torch.equal(latent_image_ids(3, 5), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))


@pytest.mark.parametrize("nfe,guidance", [(4, 3.5), (8, 5.0), (4, None)])
def test_flow_euler_equals_flux_pipeline(model, pipe, nfe, guidance):
    """flow-euler is the pipeline's own FlowMatchEuler run (sigmas linspace(1, 1/n, n), shifted by mu); the
    schedule's guidance is the distilled guidance scale (None: the pipeline's default, 3.5)."""
    latents = _latents()
    schedule = dataclasses.replace(build("flow-euler", model.noise, nfe), guidance=guidance)
    ours = sample(model, schedule, latents, model.encode_prompts(PROMPTS))
    ref = _run(pipe, latents, nfe, **({} if guidance is None else {"guidance_scale": guidance}))
    diff = (ours.sample - ref).abs().max().item()
    print(f"flow-euler nfe={nfe} guidance={guidance}: max abs diff {diff:.3g} (|ref| max {ref.abs().max():.3g})")
    assert ours.nfe == nfe and diff <= TOL


@pytest.mark.parametrize("name,cls_name,extra", [
    ("unipc-flow", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2}),
    ("dpmsolver++2m-flow", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
])
def test_multistep_flow_schedules_equal_the_pipeline_with_those_schedulers(flux_dir, model, name, cls_name, extra):
    """The pipeline with UniPC / DPM-Solver++ (use_flow_sigmas, its config's dynamic shifting: the pipeline passes
    no sigmas and its mu), their timesteps kept as floats."""
    import diffusers

    nfe = 5
    cls = _float_timesteps(getattr(diffusers, cls_name))
    scheduler = cls.from_config(model.scheduler_config, use_flow_sigmas=True, prediction_type="flow_prediction",
                                **extra)
    latents = _latents()
    ours = sample(model, dataclasses.replace(build(name, model.noise, nfe), guidance=3.5), latents,
                  model.encode_prompts(PROMPTS)).sample
    ref = _run(load_flux_pipeline(flux_dir, scheduler=scheduler), latents, nfe, guidance_scale=3.5)
    diff = (ours - ref).abs().max().item()
    # unpatched, the pipeline feeds the network int64-truncated timesteps (999, 863, 704, ...): ~3e-3 here
    plain = getattr(diffusers, cls_name).from_config(model.scheduler_config, use_flow_sigmas=True,
                                                     prediction_type="flow_prediction", **extra)
    truncated = (ours - _run(load_flux_pipeline(flux_dir, scheduler=plain), latents, nfe, guidance_scale=3.5))
    print(f"{name} nfe={nfe}: max abs diff {diff:.3g} (int64 timesteps: {truncated.abs().max().item():.3g})")
    assert diff <= TOL and truncated.abs().max().item() > diff


def test_true_cfg_on_a_schnell_layout(tmp_path):
    """Without a guidance embedding the schedule's guidance is true CFG against the empty prompt, in one batched
    forward: FluxPipeline(true_cfg_scale=g, negative_prompt="") runs the two halves separately."""
    path = make_tiny_flux_dir(tmp_path / "tiny-flux-schnell", seed=2, schnell=True)
    m = load_model(str(path))
    assert not m.guidance_embeds and m.noise.mu is None and m.noise.shift == 1.0 and m.noise.pipeline_sigmas
    batches = []
    hook = m.transformer.register_forward_hook(lambda mod, args, kw, out: batches.append(kw["hidden_states"].shape[0]),
                                               with_kwargs=True)
    latents, nfe = _latents(), 4
    try:
        ours = sample(m, dataclasses.replace(build("flow-euler", m.noise, nfe), guidance=4.0), latents,
                      m.encode_prompts(PROMPTS)).sample
        plain = sample(m, build("flow-euler", m.noise, nfe), latents, m.encode_prompts(PROMPTS)).sample
    finally:
        hook.remove()
    assert batches == [2 * len(PROMPTS)] * nfe + [len(PROMPTS)] * nfe
    pipe = load_flux_pipeline(path)
    diff = (ours - _run(pipe, latents, nfe, true_cfg_scale=4.0, negative_prompt="")).abs().max().item()
    print(f"true CFG 4.0 flow-euler nfe={nfe}: max abs diff {diff:.3g}")
    assert diff <= TOL
    assert (plain - _run(pipe, latents, nfe)).abs().max().item() <= TOL


def test_decode_equals_the_pipelines_images(model, pipe):
    latents = _latents()
    final = sample(model, dataclasses.replace(build("flow-euler", model.noise, 4), guidance=3.5), latents,
                   model.encode_prompts(PROMPTS)).sample
    images = model.decode(final)
    assert images.shape == (len(PROMPTS), 3, IMAGE, IMAGE) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        ref = pipe(prompt=list(PROMPTS), height=IMAGE, width=IMAGE, num_inference_steps=4, guidance_scale=3.5,
                   latents=pack_latents(latents), output_type="pt").images  # postprocessed to [0, 1]
    assert (images / 2 + 0.5 - ref).abs().max().item() <= TOL


def test_cond_forms_and_bad_conditions(model):
    """A condition, a list of prompts (encoded once), one condition for all, None (the empty prompt); a wrong
    condition or latent shape is one ModelError line."""
    x, t = _latents(), torch.tensor(0.7)
    cond = model.encode_prompts(PROMPTS)
    ref = model(x, t, cond, guidance=3.5)
    assert torch.equal(model(x, t, list(PROMPTS), guidance=3.5), ref)
    assert torch.equal(model(x, t, cond[:1]), model(x, t, PooledTextCondition(
        cond.prompt_embeds[:1].expand(len(PROMPTS), -1, -1), cond.pooled_embeds[:1].expand(len(PROMPTS), -1))))
    assert torch.equal(model(x, t, None), model(x, t, model.null_condition))
    assert len(cond) == len(PROMPTS) and cond[1:3].pooled_embeds.shape == (2, 24)
    cases = [
        (lambda: model(x, t, cond[:2]), "2 prompt conditions for a batch of 4"),
        (lambda: model(x, t, PooledTextCondition(cond.prompt_embeds[..., :8], cond.pooled_embeds)), "expected"),
        (lambda: model(x, t, torch.zeros(len(PROMPTS), dtype=torch.long)), "cond must be"),
        (lambda: model(x[:, :, :7], t, cond), "H and W even"),
        (lambda: model(x[:, :3], t, cond), "expected"),
        (lambda: PooledTextCondition(cond.prompt_embeds, cond.pooled_embeds[:2]), "batch sizes differ .prompt_embeds 4, pooled_embeds 2."),
        (lambda: model.encode_prompts([]), "non-empty"),
    ]
    for call, match in cases:
        with pytest.raises(ModelError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def _edited(flux_dir, tmp_path, part, edit):
    """A copy of the directory with one JSON file edited (no weights change)."""
    bad = tmp_path / "bad"
    if bad.exists():
        shutil.rmtree(bad)
    shutil.copytree(flux_dir, bad)
    path = bad / part
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return bad


@pytest.mark.parametrize("part,edit,match", [
    ("model_index.json", lambda d: d.update(text_encoder_2=[None, None]), "no 'text_encoder_2' entry"),
    ("model_index.json", lambda d: d.update(tokenizer_2=["transformers", "GPT2Tokenizer"]), "GPT2Tokenizer is not"),
    ("transformer/config.json", lambda d: d.update(patch_size=2), "patch_size 2"),
    ("transformer/config.json", lambda d: d.update(in_channels=8), "in_channels 8 is not 4 x"),
    ("transformer/config.json", lambda d: d.update(out_channels=8), "out_channels 8"),
    ("scheduler/scheduler_config.json",
     lambda d: d.update(_class_name="DDPMScheduler", use_dynamic_shifting=False, beta_schedule="linear"),
     "not a flow-matching scheduler"),
    ("scheduler/scheduler_config.json", lambda d: d.update(base_shift="x"), "base_shift"),
    ("vae/config.json", lambda d: d.update(sample_size=3), "height 3"),
    ("vae/config.json", lambda d: d.update(latent_channels="x"), "latent_channels 'x'"),
    ("transformer/config.json", lambda d: d.update(pooled_projection_dim=16), "cannot load FluxTransformer2DModel"),
])
def test_bad_directories_are_one_line(flux_dir, tmp_path, part, edit, match):
    bad = _edited(flux_dir, tmp_path, part, edit)
    with pytest.raises(ModelError, match=match) as info:
        load_model(str(bad))
    assert "\n" not in str(info.value)


def test_broken_tokenizer_and_weights_are_one_line(flux_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(flux_dir, bad)
    (bad / "tokenizer_2" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer_2: cannot load") as info:
        load_model(str(bad))
    assert "\n" not in str(info.value)
    shutil.rmtree(bad)
    shutil.copytree(flux_dir, bad)
    (bad / "text_encoder_2" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="text_encoder_2: cannot load") as info:
        load_model(str(bad))
    assert "\n" not in str(info.value)


def test_cli_baseline_and_sample_with_prompts(flux_dir, pipe, tmp_path):
    """`autotune baseline flow-euler --guidance 3.5` + `autotune sample --prompts FILE` reproduce the pipeline."""
    from typer.testing import CliRunner

    from autotune.cli import app

    runner = CliRunner()
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    latents = _latents()
    np.save(tmp_path / "noise.npy", latents.numpy())
    sched_file, out = tmp_path / "s.json", tmp_path / "out.npy"
    for args in (["baseline", "flow-euler", "--model", flux_dir, "--nfe", 4, "--guidance", 3.5, "--out", sched_file],
                 ["sample", "--model", flux_dir, "--schedule", sched_file, "--noise", tmp_path / "noise.npy",
                  "--prompts", prompts_file, "--out", out, "--png", tmp_path / "grid.png"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    ours = torch.from_numpy(np.load(out))
    diff = (ours - _run(pipe, latents, 4, guidance_scale=3.5)).abs().max().item()
    print(f"CLI flow-euler nfe=4 guidance=3.5: max abs diff {diff:.3g}")
    assert diff <= TOL and (tmp_path / "grid.png").stat().st_size > 0


def test_cli_search_writes_a_schedule(flux_dir, tmp_path, monkeypatch):
    """A small search on the tiny Flux directory runs end to end (evaluation sets sample the empty prompt, at the
    default distilled guidance 3.5) and writes a schedule."""
    from typer.testing import CliRunner

    from autotune.cli import app
    from autotune.evaluate import ids
    from autotune.space.fileformat import load

    # the closing report-set table has no size flag (1024 samples); 4 keeps its reference solve to seconds here
    monkeypatch.setitem(ids.DEFAULT_SIZE, "report", 4)
    out = tmp_path / "searched.json"
    args = ["search", "--model", flux_dir, "--nfe", 4, "--refine", 2, "--method", "random", "--budget", 3, "--batch", 3,
            "--workers", 0, "--set-size", 4, "--validate", 0, "--no-cache", "--out", out]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    schedule = load(out)
    assert schedule.nfe == 4 and schedule.metadata["model_fingerprint"]


def test_autotune_scheduler_in_flux_pipeline_equals_the_executor(model, pipe):
    """AutotuneScheduler as pipe.scheduler replays a schedule exactly as our executor runs it (the pipeline passes
    its default sigmas and mu, which the scheduler accepts; it steps the packed latents, which commutes)."""
    from autotune.diffusers_scheduler import AutotuneScheduler

    own = pipe.scheduler
    latents, cond = _latents(), model.encode_prompts(PROMPTS)
    try:
        for name, nfe in (("flow-euler", 4), ("unipc-flow", 5), ("dpmsolver++2m-flow", 6)):
            schedule = dataclasses.replace(build(name, model.noise, nfe), guidance=3.5)
            pipe.scheduler = AutotuneScheduler.from_schedule(schedule, own.config)
            diff = (sample(model, schedule, latents, cond).sample - _run(pipe, latents, nfe, guidance_scale=3.5))
            print(f"AutotuneScheduler {name} nfe={nfe}: max abs diff {diff.abs().max().item():.3g}")
            assert diff.abs().max().item() <= TOL
    finally:
        pipe.scheduler = own
