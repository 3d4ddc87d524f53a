"""Reuse masks beyond the DDPM UNet: transformer blocks as reusable units (SD3, Flux: a reused block adds the residual
it cached to its current inputs, FORA / TeaCache residual caching), where the executor, an ONNX engine and the
diffusers pipeline with ``apply_schedule`` compute the same (FluxPipeline's separate true-CFG calls each keep their
own cache); and the latent UNet pipelines (SD 1.x, SDXL) running their UNet's masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from autotune.diffusers_masks import apply_schedule, remove_schedule  # noqa: E402
from autotune.models.registry import load_model  # noqa: E402
from autotune.sampling.denoiser import FeatureCache  # noqa: E402
from autotune.sampling.executor import sample  # noqa: E402
from autotune.sampling.named import build  # noqa: E402
from autotune.space.schedule import GUIDANCE_UNIT, Schedule  # noqa: E402

NFE = 6
GUIDANCE = 4.0


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (model directory, model): tiny SD3, Flux "dev" (guidance embedding) and "schnell" (true CFG)."""
    from tiny_flux import make_tiny_flux_dir
    from tiny_sd3 import make_tiny_sd3_dir

    root = tmp_path_factory.mktemp("transformer-reuse")
    dirs = {"sd3": make_tiny_sd3_dir(root / "sd3"), "flux-dev": make_tiny_flux_dir(root / "flux-dev", seed=1),
            "flux-schnell": make_tiny_flux_dir(root / "flux-schnell", seed=2, schnell=True)}
    return {name: (path, load_model(str(path))) for name, path in dirs.items()}


def _reuse_after_first(schedule: Schedule, units: tuple[str, ...], order: int) -> Schedule:
    """Every other step reuses every block but the first (FirstBlockCache's reuse of the stack, as a fixed pattern)."""
    steps = tuple(dataclasses.replace(st, reuse=units[1:] if k % 2 else ()) for k, st in enumerate(schedule.steps))
    return dataclasses.replace(schedule, steps=steps, reuse_order=order, name=f"reuse-after-first-{order}")


def _prompts(family):
    from tiny_flux import PROMPTS as FLUX_PROMPTS
    from tiny_sd3 import PROMPTS as SD3_PROMPTS

    return list(SD3_PROMPTS if family == "sd3" else FLUX_PROMPTS)[:2]


@pytest.mark.parametrize("family,units", [
    ("sd3", ("transformer_blocks.0", "transformer_blocks.1")),
    ("flux-dev", ("transformer_blocks.0", "single_transformer_blocks.0")),
])
def test_blocks_are_units_and_a_reused_block_adds_its_cached_residual(families, family, units):
    _, model = families[family]
    guided = (GUIDANCE_UNIT,) if family == "sd3" else ()  # flux-dev: distilled guidance, no CFG direction
    assert tuple(model.units) == units and tuple(model.units.reusable) == units + guided
    block = dict(model.module.named_modules())[units[1]]
    seen = []
    hook = block.register_forward_hook(
        lambda mod, args, kw, out: seen.append((kw["encoder_hidden_states"], kw["hidden_states"], out)),
        with_kwargs=True)
    cond = model.encode_prompts(_prompts(family))
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, *model.sample_shape, generator=gen)
    x2 = x1 + 0.5 * torch.randn(x1.shape, generator=gen)
    t1, t2 = torch.tensor(0.7), torch.tensor(0.55)
    cache = FeatureCache()
    try:
        with torch.no_grad():
            full1 = model(x1, t1, cond, guidance=GUIDANCE, record=units, cache=cache)
            again = model(x1, t1, cond, guidance=GUIDANCE, reuse=units[1:], cache=cache)
            full2 = model(x2, t2, cond, guidance=GUIDANCE)
            reused2 = model(x2, t2, cond, guidance=GUIDANCE, reuse=units[1:], cache=cache)
            skipped2 = model(x2, t2, cond, guidance=GUIDANCE, skip=units[1:])
    finally:
        hook.remove()
    # at the inputs it was recorded at, the cached residual gives the block's own output back
    assert float((again - full1).abs().max()) <= 1e-5
    (enc1, hid1, out1), _, _, (enc2, hid2, out2), (enc_s, hid_s, out_s) = seen
    # at new inputs: the current inputs plus what the block added at the recorded call, stream by stream
    for current, before_in, before_out, got in ((enc2, enc1, out1[0], out2[0]), (hid2, hid1, out1[1], out2[1])):
        if before_out is None:  # SD3's last block has no text-stream output
            assert got is None
            continue
        torch.testing.assert_close(got, current + (before_out - before_in), atol=1e-6, rtol=0)
    assert float((reused2 - full2).abs().max()) > 1e-4  # the reuse is not the recomputation
    # skipped: the block adds nothing
    torch.testing.assert_close(out_s[1], hid_s, atol=0, rtol=0)
    assert float((skipped2 - reused2).abs().max()) > 1e-4


def _pipeline_final(family, path, latents, prompts, nfe, schedule):
    """The pipeline's final latents (unpacked for Flux) with ``schedule`` applied, for our unpacked ``latents``."""
    if family == "sd3":
        from tiny_sd3 import IMAGE, load_sd3_pipeline

        pipe = load_sd3_pipeline(path)
        apply_schedule(pipe, schedule)
        with torch.no_grad():
            out = pipe(prompt=prompts, height=IMAGE, width=IMAGE, num_inference_steps=nfe, guidance_scale=GUIDANCE,
                       latents=latents.clone(), output_type="latent").images
        return pipe, out
    from autotune.models.flux import pack_latents, unpack_latents
    from tiny_flux import IMAGE, load_flux_pipeline

    pipe = load_flux_pipeline(path)
    apply_schedule(pipe, schedule)
    extra = {"true_cfg_scale": GUIDANCE, "negative_prompt": ""} if family == "flux-schnell" else \
        {"guidance_scale": GUIDANCE}
    size = latents.shape[-1]
    with torch.no_grad():
        out = pipe(prompt=prompts, height=IMAGE, width=IMAGE, num_inference_steps=nfe, latents=pack_latents(latents),
                   output_type="latent", **extra).images
    return pipe, unpack_latents(out, size, size)


def _pipeline_equals_executor(family, path, model, latents, prompts, cond, schedule):
    """(the pipeline, ``autotune sample``'s final latents), after checking the pipeline with ``schedule`` applied ends
    within 1e-4 of them."""
    with torch.no_grad():
        ours = sample(model, schedule, latents, cond).sample
    pipe, theirs = _pipeline_final(family, path, latents, prompts, NFE, schedule)
    diff = float((theirs - ours).abs().max())
    print(f"{family} {schedule.name} (reuse order {schedule.reuse_order}): pipeline vs executor max abs {diff:.2e}")
    assert diff <= 1e-4
    return pipe, ours


@pytest.mark.parametrize("family", ["sd3", "flux-dev", "flux-schnell"])
def test_pipeline_with_apply_schedule_runs_block_reuse_as_the_executor(families, family):
    """StableDiffusion3Pipeline (one batched CFG call per step), FluxPipeline "dev" (guidance embedding) and
    "schnell" with true CFG (two calls per step, each with its own cache): copied and forecast block reuse end
    where ``autotune sample`` ends (its one batched call) on the same latents."""
    path, model = families[family]
    prompts = _prompts(family)
    base = dataclasses.replace(build("flow-euler", model.noise, NFE), guidance=GUIDANCE)
    latents = torch.randn(len(prompts), *model.sample_shape, generator=torch.Generator().manual_seed(3))
    cond = model.encode_prompts(prompts)
    finals = {}
    for order in (None, 0, 1):
        schedule = base if order is None else _reuse_after_first(base, tuple(model.units), order)
        pipe, ours = _pipeline_equals_executor(family, path, model, latents, prompts, cond, schedule)
        finals[order] = ours
        remove_schedule(pipe)
        assert "forward" not in pipe.transformer.__dict__
    assert float((finals[0] - finals[None]).abs().max()) > 1e-4  # the masks ran
    assert float((finals[1] - finals[0]).abs().max()) > 1e-5  # the forecast is not the copy


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_engine_with_block_reuse_equals_the_executor(families, family, tmp_path):
    pytest.importorskip("onnxruntime")
    from autotune.compile import build_engine

    _, model = families[family]
    base = dataclasses.replace(build("flow-euler", model.noise, NFE), guidance=GUIDANCE)
    schedule = _reuse_after_first(base, tuple(model.units), 1)
    manifest = build_engine(model, schedule, tmp_path / "engine", "onnxruntime", parity_noises=2)
    parity = manifest.parity["engine_vs_executor_max_abs"]
    print(f"{family} engine with block reuse (forecast): parity {parity:.2e}")
    assert parity <= 1e-3


def _latent_family(family, tmp_path):
    """(directory, model, pipeline loader, image size) of a tiny untrained SD 1.x or SDXL pipeline."""
    if family == "sd":
        from tiny_sd import load_sd_pipeline as load_pipeline
        from tiny_sd import make_tiny_sd_dir as make_dir
        image = 32
    else:
        from tiny_sdxl import IMAGE as image
        from tiny_sdxl import load_sdxl_pipeline as load_pipeline
        from tiny_sdxl import make_tiny_sdxl_dir as make_dir
    path = make_dir(tmp_path / family, train_steps=0)
    return path, load_model(str(path)), load_pipeline, image


def _latent_equals_executor(family, path, model, load_pipeline, image, prompts, latents, schedule):
    """(the pipeline with ``schedule`` applied, ``autotune sample``'s final latents), after checking the pipeline
    ends within 1e-4 of them."""
    with torch.no_grad():
        ours = sample(model, schedule, latents, model.encode_prompts(prompts)).sample
    pipe = load_pipeline(path)
    apply_schedule(pipe, schedule)
    with torch.no_grad():
        theirs = pipe(prompt=prompts, height=image, width=image, num_inference_steps=NFE, guidance_scale=GUIDANCE,
                      latents=latents.clone(), output_type="latent").images
    diff = float((theirs - ours).abs().max())
    print(f"{family} {schedule.name} (reuse order {schedule.reuse_order}): pipeline vs executor max abs {diff:.2e}")
    assert diff <= 1e-4
    return pipe, ours


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_latent_unet_pipeline_with_apply_schedule_runs_reuse_and_skips_as_the_executor(family, tmp_path):
    """StableDiffusionPipeline / StableDiffusionXLPipeline: the UNet2DConditionModel's own forward under the masks
    (its same-shape residual blocks reused, copied or forecast, and skipped), equal to ``autotune sample``."""
    from tiny_sd import PROMPTS

    path, model, load_pipeline, image = _latent_family(family, tmp_path)
    units = tuple(model.units)
    assert "mid_block.resnets.0" in units
    prompts = list(PROMPTS[:2])
    base = dataclasses.replace(build("dpmsolver++2m", model.noise, NFE), guidance=GUIDANCE)
    latents = torch.randn(len(prompts), *model.sample_shape, generator=torch.Generator().manual_seed(5))
    steps = tuple(dataclasses.replace(st, reuse=("mid_block.resnets.0",) if k % 2 else (),
                                      skip=("mid_block.resnets.1",) if k == NFE - 1 else ())
                  for k, st in enumerate(base.steps))
    finals = {}
    for order in (None, 0, 1):
        schedule = base if order is None else dataclasses.replace(base, steps=steps, reuse_order=order)
        _, ours = _latent_equals_executor(family, path, model, load_pipeline, image, prompts, latents, schedule)
        finals[order] = ours
    assert float((finals[0] - finals[None]).abs().max()) > 1e-4
    assert float((finals[1] - finals[0]).abs().max()) > 1e-5


def test_a_forward_wrapper_installed_before_is_called_under_the_masks_and_put_back(families):
    """A wrapper already on the network's instance (as accelerate's offload hook installs) keeps running under the
    masks, and remove_schedule puts it back rather than deleting it."""
    from tiny_sd3 import IMAGE, load_sd3_pipeline

    path, model = families["sd3"]
    pipe = load_sd3_pipeline(path)
    transformer = pipe.transformer
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return type(transformer).forward(transformer, *args, **kwargs)

    transformer.forward = wrapper
    base = dataclasses.replace(build("flow-euler", model.noise, NFE), guidance=GUIDANCE)
    schedule = _reuse_after_first(base, tuple(model.units), 1)
    prompts = _prompts("sd3")
    latents = torch.randn(len(prompts), *model.sample_shape, generator=torch.Generator().manual_seed(3))
    apply_schedule(pipe, schedule)
    with torch.no_grad():
        theirs = pipe(prompt=prompts, height=IMAGE, width=IMAGE, num_inference_steps=NFE, guidance_scale=GUIDANCE,
                      latents=latents.clone(), output_type="latent").images
        ours = sample(model, schedule, latents, model.encode_prompts(prompts)).sample
    assert len(calls) == NFE
    assert float((theirs - ours).abs().max()) <= 1e-4
    remove_schedule(pipe)
    assert transformer.__dict__["forward"] is wrapper


def test_the_masks_are_a_hook_in_diffusers_registry_and_compose_with_its_other_hooks(families):
    """apply_schedule registers one hook in the network's diffusers HookRegistry: a hook registered before runs
    inside it on every call (the masks apply to what it calls), the result is the executor's, and remove_schedule
    takes only its own hook off."""
    from diffusers.hooks import HookRegistry, ModelHook
    from tiny_sd3 import IMAGE, load_sd3_pipeline

    from autotune.diffusers_masks import HOOK

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    path, model = families["sd3"]
    pipe = load_sd3_pipeline(path)
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(Count(), "count")
    base = dataclasses.replace(build("flow-euler", model.noise, NFE), guidance=GUIDANCE)
    schedule = _reuse_after_first(base, tuple(model.units), 1)
    prompts = _prompts("sd3")
    latents = torch.randn(len(prompts), *model.sample_shape, generator=torch.Generator().manual_seed(3))
    apply_schedule(pipe, schedule)
    assert list(registry.hooks) == ["count", HOOK]
    with torch.no_grad():
        theirs = pipe(prompt=prompts, height=IMAGE, width=IMAGE, num_inference_steps=NFE, guidance_scale=GUIDANCE,
                      latents=latents.clone(), output_type="latent").images
        ours = sample(model, schedule, latents, model.encode_prompts(prompts)).sample
    assert Count.calls == NFE
    assert float((theirs - ours).abs().max()) <= 1e-4
    remove_schedule(pipe)
    assert list(registry.hooks) == ["count"]
    with torch.no_grad():
        plain = pipe(prompt=prompts, height=IMAGE, width=IMAGE, num_inference_steps=NFE, guidance_scale=GUIDANCE,
                     latents=latents.clone(), output_type="latent").images
        unmasked = sample(model, base, latents, model.encode_prompts(prompts)).sample
    assert Count.calls == 2 * NFE  # the other hook still runs, now without the masks
    assert float((plain - unmasked).abs().max()) <= 1e-4


def _guidance_reuse(schedule: Schedule, also: tuple[str, ...] = ()) -> Schedule:
    """The guidance direction reused at steps 1, 3 and 5 (with ``also`` at step 3): those calls run the prompt alone."""
    steps = tuple(dataclasses.replace(st, reuse=(GUIDANCE_UNIT,) + (also if k == 3 else ()) if k % 2 else ())
                  for k, st in enumerate(schedule.steps))
    return dataclasses.replace(schedule, steps=steps, name="guidance-reuse")


@pytest.mark.parametrize("family", ["sd3", "flux-schnell"])
def test_pipeline_with_apply_schedule_reuses_the_guidance_direction_as_the_executor(families, family):
    """SD3's one batched CFG call runs the prompt's half alone at a reusing step; FluxPipeline's negative-prompt call
    is not computed there. Copied and forecast, with a block reused in the same step, the pipeline ends where
    ``autotune sample`` ends."""
    path, model = families[family]
    assert GUIDANCE_UNIT in model.units.reusable
    prompts = _prompts(family)
    base = dataclasses.replace(build("flow-euler", model.noise, NFE), guidance=GUIDANCE)
    latents = torch.randn(len(prompts), *model.sample_shape, generator=torch.Generator().manual_seed(3))
    cond = model.encode_prompts(prompts)
    with torch.no_grad():
        plain = sample(model, base, latents, cond).sample
    for order in (0, 1):
        schedule = dataclasses.replace(_guidance_reuse(base, tuple(model.units)[1:]), reuse_order=order)
        _, ours = _pipeline_equals_executor(family, path, model, latents, prompts, cond, schedule)
        assert float((ours - plain).abs().max()) > 1e-5  # the reuse ran


def test_guidance_reuse_in_a_pipeline_without_a_negative_prompt_call_is_refused(families):
    from autotune.errors import SamplingError

    path, model = families["flux-dev"]  # a guidance-embedding transformer: one call per step
    assert GUIDANCE_UNIT not in model.units.reusable
    base = dataclasses.replace(build("flow-euler", model.noise, NFE), guidance=GUIDANCE)
    latents = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(3))
    with pytest.raises(SamplingError, match="negative prompt"):
        _pipeline_final("flux-dev", path, latents, _prompts("flux-dev"), NFE, _guidance_reuse(base))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_latent_unet_pipeline_reuses_the_guidance_direction_as_the_executor(family, tmp_path):
    """The prompt's half of the CFG batch alone at a reusing step (SDXL: its added text embeddings and time ids
    sliced with it), a residual block reused in the same step, forecast: equal to ``autotune sample``."""
    from tiny_sd import PROMPTS

    path, model, load_pipeline, image = _latent_family(family, tmp_path)
    prompts = list(PROMPTS[:2])
    base = dataclasses.replace(build("dpmsolver++2m", model.noise, NFE), guidance=GUIDANCE)
    schedule = dataclasses.replace(_guidance_reuse(base, ("mid_block.resnets.0",)), reuse_order=1)
    latents = torch.randn(len(prompts), *model.sample_shape, generator=torch.Generator().manual_seed(5))
    pipe, ours = _latent_equals_executor(family, path, model, load_pipeline, image, prompts, latents, schedule)
    with torch.no_grad():
        plain = sample(model, base, latents, model.encode_prompts(prompts)).sample
    assert float((ours - plain).abs().max()) > 1e-5  # the reuse ran
    from autotune.errors import SamplingError

    with pytest.raises(SamplingError, match="without classifier-free guidance"), torch.no_grad():
        pipe(prompt=prompts, height=image, width=image, num_inference_steps=NFE, guidance_scale=1.0,
             latents=latents.clone(), output_type="latent")
