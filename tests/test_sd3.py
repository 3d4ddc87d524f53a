"""SD3 pipeline directories: our executor reproduces diffusers' StableDiffusion3Pipeline.

The tiny directories (tests/tiny_sd3.py) are written by ``StableDiffusion3Pipeline.save_pretrained`` with random
weights; one has the T5 encoder, one leaves it out (zero T5 embeddings). flow-euler is compared with the
pipeline as it is (its own FlowMatchEuler scheduler); unipc-flow and dpmsolver++2m-flow with the pipeline's
scheduler replaced by UniPC / DPM-Solver++ with ``use_flow_sigmas``, and the transformer fed the float
timestep sigma x 1000 (those schedulers cast their flow timesteps to int64; see tests/test_flow.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autotune.errors import ModelError  # noqa: E402
from autotune.models.registry import load_model  # noqa: E402
from autotune.models.conditions import PooledTextCondition as SD3Condition
from autotune.models.sd3 import SD3Denoiser, load_sd3_pipeline_dir  # noqa: E402
from autotune.sampling.denoiser import Denoiser  # noqa: E402
from autotune.sampling.executor import sample  # noqa: E402
from autotune.sampling.named import build  # noqa: E402
from autotune.sampling.noise import FlowMatching  # noqa: E402
from tiny_sd3 import IMAGE, PROMPTS, SHIFT, load_sd3_pipeline, make_tiny_sd3_dir  # noqa: E402

TOL = 1e-4
EMBED_SHAPE = (272, 48)  # 16 CLIP + 256 T5 tokens, joint_attention_dim 48


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return make_tiny_sd3_dir(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def no_t5_dir(tmp_path_factory):
    return make_tiny_sd3_dir(tmp_path_factory.mktemp("sd3") / "tiny-sd3-no-t5", seed=1, without_t5=True)


@pytest.fixture(scope="module")
def model(sd3_dir):
    return load_model(str(sd3_dir))


@pytest.fixture(scope="module")
def pipe(sd3_dir):
    return load_sd3_pipeline(sd3_dir)


def _latents(n=len(PROMPTS), seed=1):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _run_pipeline(pipe, latents, nfe, guidance, prompts=PROMPTS, output_type="latent"):
    with torch.no_grad():
        return pipe(prompt=list(prompts), height=IMAGE, width=IMAGE, num_inference_steps=nfe, guidance_scale=guidance,
                    latents=latents.clone(), output_type=output_type).images


def _ours(model, name, nfe, guidance, latents, cond):
    schedule = build(name, model.noise, nfe)
    if guidance is not None:
        schedule = dataclasses.replace(schedule, guidance=guidance)
    result = sample(model, schedule, latents, cond)
    assert result.nfe == nfe
    return result.sample


def test_loads_as_an_sd3_flow_model(sd3_dir, model, pipe):
    """load_model dispatches the directory to models/sd3.py; the weights are the pipeline's."""
    assert isinstance(model, SD3Denoiser) and isinstance(model, Denoiser)
    assert model.sample_shape == (4, 8, 8) and model.num_classes is None and model.module is model.transformer
    assert model.parameterization == "flow" and not model.round_time and model.t5 is not None
    assert isinstance(model.noise, FlowMatching) and model.noise.shift == SHIFT and model.noise.mu is None
    assert model.image_seq_len == 16 and model.vae_scale_factor == 4
    assert not any(p.requires_grad for p in model.transformer.parameters())
    for ours, theirs in ((model.transformer, pipe.transformer), (model.text_encoders[1], pipe.text_encoder_2),
                         (model.t5, pipe.text_encoder_3)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(model.fingerprint()) == 16


def test_fingerprint(sd3_dir, model, tmp_path):
    """Same weights elsewhere: same fingerprint; another transformer, CLIP or T5 weight, or T5 vocab: another."""
    copy = tmp_path / "copied"
    shutil.copytree(sd3_dir, copy)
    fresh = load_sd3_pipeline_dir(copy)
    assert fresh.fingerprint() == model.fingerprint()
    for module in (fresh.transformer, fresh.text_encoders[1], fresh.t5):
        other = load_sd3_pipeline_dir(copy)
        with torch.no_grad():
            next({fresh.transformer: other.transformer, fresh.text_encoders[1]: other.text_encoders[1],
                  fresh.t5: other.t5}[module].parameters()).add_(1e-3)
        assert other.fingerprint() != model.fingerprint()
    tok = json.loads((copy / "tokenizer_3" / "tokenizer.json").read_text())
    tok["model"]["vocab"][5][1] -= 1.0  # a Unigram score: same pieces, another segmentation
    (copy / "tokenizer_3" / "tokenizer.json").write_text(json.dumps(tok))
    assert load_sd3_pipeline_dir(copy).fingerprint() != model.fingerprint()


@pytest.mark.parametrize("with_t5", [True, False])
def test_prompt_embeddings_match_encode_prompt(request, with_t5):
    """encode_prompts and the null condition are the pipeline's prompt and default negative ("") embeddings."""
    path = request.getfixturevalue("sd3_dir" if with_t5 else "no_t5_dir")
    model = request.getfixturevalue("model") if with_t5 else load_model(str(path))
    pipe = request.getfixturevalue("pipe") if with_t5 else load_sd3_pipeline(path)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(list(PROMPTS), None, None, device="cpu")
    ours = model.encode_prompts(PROMPTS)
    assert ours.prompt_embeds.shape == (len(PROMPTS), *EMBED_SHAPE) and ours.pooled_embeds.shape == (len(PROMPTS), 32)
    assert torch.equal(ours.prompt_embeds, embeds) and torch.equal(ours.pooled_embeds, pooled)
    # the pipeline encodes B copies of "" in one batch, we encode one: equal up to batched-matmul rounding
    null = model.null_condition.expand(len(PROMPTS))
    assert (null.prompt_embeds - neg).abs().max().item() <= 1e-6
    assert (null.pooled_embeds - neg_pooled).abs().max().item() <= 1e-6
    t5_part = ours.prompt_embeds[:, 16:]
    assert bool((t5_part == 0).all()) != with_t5  # zeros exactly when there is no T5


@pytest.mark.parametrize("guidance", [None, 5.0])
@pytest.mark.parametrize("nfe", [4, 7])
def test_flow_euler_equals_the_pipeline(model, pipe, nfe, guidance):
    """The pipeline as shipped (FlowMatchEuler, shift 3, sigma x 1000 timesteps): guided (one batched forward
    of [cond, null]) and unguided (guidance_scale 1 skips CFG in the pipeline)."""
    latents = _latents()
    ours = _ours(model, "flow-euler", nfe, guidance, latents, model.encode_prompts(PROMPTS))
    ref = _run_pipeline(pipe, latents, nfe, guidance or 1.0)
    diff = (ours - ref).abs().max().item()
    print(f"flow-euler nfe={nfe} guidance={guidance}: max abs diff {diff:.3g} (|ref| max {ref.abs().max():.3g})")
    assert torch.isfinite(ref).all() and diff <= TOL


class _FloatTimesteps:
    """Feeds the transformer sigma_k x 1000 as a float instead of the int64 timestep the multistep schedulers
    give with use_flow_sigmas (the network input is what differs, not the solver: tests/test_flow.py)."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __enter__(self):
        def hook(module, args, kwargs):
            sigma = self.pipe.scheduler.sigmas[self.calls]
            self.calls += 1
            return args, {**kwargs, "timestep": (sigma * 1000).expand(kwargs["timestep"].shape[0])}

        self.handle = self.pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("name,cls_name,extra", [
    ("unipc-flow", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2}),
    ("dpmsolver++2m-flow", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
])
def test_multistep_flow_schedules_equal_the_pipeline_with_that_scheduler(model, pipe, name, cls_name, extra):
    import diffusers

    latents, nfe, guidance = _latents(), 5, 5.0
    ours = _ours(model, name, nfe, guidance, latents, model.encode_prompts(PROMPTS))
    own = pipe.scheduler
    try:
        pipe.scheduler = getattr(diffusers, cls_name)(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                      flow_shift=SHIFT, **extra)
        with _FloatTimesteps(pipe) as patch:
            ref = _run_pipeline(pipe, latents, nfe, guidance)
        assert patch.calls == nfe
        truncated = _run_pipeline(pipe, latents, nfe, guidance)  # diffusers as it is: int64 timesteps
    finally:
        pipe.scheduler = own
    diff = (ours - ref).abs().max().item()
    print(f"{name} nfe={nfe} guidance={guidance}: max abs diff {diff:.3g} with float timesteps, "
          f"{(ours - truncated).abs().max().item():.3g} with diffusers' int64 ones")
    assert diff <= TOL


def test_dynamic_shifting_takes_mu_from_the_image_tokens(sd3_dir, tmp_path):
    """use_dynamic_shifting: mu from (H / patch) x (W / patch) of the default latents, as the pipeline's."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    path = tmp_path / "dynamic"
    shutil.copytree(sd3_dir, path)
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64, base_shift=0.3, max_shift=1.4)
    config_file.write_text(json.dumps(config))
    model = load_model(str(path))
    assert model.noise.mu == pytest.approx(calculate_shift(16, 4, 64, 0.3, 1.4), abs=1e-12)
    latents = _latents()
    ours = _ours(model, "flow-euler", 5, 5.0, latents, model.encode_prompts(PROMPTS))
    diff = (ours - _run_pipeline(load_sd3_pipeline(path), latents, 5, 5.0)).abs().max().item()
    print(f"flow-euler dynamic shift nfe=5 guidance=5: max abs diff {diff:.3g}")
    assert diff <= TOL


def test_without_t5_equals_the_pipeline(no_t5_dir):
    model = load_model(str(no_t5_dir))
    assert model.t5 is None and model.t5_tokenizer is None
    latents = _latents(seed=2)
    ours = _ours(model, "flow-euler", 4, 5.0, latents, list(PROMPTS))
    diff = (ours - _run_pipeline(load_sd3_pipeline(no_t5_dir), latents, 4, 5.0)).abs().max().item()
    print(f"no T5, flow-euler nfe=4 guidance=5: max abs diff {diff:.3g}")
    assert diff <= TOL


def test_decode_matches_pipeline_images(model, pipe):
    """decode(latents) is the pipeline's VAE decode (latents / scaling_factor + shift_factor), in [-1, 1]."""
    latents = _latents()
    images = model.decode(_ours(model, "flow-euler", 4, 5.0, latents, model.encode_prompts(PROMPTS)))
    assert images.shape == (len(PROMPTS), 3, IMAGE, IMAGE) and images.min() >= -1 and images.max() <= 1
    ref = _run_pipeline(pipe, latents, 4, 5.0, output_type="pt")  # postprocessed to [0, 1]
    assert (images / 2 + 0.5 - ref).abs().max().item() <= TOL


def test_guided_call_is_one_batched_transformer_forward(model):
    """Guidance doubles the batch of ONE transformer forward per model call; no text encoder runs in the loop."""
    batches, text_calls = [], []
    hooks = [model.transformer.register_forward_hook(lambda mod, args, kw, out: batches.append(kw["hidden_states"]
                                                                                             .shape[0]),
                                                     with_kwargs=True)]
    hooks += [enc.register_forward_hook(lambda *a: text_calls.append(1)) for enc in (*model.text_encoders, model.t5)]
    cond = model.encode_prompts(PROMPTS)
    text_calls.clear()
    try:
        _ours(model, "unipc-flow", 4, 5.0, _latents(), cond)
        _ours(model, "unipc-flow", 4, None, _latents(), cond)
    finally:
        for h in hooks:
            h.remove()
    n = len(PROMPTS)
    assert batches == [2 * n] * 4 + [n] * 4 and not text_calls


def test_cond_forms(model):
    """An SD3Condition, a list of prompts (encoded once), one condition for all, None (the empty prompt)."""
    x, t = _latents(), torch.tensor(0.7)
    cond = model.encode_prompts(PROMPTS)
    ref = model(x, t, cond, guidance=3.0)
    assert torch.equal(model(x, t, list(PROMPTS), guidance=3.0), ref)
    assert torch.equal(model(x, t, cond[1]), model(x, t, cond[1].expand(len(PROMPTS))))
    assert torch.allclose(model(x, t, None), model(x, t, model.null_condition), atol=1e-6)
    assert len(cond[:2]) == 2 and torch.equal(cond[torch.tensor([3])].pooled_embeds, cond.pooled_embeds[3:])
    with pytest.raises(ModelError, match="2 prompt conditions for a batch of 4"):
        model(x, t, cond[:2])
    with pytest.raises(ModelError, match="expected"):
        model(x, t, SD3Condition(cond.prompt_embeds[..., :8], cond.pooled_embeds))
    with pytest.raises(ModelError, match="cond must be a PooledTextCondition"):
        model(x, t, cond.prompt_embeds)
    with pytest.raises(ModelError, match="batch sizes differ"):
        SD3Condition(cond.prompt_embeds, cond.pooled_embeds[:1])


def _edit_json(path, **changes):
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit,match", [
    (lambda p: _edit_json(p / "model_index.json", text_encoder_2=[None, None]), "no 'text_encoder_2' entry"),
    (lambda p: _edit_json(p / "model_index.json", tokenizer_3=[None, None]), "text_encoder_3 and tokenizer_3"),
    (lambda p: _edit_json(p / "model_index.json", text_encoder=["transformers", "CLIPTextModel"]),
     "CLIPTextModel is not supported"),
    (lambda p: (p / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear"})),
     "not a flow-matching scheduler"),
    (lambda p: _edit_json(p / "transformer" / "config.json", pooled_projection_dim=40),
     "cannot load SD3Transformer2DModel"),
    (lambda p: _edit_json(p / "text_encoder_3" / "config.json", d_model=40), "cannot load T5EncoderModel"),
    (lambda p: (p / "tokenizer_3" / "tokenizer.json").write_text("{"), "tokenizer_3"),
])
def test_load_errors_are_one_line(sd3_dir, tmp_path, edit, match):
    bad = tmp_path / "bad"
    shutil.copytree(sd3_dir, bad)
    edit(bad)
    with pytest.raises(ModelError, match=match) as info:
        load_model(str(bad))
    assert "\n" not in str(info.value)


def test_parts_that_do_not_fit_are_one_line(model):
    """Encoders whose widths the transformer cannot take, a T5 without its tokenizer, a bad T5 length."""
    enc, tok = model.text_encoders[0], model.tokenizers[0]
    cases = [
        (dict(text_encoders=(enc, enc), tokenizers=(tok, tok)), "CLIP projections add up to 24"),
        (dict(t5=model.t5), "T5 text encoder and its tokenizer come together"),
        (dict(max_sequence_length=513), "max_sequence_length"),
    ]
    for changes, match in cases:
        kwargs = {"transformer": model.transformer, "text_encoders": model.text_encoders,
                  "tokenizers": model.tokenizers, "scheduler_config": model.scheduler_config, **changes}
        with pytest.raises(ModelError, match=match) as info:
            SD3Denoiser(**kwargs)
        assert "\n" not in str(info.value)


def test_cli_baseline_and_sample_with_prompts_equal_the_pipeline(sd3_dir, pipe, tmp_path):
    """`autotune baseline flow-euler --nfe 4 --guidance 5` + `autotune sample --prompts FILE`."""
    from typer.testing import CliRunner

    from autotune.cli import app

    runner = CliRunner()
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    latents = _latents(seed=3)
    np.save(tmp_path / "noise.npy", latents.numpy())
    sched_file, out = tmp_path / "s.json", tmp_path / "out.npy"
    for args in (["baseline", "flow-euler", "--model", sd3_dir, "--nfe", 4, "--guidance", 5, "--out", sched_file],
                 ["sample", "--model", sd3_dir, "--schedule", sched_file, "--noise", tmp_path / "noise.npy",
                  "--prompts", prompts_file, "--out", out, "--png", tmp_path / "grid.png"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    diff = (torch.from_numpy(np.load(out)) - _run_pipeline(pipe, latents, 4, 5.0)).abs().max().item()
    print(f"CLI flow-euler nfe=4 guidance=5: max abs diff {diff:.3g}")
    assert diff <= TOL and (tmp_path / "grid.png").is_file()


def test_cli_search_writes_a_schedule(sd3_dir, tmp_path, monkeypatch):
    """`autotune search --model SD3_DIR --nfe 4` (random search, a small budget and set) writes a schedule; stage 2
    with ``--reuse`` searches which transformer blocks each step reuses (every candidate within the latency budget
    or the unpruned schedule kept)."""
    from typer.testing import CliRunner

    from autotune.cli import app
    from autotune.evaluate import ids
    from autotune.space.fileformat import load

    # the closing report-set table has no size flag (1024 samples, minutes here); 8 keeps it to seconds
    monkeypatch.setitem(ids.DEFAULT_SIZE, "report", 8)

    out = tmp_path / "searched.json"
    args = ["search", "--model", sd3_dir, "--nfe", 4, "--method", "random", "--budget", 8, "--workers", 0,
            "--refine", 2, "--no-cache", "--set-size", 4, "--validate", 0, "--guidance", 5,
            "--stage2-budget", 6, "--reuse", "--out", out]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "stage 2" in result.output
    schedule = load(out)
    assert schedule.nfe == 4 and schedule.guidance == 5
    assert set(schedule.units_reused) <= {"transformer_blocks.0", "transformer_blocks.1"}


def _searched_like(noise):
    """A schedule no diffusers scheduler makes: UniPC-flow times moved, orders and correctors mixed."""
    base = build("unipc-flow", noise, 5)
    times = [0.92, 0.71, 0.44, 0.2, 0.0]
    steps = tuple(dataclasses.replace(s, t=t) for s, t in zip(base.steps, times))
    return dataclasses.replace(base, steps=steps, name="searched-like")


@pytest.mark.parametrize("which", ["flow-euler", "unipc-flow", "searched"])
def test_autotune_scheduler_in_the_sd3_pipeline_equals_sample(model, pipe, which):
    """StableDiffusion3Pipeline with AutotuneScheduler swapped in (the pipeline's CFG, timesteps and step calls)
    ends where our executor ends, guided."""
    from autotune.diffusers_scheduler import AutotuneScheduler

    schedule = _searched_like(model.noise) if which == "searched" else build(which, model.noise, 5)
    schedule = dataclasses.replace(schedule, guidance=5.0)
    latents = _latents(seed=4)
    own = pipe.scheduler
    try:
        pipe.scheduler = AutotuneScheduler.from_schedule(schedule, own.config)
        theirs = _run_pipeline(pipe, latents, schedule.nfe, 5.0)
    finally:
        pipe.scheduler = own
    ours = sample(model, schedule, latents, model.encode_prompts(PROMPTS)).sample
    diff = (theirs - ours).abs().max().item()
    print(f"SD3 AutotuneScheduler {which} NFE 5 guidance 5: max abs diff {diff:.3g}")
    assert torch.isfinite(theirs).all() and diff <= TOL
