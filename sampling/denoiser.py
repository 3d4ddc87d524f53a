"""The one model interface the executor sees, the parameterisation conversions, unit skipping and reuse.

A denoiser maps ``(x, t)`` (t in the noise schedule's continuous time, a 0-d tensor) plus optional
conditioning to its raw network output, and declares which parameterisation that output is in.
The executor converts it to the data prediction x0 and the noise prediction eps.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
from typing import Any, Callable, Iterable, Iterator, MutableMapping, Protocol, runtime_checkable

import torch
from torch import nn

from autotune.errors import ModelError, SamplingError
from autotune.sampling.noise import NoiseSchedule
from autotune.space.schedule import REUSE_ORDERS

PARAMETERIZATIONS = ("epsilon", "sample", "v_prediction", "flow")


@runtime_checkable
class Denoiser(Protocol):
    """What every model adapter provides.

    ``__call__`` returns the network output for the batch ``x`` at time ``t`` with the units named in
    ``skip`` bypassed; ``cond`` is model specific (class labels, prompt embeddings) and ``guidance`` the
    classifier-free guidance scale (ignored by unguided models). A model that supports reuse (``TorchDenoiser``
    and its subclasses) also takes ``reuse=``, ``record=`` and ``cache=`` (see :func:`caching`); runs pass them
    through :func:`call_model`, only to calls that reuse or record, so other models never see them.
    """

    noise: NoiseSchedule
    parameterization: str
    units: tuple[str, ...]

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Any = None,
        *,
        skip: frozenset[str] = frozenset(),
        guidance: float | None = None,
    ) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...


def to_data_and_noise(
    output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, parameterization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a network output, using x = alpha x0 + sigma eps."""
    if parameterization == "epsilon":
        eps = output
        return (x - sigma * eps) / alpha, eps
    if parameterization == "sample":
        x0 = output
        return x0, (x - alpha * x0) / sigma
    if parameterization == "v_prediction":  # v = alpha eps - sigma x0
        norm = alpha * alpha + sigma * sigma
        return (alpha * x - sigma * output) / norm, (sigma * x + alpha * output) / norm
    if parameterization == "flow":  # u = eps - x0
        x0 = (x - sigma * output) / (alpha + sigma)
        return x0, x0 + output
    raise ModelError(f"parameterization: unknown {parameterization!r} (one of {', '.join(PARAMETERIZATIONS)})")


def prunable_units(module: nn.Module) -> tuple[str, ...]:
    """Submodules that can be bypassed by returning their input: same-shape residual blocks and
    residual attention (diffusers ResnetBlock2D without a shortcut conv, Attention with a residual)."""
    units = []
    for name, sub in module.named_modules():
        cls = type(sub).__name__
        if cls == "ResnetBlock2D" and getattr(sub, "conv_shortcut", None) is None and getattr(sub, "up", False) is False \
                and getattr(sub, "down", False) is False:
            units.append(name)
        elif cls == "Attention" and getattr(sub, "residual_connection", False):
            units.append(name)
        elif getattr(sub, "autotune_prunable", False):
            units.append(name)
    return tuple(units)


class Units(tuple):
    """A model's skippable units (a plain tuple of names) that also names its ``reusable`` units: every skippable
    unit plus reuse-only ones (``autotune_cacheable``: a UNet's deep branch, whose output shape differs from its
    input, so it can be reused but not bypassed). ``Schedule.check_units`` reads ``reusable`` from it."""

    reusable: tuple[str, ...]

    def __new__(cls, skippable: Iterable[str], reuse_only: Iterable[str] = ()) -> "Units":
        obj = super().__new__(cls, tuple(skippable))
        obj.reusable = tuple(obj) + tuple(u for u in reuse_only if u not in obj)
        return obj

    def __reduce__(self):  # pickles (Ray workers) keep the reusable names
        return (Units, (tuple(self), tuple(u for u in self.reusable if u not in self)))


def cacheable_units(module: nn.Module) -> tuple[str, ...]:
    """Submodules flagged ``autotune_cacheable = True``: their output can be cached and reused (not skipped)."""
    return tuple(name for name, sub in module.named_modules() if getattr(sub, "autotune_cacheable", False))


def _identity_forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


@contextlib.contextmanager
def skipping(module: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Within the block, the named submodules return their first input unchanged (their compute is skipped)."""
    names = list(names)
    if not names:
        yield
        return
    subs = dict(module.named_modules())
    patched = []
    try:
        for n in names:
            if n not in subs:
                raise SamplingError(f"skip: the model has no unit {n!r}")
            sub = subs[n]
            patched.append(sub)
            # instance attribute shadows the class method; a residual unit returns the inputs its outputs update
            sub.forward = (_identity_forward if getattr(sub, "autotune_residual", None) is None
                           else functools.partial(_residual_forward, sub, None))
        yield
    finally:
        for sub in patched:
            if "forward" in sub.__dict__:
                del sub.forward


# (time, output) pairs a FeatureCache keeps per unit: as many as the highest forecast order's polynomial passes through
HISTORY = max(REUSE_ORDERS) + 1


class FeatureCache(dict):
    """One run's feature cache: unit name -> the output it produced at the last call that ran it (what
    :func:`caching` reads and writes). ``history``: unit -> the (time, output) of the last ``HISTORY`` calls that
    recorded it, which a forecast (``Call.forecast``) extrapolates from; :func:`call_model` keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[Any, Any]]] = {}


def map_features(fn: Callable[..., Any], *features: Any) -> Any:
    """``fn`` over the tensors of cached features of one structure: a tensor, or a tuple of tensors and Nones (a
    transformer block's ``(encoder_hidden_states, hidden_states)``, None where the block outputs none)."""
    first = features[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(map_features(fn, *parts) for parts in zip(*features))
    return fn(*features)


def forecast(history: list[tuple[Any, Any]], t: Any, order: int = 1) -> Any:
    """The unit's output at time ``t`` extrapolated from its last computed ones ``[..., (t0, h0), (t1, h1), (t2, h2)]``
    by the polynomial in time through the last ``order + 1`` of them (TaylorSeer's expansion of that order, in the
    Newton form): order 1 is the line through the last two, order 2 the parabola through the last three. With fewer
    outputs than that, the highest order they allow; with one, that output (DeepCache's copy). Times are the
    schedule's, as the plan holds them (0-d tensors, so the weights are graph constants when baked and
    differentiable when refined)."""
    if len(history) < 2 or order < 1:
        return history[-1][1]
    if order == 1 or len(history) == 2:
        (t0, h0), (t1, h1) = history[-2:]
        weight = (t - t1) / (t1 - t0)

        def extrapolate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return b + _like(weight, b) * (b - a)

        return map_features(extrapolate, h0, h1)
    (t0, h0), (t1, h1), (t2, h2) = history[-3:]
    # p(t) = h2 + w1 (h2 - h1) + w2 ((h2 - h1) - r (h1 - h0)): the line through the last two plus the second divided
    # difference's term, so the first-order part is computed as order 1 computes it
    w1 = (t - t2) / (t2 - t1)
    w2 = (t - t2) * (t - t1) / ((t2 - t0) * (t2 - t1))
    r = (t2 - t1) / (t1 - t0)

    def extrapolate2(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        d1 = c - b
        return c + _like(w1, c) * d1 + _like(w2, c) * (d1 - _like(r, c) * (b - a))

    return map_features(extrapolate2, h0, h1, h2)


def _like(weight: Any, feature: torch.Tensor) -> Any:
    """A forecast weight on the feature's device and dtype (a plain number as it is)."""
    return weight.to(device=feature.device, dtype=feature.dtype) if isinstance(weight, torch.Tensor) else weight


@contextlib.contextmanager
def caching(module: nn.Module, reuse: Iterable[str], record: Iterable[str], cache: MutableMapping[str, Any]
            ) -> Iterator[None]:
    """Within the block, each unit named in ``reuse`` returns ``cache[unit]`` without computing, and each unit in
    ``record`` computes as usual and stores its output in ``cache[unit]`` (DeepCache's feature reuse).

    The cache is a plain dict of tensors owned by one run; nothing here branches on a tensor's value, so a traced
    run records the cached features as edges from the call that computed them to the calls that reuse them.
    A unit that did not run (an enclosing unit was reused or skipped) does not update its entry.

    A *residual* unit (``autotune_residual``, see :func:`residual_forward_inputs`: a transformer block on the
    residual stream) caches what it added to its inputs, and a reusing call adds that to its current inputs
    (FORA's and TeaCache's residual caching): reusing blocks k..n-1 of a stack adds their cached residuals, which is
    FirstBlockCache's reuse of the stack's residual when k = 1.
    """
    reuse, record = list(reuse), [u for u in record if u not in set(reuse)]
    if not reuse and not record:
        yield
        return
    subs = dict(module.named_modules())
    patched = []
    try:
        for n in reuse + record:
            if n not in subs:
                raise SamplingError(f"reuse: the model has no unit {n!r}")
        for n in reuse:
            if n not in cache:
                raise SamplingError(f"reuse: unit {n!r} has no cached output (no earlier call of this run ran it)")
            sub = subs[n]
            patched.append(sub)
            if getattr(sub, "autotune_residual", None) is None:
                sub.forward = functools.partial(_cached_forward, cache, n)
            else:
                sub.forward = functools.partial(_residual_forward, sub, functools.partial(cache.__getitem__, n))
        for n in record:
            sub = subs[n]
            patched.append(sub)
            recorder = _recording_forward if getattr(sub, "autotune_residual", None) is None else _recording_residual
            sub.forward = functools.partial(recorder, type(sub).forward.__get__(sub), cache, n)
        yield
    finally:
        for sub in patched:
            if "forward" in sub.__dict__:
                del sub.forward


def _cached_forward(cache: MutableMapping[str, Any], name: str, *args: Any, **kwargs: Any) -> Any:
    return cache[name]


def _recording_forward(forward: Callable[..., Any], cache: MutableMapping[str, Any], name: str, *args: Any,
                       **kwargs: Any) -> Any:
    out = forward(*args, **kwargs)
    cache[name] = out
    return out


@functools.lru_cache(maxsize=64)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def residual_forward_inputs(unit: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The inputs a residual unit's outputs update, in its output's structure: ``unit.autotune_residual`` names, for
    each element of the output tuple, the ``forward`` argument it is that argument plus the unit's residual of
    (``("encoder_hidden_states", "hidden_states")`` for diffusers' SD3 and Flux blocks); one name for a unit that
    outputs one tensor."""
    names = unit.autotune_residual
    bound = _forward_signature(type(unit)).bind_partial(unit, *args, **kwargs).arguments
    if isinstance(names, str):
        return bound[names]
    return tuple(bound.get(name) for name in names)


def unit_residual(unit: nn.Module, name: str, out: Any, args: tuple, kwargs: dict) -> Any:
    """What the residual unit ``unit`` (named ``name``) added to its inputs in the call ``forward(*args, **kwargs)``
    that returned ``out``: what a recording call caches. Raises SamplingError when ``out`` does not have the structure
    of the unit's residual mark."""
    inputs = residual_forward_inputs(unit, args, kwargs)
    if isinstance(out, tuple) != isinstance(inputs, tuple) or (isinstance(out, tuple) and len(out) != len(inputs)):
        got = f"a tuple of {len(out)}" if isinstance(out, tuple) else "one output"
        raise SamplingError(f"reuse: unit {name!r} ({type(unit).__name__}) returns {got}, but its residual streams "
                            f"are {unit.autotune_residual!r} (a diffusers version whose blocks return another "
                            f"structure)")
    return map_features(lambda y, x: y - x, out, inputs)


def with_residual(unit: nn.Module, residual: Any, args: tuple, kwargs: dict) -> Any:
    """The residual unit's output for the call ``forward(*args, **kwargs)`` when it adds the cached ``residual`` to
    this call's inputs instead of computing: what a reusing call returns."""
    return map_features(lambda r, x: x + r, residual, residual_forward_inputs(unit, args, kwargs))


def _residual_forward(unit: nn.Module, residual: Callable[[], Any] | None, *args: Any, **kwargs: Any) -> Any:
    """A residual unit not computed: its inputs plus the cached residual (``residual()``), or unchanged (skipped)."""
    if residual is None:
        return residual_forward_inputs(unit, args, kwargs)
    return with_residual(unit, residual(), args, kwargs)


def _recording_residual(forward: Callable[..., Any], cache: MutableMapping[str, Any], name: str, *args: Any,
                        **kwargs: Any) -> Any:
    out = forward(*args, **kwargs)
    cache[name] = unit_residual(forward.__self__, name, out, args, kwargs)
    return out


@functools.lru_cache(maxsize=64)
def _takes_reuse(cls: type) -> bool:
    try:
        return "reuse" in inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return False


def call_model(model: Denoiser, ins: Any, x: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float | None,
               cache: FeatureCache) -> torch.Tensor:
    """The model call of a plan's ``Call`` instruction ``ins`` (its skip, reuse and record masks) with the run's
    feature ``cache``: the one path the executor and the baker share. A call that neither reuses nor records calls
    the model exactly as before; one that does needs a model taking ``reuse=`` (a ``TorchDenoiser``).

    A forecasting call (``ins.forecast``) reads, for each reused unit, :func:`forecast` of the unit's history in
    place of its last output (put back after the call); every unit this call computed and recorded joins its
    history at time ``t``."""
    if not ins.reuse and not ins.record:
        return model(x, t, cond, skip=ins.skip, guidance=guidance)
    if not _takes_reuse(type(model)):
        raise SamplingError(f"reuse: the model ({type(model).__name__}) cannot reuse cached unit outputs")
    return with_features(ins, t, cache, lambda: model(x, t, cond, skip=ins.skip, guidance=guidance, reuse=ins.reuse,
                                                      record=ins.record, cache=cache))


def with_features(ins: Any, t: Any, cache: MutableMapping[str, Any], run: Callable[[], Any]) -> Any:
    """``run()``, a model call under ``ins``'s masks that reads and writes ``cache`` (see :func:`call_model`), with
    the forecasts of ``ins``'s reused units in place and the outputs it recorded added to their history at ``t``.
    Also what a diffusers UNet runs a schedule's masks under (``autotune.diffusers_masks``)."""
    history = getattr(cache, "history", None)
    if ins.forecast and history is None:
        raise SamplingError("reuse: a forecasting call needs the run's FeatureCache (it keeps the units' history)")
    last = {u: cache[u] for u in ins.reuse if ins.forecast and len(history.get(u, ())) >= 2}
    before = {u: cache.get(u) for u in ins.record}
    try:
        cache.update({u: forecast(history[u], t, ins.forecast) for u in last})
        out = run()
    finally:
        cache.update(last)
    if history is not None:
        for u in ins.record:
            if u in cache and cache[u] is not before[u]:  # the unit ran (no enclosing unit was reused or skipped)
                history[u] = history.get(u, [])[1 - HISTORY:] + [(t, cache[u])]
    return out


@contextlib.contextmanager
def unit_masks(module: nn.Module | None, skip: Iterable[str], reuse: Iterable[str], record: Iterable[str],
               cache: FeatureCache | None) -> Iterator[None]:
    """``skipping`` and ``caching`` together: what one model call with a step's masks runs under."""
    if module is None or (not skip and not reuse and not record):
        yield
        return
    if (reuse or record) and cache is None:
        raise SamplingError("reuse: a call that reuses or records unit outputs needs the run's feature cache")
    with skipping(module, skip), caching(module, reuse, record, cache if cache is not None else {}):
        yield


def fingerprint_module(module: nn.Module | None, config: Any) -> str:
    """SHA-256 (16 hex) over the module's weights and a JSON-able config: a model's identity in caches."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    if module is not None:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TorchDenoiser:
    """Adapter for any torch callable ``fn(x, model_time, cond) -> output``.

    Args:
        fn: the network; receives the batch, the model time (``noise.model_time(t)`` expanded to the
            batch) and the conditioning (omitted when None).
        noise: the model's noise schedule.
        parameterization: one of ``epsilon``, ``sample``, ``v_prediction``, ``flow``.
        module: the nn.Module whose units may be skipped (defaults to ``fn`` when it is one).
        round_time: feed integer model times when within 1e-6 of one (discrete models), with the
            gradient passed straight through.

    Example:
        >>> from autotune.sampling.noise import VPLinear
        >>> d = TorchDenoiser(lambda x, t: 0 * x, VPLinear(), "epsilon")
        >>> d(torch.zeros(2, 3), torch.tensor(0.5)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        noise: NoiseSchedule,
        parameterization: str,
        *,
        module: nn.Module | None = None,
        round_time: bool = False,
        config: Any = None,
    ) -> None:
        if parameterization not in PARAMETERIZATIONS:
            raise ModelError(f"parameterization: unknown {parameterization!r} (one of {', '.join(PARAMETERIZATIONS)})")
        self.fn = fn
        self.noise = noise
        self.parameterization = parameterization
        self.module = module if module is not None else (fn if isinstance(fn, nn.Module) else None)
        self.units = (Units(prunable_units(self.module), cacheable_units(self.module)) if self.module is not None
                      else Units(()))
        self.round_time = round_time
        self.config = config if config is not None else {"noise": noise.to_config(), "parameterization": parameterization}

    def model_time(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tm = self.noise.model_time(t)
        if self.round_time:
            tm = tm + (torch.where((tm - tm.round()).abs() < 1e-6, tm.round(), tm) - tm).detach()
        return tm.to(x.dtype if tm.dtype.is_floating_point else tm.dtype).expand(x.shape[0])

    def __call__(self, x, t, cond=None, *, skip=frozenset(), guidance=None, reuse=frozenset(), record=frozenset(),
                 cache=None):
        tm = self.model_time(x, t)
        with unit_masks(self.module, skip, reuse, record, cache):
            return self.fn(x, tm) if cond is None else self.fn(x, tm, cond)

    def fingerprint(self) -> str:
        return fingerprint_module(self.module, self.config)
