"""A sampling run as a short list of instructions, and the one interpreter that runs it.

``coefficients.make_plan`` turns a schedule into a :class:`Plan`: a flat tuple of instructions whose every
coefficient is precomputed (torch tensors, differentiable in the times and ratios). :func:`interpret` runs it,
one instruction after another, and it is the only place that does: the executor drives it eagerly on tensors,
the baker on Python-float constants (so a trace records one flat graph), and ``AutotuneScheduler`` one model
call per diffusers ``step()`` (the interpreter is a generator that pauses at each call).

Storage: registers hold states (``"x"`` is the current one; ``state_register(k)`` the state a step started
from, kept for correctors and singlestep solvers); slots hold model outputs, each converted once to the
parameterisations (``"data"``, ``"noise"``) the plan reads. A slot is the step index ``k`` for the call at tau_k
that starts step k, or ``(k, i)`` for the i-th extra call inside step k (a two-call Heun step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Generator, Hashable, Iterable, Union

import torch

from autotune.errors import ScheduleError
from autotune.sampling.denoiser import to_data_and_noise

Slot = Hashable
Weight = Any  # a 0-d torch tensor in a plan, a Python float once baked


def state_register(k: int) -> str:
    """The register holding the state step ``k`` started from (after the previous step's corrector)."""
    return f"x{k}"


@dataclass(frozen=True)
class Call:
    """Call the model on register ``at`` at time ``time``; store its output in ``slot`` (as x0 and eps).

    ``skip``: units bypassed in this call; ``reuse``: units not computed, their output taken from the run's feature
    cache (what they returned at the last call that ran them); ``record``: units whose output this call puts in the
    cache because a later call reuses it. The cache belongs to one run and holds ordinary tensors
    (``sampling.denoiser.call_model``), so a trace of the run carries them from call to call. ``forecast``: the
    order of the polynomial in time the reused outputs are extrapolated by from the unit's last computed outputs
    (the schedule's ``reuse_order``; 0: copied from the last one). ``scale``: the factor the data prediction is
    multiplied by (the step's ``data_scale``), the noise prediction following from the state; None: as the model
    gave it, with no arithmetic (so a plan without scales runs exactly as before).
    """

    slot: Slot
    at: str
    time: Any  # tau, a float64 0-d tensor (the model's own time conversion happens in the adapter)
    alpha: Weight
    sigma: Weight
    skip: frozenset[str] = frozenset()
    reuse: frozenset[str] = frozenset()
    record: frozenset[str] = frozenset()
    forecast: int = 0
    scale: Weight | None = None


@dataclass(frozen=True)
class Analytic:
    """USF's analytic first step: no model call; at t = T the state says next to nothing about the data, so x0 is
    its mean (``mean``, one value per channel; empty: 0, as USF has it for centred data) and eps = (x - alpha x0) /
    sigma."""

    slot: Slot
    at: str
    alpha: Weight
    sigma: Weight
    mean: tuple[float, ...] = ()


@dataclass(frozen=True)
class Combine:
    """``reg[dst] = state * reg[src] + sum(w * m[slot]) + noise * z`` with m in ``prediction`` space and z a
    fresh standard normal draw (stochastic solvers); ``state`` None drops the state term."""

    dst: str
    src: str
    state: Weight | None
    outputs: tuple[tuple[Slot, Weight], ...]
    prediction: str
    noise: Weight | None = None


@dataclass(frozen=True)
class Compensate:
    """DC-Solver: ``m[target] = sum(w * m[slot])`` in every stored parameterisation."""

    target: Slot
    outputs: tuple[tuple[Slot, Weight], ...]


@dataclass(frozen=True)
class Copy:
    """``reg[dst] = reg[src]`` (an alias: no arithmetic)."""

    dst: str
    src: str


@dataclass(frozen=True)
class Free:
    """Drop slots and registers no later instruction reads."""

    slots: tuple[Slot, ...] = ()
    registers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mark:
    """``reg["x"]`` is the state at tau_index: step ``index - 1`` ended (``end_of_step``) or a corrector or the
    final denoise replaced it. Where the executor records states, checks finiteness and calls back."""

    index: int
    end_of_step: bool


Instruction = Union[Call, Analytic, Combine, Compensate, Copy, Free, Mark]


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, precomputed from a schedule and a noise schedule.

    ``times``, ``alphas``, ``sigmas`` are at tau_0..tau_N; ``spaces`` the parameterisations the code reads.
    """

    code: tuple[Instruction, ...]
    times: torch.Tensor
    alphas: torch.Tensor
    sigmas: torch.Tensor
    spaces: tuple[str, ...]
    init_scale: float = 1.0  # the prior's std: the initial state is noise x init_scale

    @property
    def calls(self) -> tuple[Call, ...]:
        """The model calls, in order (their count is the plan's NFE)."""
        return tuple(ins for ins in self.code if isinstance(ins, Call))

    @property
    def noise_draws(self) -> int:
        """Fresh standard normal draws a run makes (0 for an ODE schedule)."""
        return sum(1 for ins in self.code if isinstance(ins, Combine) and ins.noise is not None)

    def map_weights(self, fn: Callable[[Any], Any], time_fn: Callable[[Any], Any] | None = None) -> "Plan":
        """The plan with every coefficient (and alpha / sigma of the conversions) passed through ``fn``, and each
        call's time through ``time_fn``: the executor casts to the state's dtype, the baker makes floats."""
        def weights(pairs):
            return tuple((j, fn(w)) for j, w in pairs)

        def one(ins: Instruction) -> Instruction:
            if isinstance(ins, Call):
                return replace(ins, alpha=fn(ins.alpha), sigma=fn(ins.sigma),
                               time=ins.time if time_fn is None else time_fn(ins.time),
                               scale=None if ins.scale is None else fn(ins.scale))
            if isinstance(ins, Analytic):
                return replace(ins, alpha=fn(ins.alpha), sigma=fn(ins.sigma))
            if isinstance(ins, Combine):
                return replace(ins, state=None if ins.state is None else fn(ins.state), outputs=weights(ins.outputs),
                               noise=None if ins.noise is None else fn(ins.noise))
            if isinstance(ins, Compensate):
                return replace(ins, outputs=weights(ins.outputs))
            return ins
        return replace(self, code=tuple(one(ins) for ins in self.code))


def with_frees(code: Iterable[Instruction]) -> tuple[Instruction, ...]:
    """``code`` with a Free after the last read of each slot and saved register (the current state "x" stays)."""
    code = list(code)
    last: dict[tuple[str, Any], int] = {}
    for i, ins in enumerate(code):
        for key in _reads(ins):
            last[key] = i
    out: list[Instruction] = []
    for i, ins in enumerate(code):
        out.append(ins)
        done = [key for key, at in last.items() if at == i and key != ("reg", "x")]
        if done:
            out.append(Free(tuple(k for kind, k in done if kind == "slot"),
                            tuple(k for kind, k in done if kind == "reg")))
    return tuple(out)


def _reads(ins: Instruction) -> list[tuple[str, Any]]:
    if isinstance(ins, (Call, Analytic)):
        return [("reg", ins.at)]
    if isinstance(ins, Combine):
        return ([("reg", ins.src)] if ins.state is not None else []) + [("slot", j) for j, _ in ins.outputs]
    if isinstance(ins, Compensate):
        return [("slot", j) for j, _ in ins.outputs]
    if isinstance(ins, Copy):
        return [("reg", ins.src)]
    return []


def _combine(ins: Combine, regs: dict[str, torch.Tensor], history: dict[int, torch.Tensor],
             draw: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    out = None if ins.state is None else ins.state * regs[ins.src]
    for j, w in ins.outputs:
        term = w * history[j]
        out = term if out is None else out + term
    if ins.noise is not None:
        if draw is None:
            raise ValueError("this plan draws noise (a stochastic solver): give the run a noise source")
        out = out + ins.noise * draw(out)
    return out


Request = tuple[Union[Call, Mark], torch.Tensor]


def interpret(plan: Plan, x: torch.Tensor, parameterization: str,
              draw: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> Generator[Request, Any, torch.Tensor]:
    """Run ``plan`` from the state ``x``: a generator that yields ``(Call, state)`` and expects
    ``(model output, state)`` back (the state as the driver evaluated it: a diffusers pipeline hands back its
    own latents), and yields ``(Mark, state)`` expecting nothing; it returns the final state.

    ``draw(like)`` returns a standard normal tensor shaped like ``like``, for stochastic solvers. The weights are
    used as they are in the plan: cast them first with ``Plan.map_weights``.
    """
    regs: dict[str, torch.Tensor] = {"x": x}
    hist: dict[str, dict[Slot, torch.Tensor]] = {p: {} for p in plan.spaces}
    for ins in plan.code:
        if isinstance(ins, Call):
            out, state = yield ins, regs[ins.at]
            regs[ins.at] = state
            x0, eps = to_data_and_noise(out, state, ins.alpha, ins.sigma, parameterization)
            if ins.scale is not None:
                x0 = ins.scale * x0
                eps = (state - ins.alpha * x0) / ins.sigma
            for p in plan.spaces:
                hist[p][ins.slot] = x0 if p == "data" else eps
        elif isinstance(ins, Combine):
            regs[ins.dst] = _combine(ins, regs, hist[ins.prediction], draw)
        elif isinstance(ins, Compensate):
            for p in plan.spaces:
                comp = torch.zeros_like(hist[p][ins.target])
                for j, w in ins.outputs:
                    comp = comp + w * hist[p][j]
                hist[p][ins.target] = comp
        elif isinstance(ins, Copy):
            regs[ins.dst] = regs[ins.src]
        elif isinstance(ins, Free):
            for p in plan.spaces:
                for j in ins.slots:
                    hist[p].pop(j, None)
            for r in ins.registers:
                regs.pop(r, None)
        elif isinstance(ins, Mark):
            yield ins, regs["x"]
        elif isinstance(ins, Analytic):
            x0 = analytic_data(ins, regs[ins.at])
            eps = (regs[ins.at] - ins.alpha * x0) / ins.sigma
            for p in plan.spaces:
                hist[p][ins.slot] = x0 if p == "data" else eps
        else:  # pragma: no cover - a new instruction kind without a case here
            raise TypeError(f"unknown instruction {type(ins).__name__}")
    return regs["x"]


def analytic_data(ins: Analytic, x: torch.Tensor) -> torch.Tensor:
    """The data estimate of an analytic step on state ``x``: its per-channel mean broadcast over ``x``, or zeros."""
    if not ins.mean:
        return torch.zeros_like(x)
    if x.dim() < 2 or x.shape[1] != len(ins.mean):
        raise ScheduleError(f"steps[{ins.slot}].data_mean", f"{len(ins.mean)} values, but the model's state has "
                            f"shape {tuple(x.shape)} ({x.shape[1] if x.dim() > 1 else 'no'} channels in dimension 1)")
    mean = torch.tensor(ins.mean, dtype=x.dtype, device=x.device)
    return mean.reshape((1, -1) + (1,) * (x.dim() - 2)).expand_as(x)


def run(plan: Plan, x: torch.Tensor, parameterization: str, call: Callable[[Call, torch.Tensor], torch.Tensor],
        mark: Callable[[Mark, torch.Tensor], None] | None = None,
        draw: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Drive :func:`interpret` to the end: ``call(instruction, state)`` returns the model output there, and
    ``mark(instruction, state)`` sees each marked state."""
    steps = interpret(plan, x, parameterization, draw)
    reply = None
    try:
        while True:
            ins, state = steps.send(reply)
            if isinstance(ins, Call):
                reply = (call(ins, state), state)
            else:
                if mark is not None:
                    mark(ins, state)
                reply = None
    except StopIteration as done:
        return done.value


__all__ = ["Analytic", "Call", "Combine", "Compensate", "Copy", "Free",
           "Instruction", "Mark", "Plan", "interpret", "run", "state_register", "with_frees"]
