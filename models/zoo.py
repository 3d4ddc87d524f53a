"""The built-in models: importing this module registers them all (see models/registry.py)."""

from autotune.models import analytic  # noqa: F401  gmm2d, gmm64, gmm2d-flow
from autotune.models import digits  # noqa: F401  digits (the default model)
from autotune.models import digits_flow  # noqa: F401  digits-flow (the digits UNet as a rectified flow)
from autotune.models import digits_dit  # noqa: F401  digits-dit (a small DiT on digits, rectified flow)
