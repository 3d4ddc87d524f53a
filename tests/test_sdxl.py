"""SDXL pipeline directories: our executor, CLI and diffusers scheduler reproduce StableDiffusionXLPipeline."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autotune.errors import ModelError  # noqa: E402
from autotune.models.registry import load_model  # noqa: E402
from autotune.models.sdxl import SDXLCondition, SDXLDenoiser, load_sdxl_pipeline_dir  # noqa: E402
from autotune.sampling.denoiser import Denoiser  # noqa: E402
from autotune.sampling.executor import sample  # noqa: E402
from autotune.sampling.named import build  # noqa: E402
from autotune.sampling.noise import VPDiscrete  # noqa: E402
from peers import PEERS  # noqa: E402
from tiny_sd import PROMPTS  # noqa: E402
from tiny_sdxl import IMAGE, load_sdxl_pipeline, make_tiny_sdxl_dir  # noqa: E402

TOL = 1e-4
EMBED, POOLED = 32 + 24, 16  # tests/tiny_sdxl.py: encoder widths 32 + 24, projection 16


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return make_tiny_sdxl_dir(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def encoded_null_dir(sdxl_dir, tmp_path_factory):
    """The same directory with ``force_zeros_for_empty_prompt: false``: the null condition is the encoded ""."""
    copy = tmp_path_factory.mktemp("sdxl-null") / "tiny-sdxl"
    shutil.copytree(sdxl_dir, copy)
    _edit_json(copy / "model_index.json", force_zeros_for_empty_prompt=False)
    return copy


@pytest.fixture(scope="module")
def model(sdxl_dir):
    return load_model(str(sdxl_dir))


def _edit_json(path, **changes):
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _latents(n=len(PROMPTS), seed=1, dtype=torch.float32):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _peer_pipeline(path, name, scheduler_config, dtype=torch.float32):
    import diffusers

    cls_name, kwargs = PEERS[name]
    scheduler = getattr(diffusers, cls_name).from_config(scheduler_config, **kwargs)
    return load_sdxl_pipeline(path, scheduler=scheduler, dtype=dtype)


def _run_pipeline(pipe, prompts, latents, nfe, guidance, output_type="latent"):
    """The pipeline at its default resolution (so its time ids are the defaults ours use)."""
    with torch.no_grad():
        return pipe(prompt=list(prompts), num_inference_steps=nfe, guidance_scale=guidance, latents=latents.clone(),
                    output_type=output_type).images


def test_loads_through_the_registry(sdxl_dir, model):
    """load_model dispatches the directory to the SDXL family; every part is the pipeline's."""
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert isinstance(model, Denoiser) and isinstance(model, SDXLDenoiser)
    assert model.sample_shape == (4, 8, 8) and model.num_classes is None and model.module is model.unet
    assert model.parameterization == "epsilon" and model.vae_scale_factor == 4 and model.default_size == (IMAGE, IMAGE)
    assert model.units and all(u in dict(model.unet.named_modules()) for u in model.units)
    config = json.loads((sdxl_dir / "scheduler" / "scheduler_config.json").read_text())
    assert isinstance(model.noise, VPDiscrete)
    assert torch.equal(torch.tensor(model.noise.alphas_cumprod),
                       torch.tensor(VPDiscrete.from_diffusers_config(config).alphas_cumprod))
    pipe = load_sdxl_pipeline(sdxl_dir)
    pairs = ((model.unet, pipe.unet), (model.text_encoders[0], pipe.text_encoder),
             (model.text_encoders[1], pipe.text_encoder_2))
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not any(p.requires_grad for p in ours.parameters())
    assert [t.pad_token for t in model.tokenizers] == ["<|endoftext|>", "!"]
    assert len(model.fingerprint()) == 16


def test_fingerprint(sdxl_dir, model, encoded_null_dir, tmp_path):
    """Same weights elsewhere: same fingerprint; other weights in any network, another tokenizer or another null
    condition: another."""
    copy = tmp_path / "copied"
    shutil.copytree(sdxl_dir, copy)
    assert load_sdxl_pipeline_dir(copy).fingerprint() == model.fingerprint()
    for network in ("unet", "text_encoders"):
        fresh = load_sdxl_pipeline_dir(copy)
        module = fresh.unet if network == "unet" else fresh.text_encoders[1]
        with torch.no_grad():
            next(module.parameters()).add_(1e-3)
        assert fresh.fingerprint() != model.fingerprint(), network
    _edit_json(copy / "tokenizer_2" / "tokenizer_config.json", pad_token="<|endoftext|>")
    assert load_sdxl_pipeline_dir(copy).fingerprint() != model.fingerprint()
    assert load_sdxl_pipeline_dir(encoded_null_dir).fingerprint() != model.fingerprint()


def test_condition_matches_encode_prompt(sdxl_dir, model, encoded_null_dir):
    """Prompt embeddings, pooled embeddings and time ids are the pipeline's; so is the null condition, zeros
    with force_zeros_for_empty_prompt and the encoded "" without."""
    pipe = load_sdxl_pipeline(sdxl_dir)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(list(PROMPTS), device="cpu")
    cond = model.encode_prompts(PROMPTS)
    assert isinstance(cond, SDXLCondition) and len(cond) == len(PROMPTS)
    assert cond.prompt_embeds.shape == (len(PROMPTS), 16, EMBED) and cond.pooled_embeds.shape == (len(PROMPTS), POOLED)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled_embeds, pooled)
    time_ids = pipe._get_add_time_ids((IMAGE, IMAGE), (0, 0), (IMAGE, IMAGE), dtype=embeds.dtype,
                                      text_encoder_projection_dim=POOLED)
    assert torch.equal(cond.time_ids, time_ids.expand(len(PROMPTS), -1))
    assert cond.time_ids[0].tolist() == [IMAGE, IMAGE, 0, 0, IMAGE, IMAGE]
    null = model.null_condition
    assert len(null) == 1 and not null.prompt_embeds.any() and not null.pooled_embeds.any()
    assert not negative.any() and not negative_pooled.any() and torch.equal(null.time_ids, time_ids)
    # without force_zeros: the encoded "" (the pipeline encodes B copies in one batch, we one: batched rounding)
    encoded = load_sdxl_pipeline_dir(encoded_null_dir)
    pipe = load_sdxl_pipeline(encoded_null_dir)
    assert pipe.config.force_zeros_for_empty_prompt is False and not encoded.force_zeros_for_empty_prompt
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt(list(PROMPTS), device="cpu")
    null = encoded.null_condition
    assert negative.abs().max() > 0.1
    assert (null.prompt_embeds.expand_as(negative) - negative).abs().max().item() <= 1e-6
    assert (null.pooled_embeds.expand_as(negative_pooled) - negative_pooled).abs().max().item() <= 1e-6


# diffusers' DDIM steps by num_train_timesteps // NFE, which lands on its own grid only for NFEs dividing 1000
CASES = [("ddim", 5), ("ddim", 8), ("dpmsolver++2m", 6), ("unipc-bh2-o2", 6), ("dpmsolver++2m", 9)]


@pytest.mark.parametrize("guidance", [5.0, None])
@pytest.mark.parametrize("name,nfe", CASES)
def test_executor_matches_sdxl_pipeline(sdxl_dir, model, name, nfe, guidance):
    """Same latents, prompts and peer scheduler: our final latents are StableDiffusionXLPipeline's to 1e-4
    (guided, and unguided = the pipeline at guidance_scale 1, which skips classifier-free guidance)."""
    latents = _latents()
    schedule = build(name, model.noise, nfe)
    if guidance is not None:
        schedule = dataclasses.replace(schedule, guidance=guidance)
    result = sample(model, schedule, latents, model.encode_prompts(PROMPTS))
    assert result.nfe == nfe
    ref = _run_pipeline(_peer_pipeline(sdxl_dir, name, model.scheduler_config), PROMPTS, latents, nfe, guidance or 1.0)
    assert torch.isfinite(ref).all() and ref.shape == result.sample.shape
    diff = (result.sample - ref).abs().max().item()
    print(f"SDXL {name} nfe={nfe} guidance={guidance}: max abs diff {diff:.3g} (|ref| max {ref.abs().max().item():.3g})")
    assert diff <= TOL


def test_encoded_null_condition_matches_pipeline(encoded_null_dir):
    """Without force_zeros the guided pipeline's negative half is the encoded "": so is ours."""
    m = load_sdxl_pipeline_dir(encoded_null_dir)
    latents = _latents()
    schedule = dataclasses.replace(build("unipc-bh2-o2", m.noise, 6), guidance=5.0)
    ours = sample(m, schedule, latents, list(PROMPTS)).sample  # prompt strings: encoded once by the model
    ref = _run_pipeline(_peer_pipeline(encoded_null_dir, "unipc-bh2-o2", m.scheduler_config), PROMPTS, latents, 6, 5.0)
    diff = (ours - ref).abs().max().item()
    print(f"SDXL encoded null unipc-bh2-o2 nfe=6 guidance=5: max abs diff {diff:.3g}")
    assert diff <= TOL


def test_decode_matches_pipeline_images(sdxl_dir, model):
    """decode(latents) = the pipeline's VAE decode (scaling_factor from the VAE config), in [-1, 1]."""
    latents = _latents()
    schedule = dataclasses.replace(build("dpmsolver++2m", model.noise, 5), guidance=5.0)
    images = model.decode(sample(model, schedule, latents, model.encode_prompts(PROMPTS)).sample)
    assert images.shape == (len(PROMPTS), 3, IMAGE, IMAGE) and images.min() >= -1 and images.max() <= 1
    ref = _run_pipeline(_peer_pipeline(sdxl_dir, "dpmsolver++2m", model.scheduler_config), PROMPTS, latents, 5, 5.0,
                        output_type="pt")  # postprocessed to [0, 1]
    assert (images / 2 + 0.5 - ref).abs().max().item() <= TOL


def test_guided_call_is_one_batched_unet_forward(model):
    """Guidance doubles the batch of ONE UNet forward per model call; the text encoders never run in the loop."""
    batches, text_calls = [], []
    hooks = [model.unet.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))]
    hooks += [enc.register_forward_hook(lambda *a: text_calls.append(1)) for enc in model.text_encoders]
    cond = model.encode_prompts(PROMPTS)
    text_calls.clear()
    try:
        sample(model, dataclasses.replace(build("unipc-bh2-o2", model.noise, 5), guidance=5.0), _latents(), cond)
        unguided = sample(model, build("unipc-bh2-o2", model.noise, 5), _latents(), cond)
    finally:
        for h in hooks:
            h.remove()
    n = len(PROMPTS)
    assert batches == [2 * n] * 5 + [n] * 5 and unguided.nfe == 5 and not text_calls


def test_cond_forms(model):
    """An SDXLCondition, a list of prompts (encoded once), one condition for all, and None (the null one)."""
    x, t = _latents(), torch.tensor(0.7)
    cond = model.encode_prompts(PROMPTS)
    ref = model(x, t, cond, guidance=3.0)
    assert torch.equal(model(x, t, list(PROMPTS), guidance=3.0), ref)
    assert torch.equal(model(x, t, cond[:1]), model(x, t, cond[:1].expand(len(PROMPTS))))
    assert torch.allclose(model(x, t, None), model(x, t, model.null_condition), atol=1e-6)
    with pytest.raises(ModelError, match="2 prompt conditions for a batch of 4 samples"):
        model(x, t, cond[:2])
    with pytest.raises(ModelError, match="cond must be an SDXLCondition"):
        model(x, t, cond.prompt_embeds)  # embeddings alone lack the pooled embeddings and time ids
    narrow = SDXLCondition(cond.prompt_embeds[..., :8], cond.pooled_embeds, cond.time_ids)
    with pytest.raises(ModelError, match=rf"expected \(B, L, {EMBED}\) and \(B, {POOLED}\)"):
        model(x, t, narrow)
    other = model.encode_prompts(PROMPTS[:1], original_size=(64, 48), crops_coords_top_left=(4, 2))
    assert other.time_ids.tolist() == [[64, 48, 4, 2, IMAGE, IMAGE]]
    assert not torch.equal(model(x, t, other), model(x, t, cond[:1]))  # the micro-conditioning reaches the UNet


def test_condition_value():
    """SDXLCondition indexes, expands and concatenates along the batch; bad parts are one ModelError each."""
    c = SDXLCondition(torch.randn(3, 4, 8), torch.randn(3, 5), torch.ones(3, 6))
    assert len(c) == 3 and len(c[1:]) == 2 and len(c[1]) == 1 and torch.equal(c[-1].pooled_embeds, c.pooled_embeds[2:])
    assert torch.equal(c[torch.tensor([2, 0])].prompt_embeds, c.prompt_embeds[[2, 0]])
    assert c.expand(3) is c and len(c[:1].expand(7)) == 7 and c.to(torch.float64).time_ids.dtype == torch.float64
    doubled = c.with_null(SDXLCondition(torch.zeros(1, 4, 8), torch.zeros(1, 5), torch.zeros(1, 6)))
    assert len(doubled) == 6 and not doubled.prompt_embeds[3:].any() and torch.equal(doubled.time_ids[3:], c.time_ids)
    with pytest.raises(ModelError, match="3 prompt conditions for a batch of 2 samples"):
        c.expand(2)
    with pytest.raises(ModelError, match="batch sizes differ"):
        SDXLCondition(torch.randn(3, 4, 8), torch.randn(2, 5), torch.ones(3, 6))
    with pytest.raises(ModelError, match="time_ids: expected 6"):
        SDXLCondition(torch.randn(3, 4, 8), torch.randn(3, 5), torch.ones(3, 5))
    with pytest.raises(ModelError, match="pooled_embeds: expected a 2-d floating-point tensor"):
        SDXLCondition(torch.randn(3, 4, 8), torch.ones(3, 5, dtype=torch.long), torch.ones(3, 6))


def _cli(args):
    from typer.testing import CliRunner

    from autotune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_baseline_and_sample_with_prompts(sdxl_dir, model, tmp_path):
    """`autotune baseline --guidance 5` + `autotune sample --prompts FILE` reproduce the SDXL pipeline."""
    import numpy as np

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n")
    latents = _latents()
    np.save(tmp_path / "noise.npy", latents.numpy())
    sched_file, out = tmp_path / "s.json", tmp_path / "out.npy"
    for args in (["baseline", "dpmsolver++2m", "--model", sdxl_dir, "--nfe", 6, "--guidance", 5.0, "--out", sched_file],
                 ["sample", "--model", sdxl_dir, "--schedule", sched_file, "--noise", tmp_path / "noise.npy",
                  "--prompts", prompts_file, "--out", out, "--png", tmp_path / "grid.png"]):
        result = _cli(args)
        assert result.exit_code == 0, result.output
    ours = torch.from_numpy(np.load(out))
    ref = _run_pipeline(_peer_pipeline(sdxl_dir, "dpmsolver++2m", model.scheduler_config), PROMPTS, latents, 6, 5.0)
    diff = (ours - ref).abs().max().item()
    print(f"SDXL CLI dpmsolver++2m nfe=6 guidance=5: max abs diff {diff:.3g}")
    assert diff <= TOL and (tmp_path / "grid.png").is_file()
    prompts_file.write_text("a red car\n")  # one prompt for all samples
    result = _cli(["sample", "--model", sdxl_dir, "--schedule", sched_file, "--prompts", prompts_file, "--num", 2,
                   "--out", out])
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (2, 4, 8, 8)


def test_autotune_scheduler_in_sdxl_pipeline_equals_executor(sdxl_dir, model, tmp_path):
    """AutotuneScheduler.from_schedule as the SDXL pipeline's scheduler (CFG done by the pipeline) = our executor."""
    from autotune.diffusers_scheduler import AutotuneScheduler
    from autotune.space.fileformat import save

    latents = _latents(seed=3)
    pipe = load_sdxl_pipeline(sdxl_dir)
    for guidance in (5.0, None):
        schedule = build("unipc-bh2-o3", model.noise, 5)
        if guidance is not None:
            schedule = dataclasses.replace(schedule, guidance=guidance)
        path = save(schedule, tmp_path / "s.json")
        pipe.scheduler = AutotuneScheduler.from_schedule(path, pipe.scheduler.config)
        theirs = _run_pipeline(pipe, PROMPTS, latents, schedule.nfe, guidance or 1.0)
        ours = sample(model, schedule, latents, model.encode_prompts(PROMPTS)).sample
        diff = (theirs - ours).abs().max().item()
        print(f"SDXL AutotuneScheduler unipc-bh2-o3 NFE 5 guidance {guidance}: max abs diff {diff:.3g}")
        assert torch.isfinite(ours).all() and diff <= TOL


def test_cli_search_writes_a_schedule(sdxl_dir, tmp_path, monkeypatch):
    """`autotune search --model SDXL_DIR --nfe 4` (random search, a small budget and set) writes a schedule."""
    from autotune.evaluate import ids
    from autotune.space.fileformat import load

    # the closing report-set table has no size flag (1024 samples); 8 keeps its reference solve to seconds here
    monkeypatch.setitem(ids.DEFAULT_SIZE, "report", 8)

    out = tmp_path / "searched.json"
    result = _cli(["search", "--model", sdxl_dir, "--nfe", 4, "--refine", 2, "--method", "random", "--budget", 3,
                   "--batch", 3, "--set-size", 4, "--validate", 0, "--workers", 0, "--no-cache", "--out", out])
    assert result.exit_code == 0, result.output
    schedule = load(out)
    assert schedule.nfe == 4


def test_other_addition_embed_type_is_one_error_line(sdxl_dir, tmp_path):
    """A UNet2DConditionModel with another added embedding is refused in ONE ModelError line, through the
    registry, the SDXL loader and the CLI (before any weights load)."""
    bad = tmp_path / "bad"
    shutil.copytree(sdxl_dir, bad)
    _edit_json(bad / "unet" / "config.json", addition_embed_type="text_image")
    for load in (lambda: load_model(str(bad)), lambda: load_sdxl_pipeline_dir(bad)):
        with pytest.raises(ModelError, match="addition_embed_type='text_image' is not supported") as e:
            load()
        assert "\n" not in str(e.value)
    result = _cli(["baseline", "ddim", "--model", bad, "--nfe", 4, "--out", tmp_path / "s.json"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "addition_embed_type='text_image' is not supported" in result.output


def test_load_errors(sdxl_dir, tmp_path):
    """A missing part, parts that do not fit together, a bad flag: one ModelError line each."""
    bad = tmp_path / "bad"
    shutil.copytree(sdxl_dir, bad)
    index = json.loads((bad / "model_index.json").read_text())
    _edit_json(bad / "model_index.json", text_encoder_2=[None, None])
    with pytest.raises(ModelError, match="no 'text_encoder_2' entry"):
        load_sdxl_pipeline_dir(bad)
    _edit_json(bad / "model_index.json", text_encoder_2=["transformers", "CLIPTextModel"])
    with pytest.raises(ModelError, match="text_encoder_2: CLIPTextModel is not supported"):
        load_sdxl_pipeline_dir(bad)
    _edit_json(bad / "model_index.json", text_encoder_2=index["text_encoder_2"], force_zeros_for_empty_prompt="yes")
    with pytest.raises(ModelError, match="force_zeros_for_empty_prompt must be true or false"):
        load_sdxl_pipeline_dir(bad)
    _edit_json(bad / "model_index.json", force_zeros_for_empty_prompt=True)
    _edit_json(bad / "unet" / "config.json", addition_time_embed_dim=4)  # 6 x 4 + 16 != the add_embedding's 64
    with pytest.raises(ModelError, match="add_embedding of 64 inputs, but 6 time ids") as e:
        load_sdxl_pipeline_dir(bad)
    assert "\n" not in str(e.value)


def test_engine_takes_the_sdxl_condition(model, tmp_path):
    """`compile` of an SDXL directory: inputs prompt_embeds, pooled_prompt_embeds and add_time_ids, CFG baked in;
    the onnxruntime engine equals the executor on real prompts at another batch size than the export's."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from autotune.compile import load_engine
    from autotune.compile.engine import build_engine, executor_sample

    schedule = dataclasses.replace(build("dpmsolver++2m", model.noise, 3), guidance=5.0)
    man = build_engine(model, schedule, tmp_path / "e", "onnxruntime", parity_noises=2)
    assert [(i.name, i.shape) for i in man.inputs][1:] == [
        ("prompt_embeds", ("batch", 16, EMBED)), ("pooled_prompt_embeds", ("batch", POOLED)),
        ("add_time_ids", ("batch", 6))]
    cond = model.encode_prompts(list(PROMPTS[:3]))
    inputs = {"noise": torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(2)),
              "prompt_embeds": cond.prompt_embeds, "pooled_prompt_embeds": cond.pooled_embeds,
              "add_time_ids": cond.time_ids.contiguous()}
    out = load_engine(tmp_path / "e")(**{k: v.numpy() for k, v in inputs.items()})
    ref = executor_sample(model, schedule, inputs).numpy()
    assert np.array_equal(ref, sample(model, schedule, inputs["noise"], cond).sample.numpy())
    diff = float(np.abs(out - ref).max())
    print(f"SDXL onnxruntime engine dpmsolver++2m NFE 3 guidance 5: max abs diff {diff:.3g} "
          f"(build parity {man.parity['engine_vs_executor_max_abs']:.3g})")
    assert diff <= 1e-3
