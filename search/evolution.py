"""`evolution`: AutoDiffusion-style evolutionary search (Li et al., 2023) over the unified space.

This is AutoDiffusion's first stage: it evolves the time grid and the solver decisions (order, solver,
prediction, corrector; the step count too in an NFE-range space; skip masks when the space has units).
The second stage, skip masks under a latency budget with the grid and solvers fixed, is
:mod:`autotune.search.skip_stage`. Each generation: tournament selection, per-step uniform crossover,
mutation (times jittered in log-SNR, discrete choices resampled), elitist survival. Candidates live as the
space's vectors; the space's decoder repairs any child into a valid schedule.

With several objectives (e.g. mse_ref, nfe, latency_ms) survival is NSGA-II's (Deb et al., 2002): the
population keeps whole non-dominated fronts in order and cuts the last one by crowding distance; the
tournament prefers the lower front, then the larger crowding distance.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from autotune.search.pareto import crowding_distance, nondominated_sort
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
    """Evolutionary search; one objective: elitist by value; several: NSGA-II survival (see the module)."""

    name = "evolution"
    multi_objective = True
    varies_nfe = True

    def __init__(self, context: SearchContext, population: int = POPULATION) -> None:
        self.context = context
        self.space = context.space
        self.rng = np.random.default_rng(context.seed)
        self.population_size = population
        self.n_objectives = len(context.objectives)
        self.population: list[tuple[Schedule, tuple[float, ...]]] = []
        self.told = 0
        self.pending_seeds = list(context.seeds)
        self.coords = self.space.coords
        self.time_idx = [i for i, c in enumerate(self.coords) if c.family == "t"]
        self.other_idx = [i for i, c in enumerate(self.coords) if c.family != "t"]
        self._rank: dict[str, tuple[int, float]] = {}  # hash -> (front, -crowding): the tournament's key

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

    def tell(self, schedule: Schedule, value: float | tuple[float, ...]) -> None:
        self.told += 1
        values = tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (float(value),)
        if not all(math.isfinite(v) for v in values):
            return
        if any(s.hash() == schedule.hash() for s, _ in self.population):
            return
        self.population.append((schedule, values))
        self._survive()

    def _survive(self) -> None:
        """Keep the best ``population_size``: by value (one objective), or by front then crowding (several)."""
        if self.n_objectives == 1:
            self.population.sort(key=lambda sv: sv[1][0])
            del self.population[self.population_size:]
            self._rank = {s.hash(): (i, 0.0) for i, (s, _) in enumerate(self.population)}
            return
        names = [str(i) for i in range(self.n_objectives)]
        points = [dict(zip(names, v)) for _, v in self.population]
        keep: list[int] = []
        rank: dict[int, tuple[int, float]] = {}
        for f, front in enumerate(nondominated_sort(points, names, ["minimize"] * len(names))):
            crowd = crowding_distance([points[i] for i in front], names, ["minimize"] * len(names))
            order = sorted(range(len(front)), key=lambda j: (-crowd[j], front[j]))
            for j in order:
                rank[front[j]] = (f, -crowd[j])
            room = self.population_size - len(keep)
            keep += [front[j] for j in order[:room]]
            if len(keep) >= self.population_size:
                break
        self.population = [self.population[i] for i in sorted(keep)]
        self._rank = {self.population[k][0].hash(): rank[i] for k, i in enumerate(sorted(keep))}

    # -- operators ------------------------------------------------------------------------------------------

    def _tournament(self) -> np.ndarray:
        picks = self.rng.choice(len(self.population), size=min(TOURNAMENT, len(self.population)), replace=False)
        best = min(picks, key=lambda i: (self._rank[self.population[i][0].hash()], i))
        return self.space.encode(self.population[best][0])

    def _crossover(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Uniform crossover by step: every coordinate of step k comes from the same parent."""
        child = a.copy()
        steps = {c.step for c in self.coords}
        take_b = {k for k in steps if self.rng.random() < 0.5}
        for i, c in enumerate(self.coords):
            if c.step in take_b:
                child[i] = b[i]
        return child

    def _mutate(self, vec: np.ndarray, strength: float = 1.0) -> np.ndarray:
        vec = vec.copy()
        self._jitter_times(vec, strength)
        for i in self.other_idx:
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
            "population": [[schedule_to_json(s), list(v)] for s, v in self.population],
            "pending_seeds": [schedule_to_json(s) for s in self.pending_seeds],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng = rng_from_state(state["rng"])
        self.told = int(state["told"])
        self.population = [(schedule_from_json(d), tuple(float(x) for x in (v if isinstance(v, list) else [v])))
                           for d, v in state["population"]]
        self.pending_seeds = [schedule_from_json(d) for d in state["pending_seeds"]]
        self._survive()  # recomputes the tournament's ranks (a pure function of the population)
