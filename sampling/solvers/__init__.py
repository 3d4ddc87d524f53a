"""Solver implementations, one module each; what each one is (orders, calls, stochastic) is declared in
``autotune.space.solvers.REGISTRY``, which names the module.

A module provides ``advance(k, step, ctx) -> list[Instruction]``: the instructions that move the state from
tau_k to tau_{k+1} once the model output at tau_k is in slot k (``ctx.call(k)`` made it). A solver that
replaces that call (USF's analytic first step) also provides ``first_call(k, step, ctx)``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from autotune.space.solvers import REGISTRY


def implementation(name: str) -> ModuleType:
    """The module implementing solver ``name`` (as the registry declares it)."""
    return importlib.import_module(f"autotune.sampling.solvers.{REGISTRY[name].module}")
