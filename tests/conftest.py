import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The test models are tiny: a second thread buys nothing and, on a busy 2-core machine, oversubscription
# slows small ops down by 10-100x. One thread keeps the suite's time predictable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pipeline_dirs(tmp_path_factory):
    """Trained tiny DDPM pipeline directories (epsilon and v-prediction), built once per test session."""
    pytest.importorskip("diffusers")
    from peers import make_pipeline_dir

    root = tmp_path_factory.mktemp("pipelines")
    torch.manual_seed(0)
    return {pred: make_pipeline_dir(root / pred, pred) for pred in ("epsilon", "v_prediction")}


@pytest.fixture(scope="session")
def gmm():
    """The analytic 2-D mixture in float64, shared by the search tests."""
    from autotune.models.registry import load_model

    return load_model("gmm2d", torch.float64)
