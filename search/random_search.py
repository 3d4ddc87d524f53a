"""`random`: independent draws from the space's prior, the baseline every other method must beat."""

from __future__ import annotations

from typing import Any

import numpy as np

from autotune.search.strategy import SearchContext, register, rng_from_state, rng_state
from autotune.space.schedule import Schedule


@register("random")
class RandomSearch:
    """Random search over the unified space (the seeds are proposed first, so it never loses to them)."""

    name = "random"
    multi_objective = True  # it learns nothing from the values, so any number of objectives will do
    varies_nfe = True

    def __init__(self, context: SearchContext) -> None:
        self.context = context
        self.rng = np.random.default_rng(context.seed)
        self.pending_seeds = len(context.seeds)

    def ask(self, n: int) -> list[Schedule]:
        out = []
        while len(out) < n and self.pending_seeds:
            out.append(self.context.seeds[len(self.context.seeds) - self.pending_seeds])
            self.pending_seeds -= 1
        out += [self.context.space.sample_prior(self.rng) for _ in range(n - len(out))]
        return out

    def tell(self, schedule: Schedule, value: float) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), "pending_seeds": self.pending_seeds}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng = rng_from_state(state["rng"])
        self.pending_seeds = int(state["pending_seeds"])
