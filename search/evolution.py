"""`evolution`: AutoDiffusion-style evolutionary search (Li et al., 2023), in two stages.

Stage 1 evolves the time grid and the solver decisions (order, solver, prediction, corrector); stage 2
evolves the per-step skip masks of prunable units (the architecture) with the stage-1 winner's grid and
solvers fixed. Each generation: tournament selection, per-step uniform crossover, mutation (times jittered
in log-SNR, discrete choices resampled), elitist survival. Candidates live as the space's vectors; the space's
decoder repairs any child into a valid schedule.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from autotune.search.strategy import (SearchContext, register, rng_from_state, rng_state, schedule_from_json,
                                      schedule_to_json)
from autotune.space.schedule import Schedule

POPULATION = 16
TOURNAMENT = 3
CROSSOVER_P = 0.5
MUTATE_P = 0.15  # per discrete coordinate
TIME_SIGMA = 0.25  # std of the log-SNR jitter of each time, in units of the mean step in lambda


@register("evolution")
class Evolution:
    """Two-stage evolutionary search; ``stage2_after`` is the fraction of told candidates before stage 2."""

    name = "evolution"

    def __init__(self, context: SearchContext, population: int = POPULATION, stage2_after: float = 0.7,
                 budget_hint: int = 200) -> None:
        self.context = context
        self.space = context.space
        self.rng = np.random.default_rng(context.seed)
        self.population_size = population
        self.population: list[tuple[Schedule, float]] = []
        self.told = 0
        self.pending_seeds = list(context.seeds)
        self.stage2_at = int(stage2_after * budget_hint) if self.space.units else math.inf
        self.coords = self.space.coords
        self.time_idx = [i for i, c in enumerate(self.coords) if c.family == "t"]
        self.arch_idx = [i for i, c in enumerate(self.coords) if c.family == "skip"]
        self.solver_idx = [i for i, c in enumerate(self.coords) if c.family not in ("t", "skip")]

    @property
    def stage(self) -> int:
        return 2 if self.told >= self.stage2_at else 1

    # -- ask / tell -----------------------------------------------------------------------------------------

    def ask(self, n: int) -> list[Schedule]:
        out = []
        while self.pending_seeds and len(out) < n:
            out.append(self.pending_seeds.pop(0))
        while len(out) < n:
            if len(self.population) < 2:
                base = self.space.encode(self.context.seeds[0]) if self.context.seeds else None
                vec = self._mutate(base, strength=2.0) if base is not None else None
                out.append(self.space.decode(vec) if vec is not None else self.space.sample_prior(self.rng))
                continue
            a = self._tournament()
            child = self._crossover(a, self._tournament()) if self.rng.random() < CROSSOVER_P else a.copy()
            out.append(self.space.decode(self._mutate(child)))
        return out

    def tell(self, schedule: Schedule, value: float) -> None:
        self.told += 1
        if not math.isfinite(value):
            return
        if any(s.hash() == schedule.hash() for s, _ in self.population):
            return
        self.population.append((schedule, float(value)))
        self.population.sort(key=lambda sv: sv[1])
        del self.population[self.population_size:]

    # -- operators ------------------------------------------------------------------------------------------

    def _tournament(self) -> np.ndarray:
        picks = self.rng.choice(len(self.population), size=min(TOURNAMENT, len(self.population)), replace=False)
        best = min(picks, key=lambda i: self.population[i][1])
        return self.space.encode(self.population[best][0])

    def _crossover(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Uniform crossover by step: every coordinate of step k comes from the same parent."""
        child = a.copy()
        steps = {c.step for c in self.coords}
        take_b = {k for k in steps if self.rng.random() < 0.5}
        for i, c in enumerate(self.coords):
            if c.step in take_b and (self.stage == 2) == (c.family == "skip"):
                child[i] = b[i]
        return child

    def _mutate(self, vec: np.ndarray, strength: float = 1.0) -> np.ndarray:
        vec = vec.copy()
        if self.stage == 1:
            self._jitter_times(vec, strength)
            indices = self.solver_idx
        else:
            indices = self.arch_idx
        for i in indices:
            if self.rng.random() < MUTATE_P * strength:
                c = self.coords[i]
                if c.kind == "real":
                    vec[i] = self.rng.uniform(c.low, c.high)
                else:
                    vec[i] = float(self.rng.integers(int(c.low), int(c.high) + 1))
        return vec

    def _jitter_times(self, vec: np.ndarray, strength: float) -> None:
        """Move the interior times in log-SNR (where step sizes matter), keeping them inside the interval."""
        if not self.time_idx:
            return
        noise = self.context.noise
        t = torch.tensor(vec[self.time_idx], dtype=torch.float64)
        lam = noise.lambda_(t)
        lo = float(noise.lambda_(torch.tensor(self.space.t_start, dtype=torch.float64)))
        end = self.space.t_end if self.space.t_end > 0 else noise.t_min
        hi = float(noise.lambda_(torch.tensor(end, dtype=torch.float64)))
        step = (hi - lo) / (len(self.time_idx) + 1)
        lam = lam + torch.from_numpy(self.rng.normal(0.0, TIME_SIGMA * strength * abs(step), len(self.time_idx)))
        lam = lam.clamp(min(lo, hi), max(lo, hi))
        vec[self.time_idx] = noise.t_of_lambda(lam).clamp(self.space.t_end, self.space.t_start).numpy()

    # -- state ----------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "rng": rng_state(self.rng),
            "told": self.told,
            "population": [[schedule_to_json(s), v] for s, v in self.population],
            "pending_seeds": [schedule_to_json(s) for s in self.pending_seeds],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng = rng_from_state(state["rng"])
        self.told = int(state["told"])
        self.population = [(schedule_from_json(d), float(v)) for d, v in state["population"]]
        self.pending_seeds = [schedule_from_json(d) for d in state["pending_seeds"]]
