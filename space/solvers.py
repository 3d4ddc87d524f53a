"""The solver registry: what each solver of the space declares, one line per solver.

A declaration is data (no torch): the schedule validates against it, NFE is counted from it, the search space
draws from it. The formulas live in the solver's own module under ``sampling/solvers/``, named here and imported
only when a plan is built (``autotune.sampling.solvers.implementation``). Adding a solver is that module plus
one line in ``REGISTRY``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SolverInfo:
    """What a solver is, as the rest of the engine needs to know it.

    Args:
        name: the ``Step.solver`` value.
        max_order: orders 1..max_order are valid.
        module: the module under ``autotune.sampling.solvers`` holding its ``advance`` (and, where the solver
            replaces the step's model call, ``first_call``).
        calls_by_order: model calls one step of order p makes (entry p - 1); default one call at any order.
        onto_data_max_order: the largest order of a step onto t = 0 (lambda = inf): most formulas divide by
            the step in lambda there.
        stochastic: the step adds fresh Gaussian noise (an SDE solver): scored by a distribution metric.
        first_step_only: only step 0 may use it (USF's analytic first step).
        self_starting: a step of any order makes every call it needs (Heun), so its order does not need earlier
            model outputs; a multistep order-p step reads p - 1 earlier ones.
        reads_data_mean: the step's ``data_mean`` is its data estimate (USF's analytic first step); no other
            solver may carry one.
    """

    name: str
    max_order: int
    module: str
    calls_by_order: tuple[int, ...] = ()
    onto_data_max_order: int = 1
    stochastic: bool = False
    first_step_only: bool = False
    self_starting: bool = False
    reads_data_mean: bool = False

    def calls(self, order: int) -> int:
        """Model calls a step of this solver and order makes."""
        return self.calls_by_order[order - 1] if self.calls_by_order else 1


REGISTRY: dict[str, SolverInfo] = {info.name: info for info in (
    SolverInfo("dpm", 3, "dpm"),                    # DPM-Solver++ (data) / DPM-Solver (noise), multistep
    SolverInfo("unip-bh1", 3, "unipc"),             # UniPC's predictor UniP, B(h) = h
    SolverInfo("unip-bh2", 3, "unipc"),             # UniP, B(h) = e^h - 1
    SolverInfo("ipndm", 4, "ipndm", onto_data_max_order=4),
    SolverInfo("heun", 2, "heun", calls_by_order=(1, 2), self_starting=True),  # EDM's Heun: two calls
    SolverInfo("dpm-single", 2, "singlestep"),      # DPM-Solver++ 2S on the grid
    SolverInfo("dpm-sde", 2, "sde", stochastic=True),  # DPM-Solver++ 2M SDE
    SolverInfo("afs", 1, "afs", calls_by_order=(0,), first_step_only=True,  # USF's analytic first step
               reads_data_mean=True),
)}

SOLVERS: tuple[str, ...] = tuple(REGISTRY)
# the solvers the default search space draws from: the multistep exponential integrators the search was tuned
# with; others join through `autotune search --solvers` (bench/search.py --grown-space compares the two)
SEARCH_SOLVERS: tuple[str, ...] = ("dpm", "unip-bh1", "unip-bh2", "ipndm")
MAX_ORDER: dict[str, int] = {name: info.max_order for name, info in REGISTRY.items()}


def solver_info(name: str) -> SolverInfo:
    """The declaration of ``name`` (KeyError for an unknown solver: validation names it first)."""
    return REGISTRY[name]
