"""DeepCache's deep branches on diffusers UNet2DModel (models/unet_branches.py): the branched forward equals
diffusers' bit for bit, the branches are reusable units of a pipeline directory's model, and layouts the
branched loop does not cover keep diffusers' forward and get no branches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from autotune.models.unet_branches import attach_branches, branch_levels, branched_forward  # noqa: E402

LAYOUTS = {
    "two levels, attention below": dict(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8),
    "three levels, two resnets each, centred input, fourier time": dict(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
        center_input_sample=True, time_embedding_type="fourier"),
    "four levels, no mid block": dict(
        sample_size=16, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(4, 8, 8, 8),
        down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4, norm_num_groups=4,
        mid_block_type=None),
}


def make_unet(seed: int = 0, **config):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**config).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight matter
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_branched_forward_is_diffusers_forward_bit_for_bit(layout):
    config = LAYOUTS[layout]
    unet = make_unet(**config)
    keys = sorted(unet.state_dict())
    names = attach_branches(unet)
    assert names == tuple(f"deep{i}" for i in range(len(config["block_out_channels"]) - 1))
    assert sorted(unet.state_dict()) == keys  # the branches own no weights: files and fingerprints unchanged
    x = torch.randn(3, config["in_channels"], config["sample_size"], config["sample_size"])
    with torch.no_grad():
        for t in (torch.tensor([999, 500, 3]), torch.tensor(250), 7):
            assert torch.equal(branched_forward(unet, x, t), unet(x, t).sample)


def test_layouts_the_branched_loop_does_not_cover_get_no_branches():
    skip = make_unet(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
                     down_block_types=("DownBlock2D", "AttnSkipDownBlock2D"),
                     up_block_types=("AttnSkipUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    classes = make_unet(**LAYOUTS["two levels, attention below"], num_class_embeds=3)
    for unet, why in ((skip, "skip-sample"), (classes, "class embedding")):
        levels, reason = branch_levels(unet)
        assert levels == 0 and why in reason
        assert attach_branches(unet) == () and not hasattr(unet, "deep0")
    assert branch_levels(torch.nn.Linear(2, 2)) == (0, "Linear is not a UNet2DModel")


def test_a_pipeline_directory_reuses_its_deep_branch_as_deepcache_does(pipeline_dirs):
    from autotune.evaluate.evaluator import Evaluator
    from autotune.models.diffusers_dir import load_pipeline_dir
    from autotune.sampling.executor import sample
    from autotune.sampling.named import build
    from autotune.sampling.reuse import ThresholdReuse, deepcache

    model = load_pipeline_dir(pipeline_dirs["epsilon"])
    assert "deep0" in model.units.reusable and "deep0" not in model.units  # reusable, never skipped
    base = build("unipc-bh2-o2", model.noise, 8)
    cached = deepcache(base, 2)
    noise = torch.randn(4, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    calls = []
    deep = model.unet.deep0
    original = type(deep).forward

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    type(deep).forward = counted
    try:
        full = sample(model, base, noise).sample
        n_full = len(calls)
        reused = sample(model, cached, noise).sample
    finally:
        type(deep).forward = original
    assert n_full == 8 and len(calls) - n_full == 4  # DeepCache N=2: the deep branch runs at every other call
    change = float((reused - full).abs().max())
    assert 0 < change < 0.5 * float(full.abs().max())  # reuse changes the sample, by a fraction of it
    evaluator = Evaluator(model, "search", size=8)
    assert evaluator.evaluate(cached)["mse_ref"] > evaluator.evaluate(base)["mse_ref"]  # reuse costs accuracy
    # the threshold rule watches the first down block (a tuple of features in diffusers) and reuses deep0
    rule = ThresholdReuse(model, 1.0, first="down_blocks.0")
    ruled = sample(rule, base, noise).sample
    assert rule.calls == 8 and 0 < rule.reused < 8
    assert torch.isfinite(ruled).all() and not torch.equal(ruled, full)
    loose = ThresholdReuse(model, 0.0, first="down_blocks.0")  # nothing is below 0: every call is full
    assert torch.equal(sample(loose, base, noise).sample, full) and loose.reused == 0
    other = dataclasses.replace(base, steps=tuple(dataclasses.replace(s, reuse=("deep9",) if k else ())
                                                  for k, s in enumerate(base.steps)))
    with pytest.raises(Exception, match="deep9"):
        sample(model, other, noise)
