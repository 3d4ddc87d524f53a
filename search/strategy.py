"""Search strategies: one small ask/tell interface, a registry, and JSON-serialisable state.

A strategy proposes schedules (``ask``), is told their objective value (``tell``, lower is better, inf for a
diverged schedule), and can be saved and restored as JSON (``state`` / ``restore``), so the same strategy
runs in-process, on Ray workers, or resumes after a kill. Adding one is a class plus one registry line.

Several objectives (``SearchContext.objectives``, e.g. mse_ref, nfe, latency_ms): the strategy is told a tuple,
one value per objective, every one to be minimised (the runner negates the objectives where higher is
better). Only strategies whose class sets ``multi_objective = True`` accept tuples, and only those with
``varies_nfe = True`` accept a space whose NFE varies (:class:`~autotune.search.nfe_space.NFERangeSpace`);
``make_strategy`` refuses the others with one line.

A strategy with ``partial_scores = True`` may ask for a batch to be scored on the first noises of the search set
only: after each ``ask`` the runner calls its ``batch_samples()`` (None: the whole set) and tells it the paired
estimate of each such candidate's whole-set mean; each costs that share of an evaluation (search/runner.py). Its
batches are of one fidelity, so ``ask(n)`` may hand out fewer than ``n`` (s3-mf's promotions), never none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from autotune.errors import AutotuneError
from autotune.sampling.noise import NoiseSchedule
from autotune.space.encoding import ScheduleSpace
from autotune.space.fileformat import from_dict, to_dict
from autotune.space.schedule import Schedule


class SearchError(AutotuneError):
    """A search cannot start or continue (unknown method, bad budget, incompatible saved state)."""


@dataclass(frozen=True)
class SearchContext:
    """What every strategy is built from: the space, the model's noise schedule, seeds, the rng seed, objectives."""

    space: ScheduleSpace | Any  # a ScheduleSpace, or an NFERangeSpace (same attributes) when the NFE varies
    noise: NoiseSchedule
    seeds: tuple[Schedule, ...] = ()  # starting points, e.g. the named baselines at this NFE
    seed: int = 0
    objectives: tuple[str, ...] = ("mse_ref",)  # one: tell(schedule, float); several: tell(schedule, tuple)


class Strategy(Protocol):
    name: str

    def ask(self, n: int) -> list[Schedule]: ...

    def tell(self, schedule: Schedule, value: float | tuple[float, ...]) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


STRATEGIES: dict[str, Callable[[SearchContext], Strategy]] = {}


def register(name: str) -> Callable:
    def wrap(factory: Callable[[SearchContext], Strategy]) -> Callable[[SearchContext], Strategy]:
        if name in STRATEGIES:
            raise SearchError(f"search method {name!r} registered twice")
        STRATEGIES[name] = factory
        return factory

    return wrap


def make_strategy(name: str, context: SearchContext) -> Strategy:
    """A registered strategy by name."""
    _load_builtin_strategies()
    if name not in STRATEGIES:
        raise SearchError(f"--method: unknown search method {name!r} (one of {', '.join(sorted(STRATEGIES))})")
    factory = STRATEGIES[name]
    if len(context.objectives) > 1 and not getattr(factory, "multi_objective", False):
        able = ", ".join(n for n, f in sorted(STRATEGIES.items()) if getattr(f, "multi_objective", False))
        raise SearchError(f"--method {name} optimises one objective; for {','.join(context.objectives)} use {able}")
    if not isinstance(context.space, ScheduleSpace) and not getattr(factory, "varies_nfe", False):
        able = ", ".join(n for n, f in sorted(STRATEGIES.items()) if getattr(f, "varies_nfe", False))
        raise SearchError(f"--method {name} searches one NFE; for an NFE range use {able}")
    return factory(context)


def method_names() -> list[str]:
    _load_builtin_strategies()
    return sorted(STRATEGIES)


def _load_builtin_strategies() -> None:
    import importlib

    for module in ("random_search", "evolution", "optuna_space", "s3"):
        try:
            importlib.import_module(f"autotune.search.{module}")
        except ModuleNotFoundError as e:  # a strategy module that is not written yet, or whose extra is missing
            if e.name not in (f"autotune.search.{module}", "optuna", "sklearn"):
                raise


def schedule_to_json(s: Schedule) -> dict[str, Any]:
    return to_dict(s)


def schedule_from_json(doc: dict[str, Any]) -> Schedule:
    return from_dict(doc)


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's state as JSON-compatible data."""
    state = rng.bit_generator.state
    return {"bit_generator": state["bit_generator"], "state": {k: int(v) for k, v in state["state"].items()},
            "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}


def rng_from_state(state: dict[str, Any]) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state
    return rng
