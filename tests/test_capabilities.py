"""Models' optional features, read in one place (sampling/capabilities.py), and the rules that depend on them."""

from __future__ import annotations

import pytest
import torch

import autotune.models.zoo  # noqa: F401  (registers the built-in models)
from autotune.errors import InputError
from autotune.evaluate.sets import eval_set_for
from autotune.models.registry import load_model
from autotune.sampling.capabilities import Capabilities, capabilities_of, check_guidance_applies
from autotune.sampling.denoiser import TorchDenoiser
from autotune.sampling.noise import VPLinear


def test_builtin_models_answer_from_their_members():
    digits, gmm = capabilities_of(load_model("digits")), capabilities_of(load_model("gmm2d", torch.float64))
    assert digits.sample_shape == (1, 16, 16) and digits.num_classes == 10 and digits.guided and digits.images
    assert digits.units and not digits.decodes and not digits.prompts
    assert gmm.sample_shape == (2,) and not gmm.guided and not gmm.images and gmm.data_metrics
    assert digits.data_metric_draws and gmm.data_metric_draws
    assert not capabilities_of(TorchDenoiser(lambda x, t: 0.0 * x, VPLinear(), "epsilon")).data_metric_draws


def test_a_declared_value_wins_and_drives_the_rules():
    """A model that declares its capabilities is taken at its word: the evaluation set and the guidance rule read
    them, not its attributes."""
    model = TorchDenoiser(lambda x, t: 0.0 * x, VPLinear(), "epsilon")
    model.capabilities = Capabilities(sample_shape=(3, 4, 4), num_classes=5)
    assert eval_set_for(model, "search", size=8).num_classes == 5
    check_guidance_applies(model, 2.0, "toy")  # guided: no error
    model.capabilities = Capabilities(sample_shape=(3, 4, 4))
    with pytest.raises(InputError, match="unconditional"):
        check_guidance_applies(model, 2.0, "toy")
    check_guidance_applies(model, None, "toy")
