"""Noise schedules: alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t) and the inverse of lambda.

Every schedule maps a continuous time ``t`` in ``[0, T]`` to the forward process
``x_t = alpha_t x_0 + sigma_t eps``; ``t = 0`` is the clean data (sigma = 0, lambda = +inf) for all
of them, so a schedule whose last time is 0 ends exactly on the data. All functions take and return
tensors, are vectorised, and are differentiable in ``t`` (the gradient search moves the time grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from autotune.errors import ModelError


@runtime_checkable
class NoiseSchedule(Protocol):
    """The forward process of a diffusion model, in continuous time."""

    kind: str
    T: float  # the time the ODE starts at
    t_min: float  # smallest positive time the network was trained at

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor: ...
    def sigma(self, t: torch.Tensor) -> torch.Tensor: ...
    def lambda_(self, t: torch.Tensor) -> torch.Tensor: ...
    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor: ...
    def model_time(self, t: torch.Tensor) -> torch.Tensor: ...
    def init_scale(self) -> float: ...
    def to_config(self) -> dict[str, Any]: ...


def alpha(ns: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """alpha_t of any schedule."""
    return torch.exp(ns.log_alpha(t))


# a schedule starting this far below T (relative) starts from a noised image (image-to-image); closer to T it
# starts from pure noise, as DPM-Solver's flow sigmas do at 1 - 1/N (alpha 1e-3: the image is invisible there)
IMAGE_START_BELOW = 1e-2


def starts_from_image(ns: NoiseSchedule, t_start: float) -> bool:
    """Whether a schedule starting at ``t_start`` is an image-to-image run (its state there a noised image)."""
    return float(t_start) < float(ns.T) * (1.0 - IMAGE_START_BELOW)


def noised(ns: NoiseSchedule, data: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """The forward process at time t: ``alpha_t x0 + sigma_t eps`` (the start of an image-to-image run)."""
    tt = torch.tensor(float(t), dtype=torch.float64)
    a, s = torch.exp(ns.log_alpha(tt)), ns.sigma(tt)
    return (a.to(data.dtype) * data + s.to(data.dtype) * noise.to(data.dtype))


def _as_tensor(t: torch.Tensor | float) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through increasing ``xp``, linear extrapolation, differentiable in x."""
    xp = xp.to(x.dtype)
    fp = fp.to(x.dtype)
    idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


def _log_alpha_to_sigma(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(-torch.expm1(2.0 * log_alpha))


def _vp_lambda(log_alpha: torch.Tensor) -> torch.Tensor:
    return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _vp_log_alpha_of_lambda(lam: torch.Tensor) -> torch.Tensor:
    # alpha^2 = 1 / (1 + e^{-2 lambda})
    return -0.5 * torch.nn.functional.softplus(-2.0 * lam)


def betas_for(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """DDPM betas as diffusers defines them (linear, scaled_linear, squaredcos_cap_v2), in float64."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=np.float64)
    raise ModelError(f"beta_schedule: unknown value {beta_schedule!r} (linear, scaled_linear, squaredcos_cap_v2)")


@dataclass(frozen=True, eq=False)
class VPDiscrete:
    """Discrete-time VP (DDPM) schedule, log alpha interpolated linearly in t (DPM-Solver's convention).

    Training step ``n`` in ``0..N-1`` sits at ``t = (n + 1) / N``; T = 1. Between t = 0 and t = 1/N the
    log alpha goes linearly to 0 so that t = 0 is exactly the data (diffusers' ``final_sigmas_type="zero"``).
    """

    alphas_cumprod: np.ndarray
    kind: str = "vp_discrete"
    T: float = 1.0
    _t_nodes: torch.Tensor = field(init=False, repr=False)
    _log_alpha_nodes: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        acp = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if acp.ndim != 1 or len(acp) < 2 or not np.all(np.diff(acp) < 0) or acp[0] >= 1 or acp[-1] <= 0:
            raise ModelError("alphas_cumprod: must be a strictly decreasing 1-D array inside (0, 1)")
        n = len(acp)
        t_nodes = np.concatenate([[0.0], (np.arange(n) + 1.0) / n])
        log_alpha_nodes = np.concatenate([[0.0], 0.5 * np.log(acp)])
        object.__setattr__(self, "alphas_cumprod", acp)
        object.__setattr__(self, "_t_nodes", torch.from_numpy(t_nodes))
        object.__setattr__(self, "_log_alpha_nodes", torch.from_numpy(log_alpha_nodes))

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "VPDiscrete":
        return cls(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "VPDiscrete":
        """Reads ``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end`` or ``trained_betas``."""
        if config.get("trained_betas") is not None:
            return cls.from_betas(np.asarray(config["trained_betas"], dtype=np.float64))
        if config.get("rescale_betas_zero_snr"):
            raise ModelError("scheduler config: rescale_betas_zero_snr=true is not supported (alpha_T = 0)")
        betas = betas_for(
            config.get("beta_schedule", "linear"),
            int(config.get("num_train_timesteps", 1000)),
            float(config.get("beta_start", 0.0001)),
            float(config.get("beta_end", 0.02)),
        )
        return cls.from_betas(betas)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def t_min(self) -> float:
        return 1.0 / self.num_train_timesteps

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = _as_tensor(t)
        return _interp(t, self._t_nodes, self._log_alpha_nodes)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _log_alpha_to_sigma(self.log_alpha(t))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        return _vp_lambda(self.log_alpha(t))

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        log_alpha = _vp_log_alpha_of_lambda(_as_tensor(lam))
        # log alpha decreases in t: interpolate on the flipped (increasing) nodes
        return _interp(log_alpha, self._log_alpha_nodes.flip(0), self._t_nodes.flip(0))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The training step index the network expects: n = t N - 1 (999 at T for N = 1000)."""
        return _as_tensor(t) * self.num_train_timesteps - 1.0

    def init_scale(self) -> float:
        return 1.0

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_train_timesteps": self.num_train_timesteps}


@dataclass(frozen=True)
class VPLinear:
    """Continuous-time VP-SDE with linear beta(t) = beta_0 + t (beta_1 - beta_0) on t in [0, 1]."""

    beta_0: float = 0.1
    beta_1: float = 20.0
    t_min: float = 1e-3
    time_scale: float = 1000.0  # the network sees t * time_scale (score-SDE convention)
    kind: str = "vp_linear"
    T: float = 1.0

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = _as_tensor(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _log_alpha_to_sigma(self.log_alpha(t))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        return _vp_lambda(self.log_alpha(t))

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        # solve 0.25 (b1 - b0) t^2 + 0.5 b0 t + log_alpha = 0 for t >= 0, in a cancellation-free form
        neg_log_alpha = -_vp_log_alpha_of_lambda(_as_tensor(lam))
        a, b = 0.25 * (self.beta_1 - self.beta_0), 0.5 * self.beta_0
        return 2.0 * neg_log_alpha / (b + torch.sqrt(b * b + 4.0 * a * neg_log_alpha))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return _as_tensor(t) * self.time_scale

    def init_scale(self) -> float:
        return 1.0

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta_0": self.beta_0, "beta_1": self.beta_1, "t_min": self.t_min}


@dataclass(frozen=True)
class EDM:
    """VE / EDM: alpha = 1, sigma = t on t in [0, sigma_max]; lambda = -log t. The network sees sigma."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    kind: str = "edm"

    @property
    def T(self) -> float:  # noqa: N802 - the paper's name
        return self.sigma_max

    @property
    def t_min(self) -> float:
        return self.sigma_min

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_as_tensor(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _as_tensor(t)

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log(_as_tensor(t))

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.exp(-_as_tensor(lam))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return _as_tensor(t)

    def init_scale(self) -> float:
        return self.sigma_max

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


TIME_SHIFTS = ("exponential", "linear")


def static_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow schedulers' static shift of a sigma grid: ``shift s / (1 + (shift - 1) s)``."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


@dataclass(frozen=True)
class FlowMatching:
    """Rectified flow / flow matching: alpha = 1 - t, sigma = t on [0, 1]; velocity u = eps - x0.

    The ODE does not depend on the shift fields: they say which sigmas the model's own diffusers pipeline
    steps through (FlowMatchEulerDiscreteScheduler's ``shift``, or its resolution-dependent ``mu`` with
    ``use_dynamic_shifting``, ``shift_terminal``, and whether the pipeline passes ``sigmas`` itself as
    Flux's does), so that the named flow schedules reproduce that pipeline. See ``inference_sigmas``.
    """

    t_min: float = 1e-3
    time_scale: float = 1000.0  # diffusers' flow models see t * num_train_timesteps
    # start just below 1 (as diffusers does): at t = 1 alpha = 0, lambda = -inf, and UniPC's B(h) is infinite
    T: float = 1.0 - 1e-6
    kind: str = "flow"
    shift: float = 1.0  # static shift: sigma -> shift sigma / (1 + (shift - 1) sigma)
    mu: float | None = None  # dynamic shift (use_dynamic_shifting), fixed by the model's resolution
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    pipeline_sigmas: bool = False  # the pipeline passes sigmas = linspace(1, 1/n, n) (Flux) instead of None (SD3)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ModelError(f"flow schedule: shift must be a positive number, got {self.shift!r}")
        if self.mu is not None and not math.isfinite(self.mu):
            raise ModelError(f"flow schedule: mu must be a finite number, got {self.mu!r}")
        if self.time_shift_type not in TIME_SHIFTS:
            raise ModelError(f"flow schedule: time_shift_type {self.time_shift_type!r} is not one of "
                             f"{', '.join(TIME_SHIFTS)}")
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ModelError(f"flow schedule: shift_terminal must be in (0, 1), got {self.shift_terminal!r}")

    @property
    def num_train_timesteps(self) -> int:
        return int(round(self.time_scale))

    def shifted(self, sigmas: np.ndarray) -> np.ndarray:
        """The pipeline's shift of a sigma grid: dynamic (mu) when the model has one, else the static shift."""
        if self.mu is not None:
            if self.time_shift_type == "exponential":
                return math.exp(self.mu) / (math.exp(self.mu) + (1.0 / sigmas - 1.0))
            return self.mu / (self.mu + (1.0 / sigmas - 1.0))
        return static_shift(sigmas, self.shift)

    @property
    def multistep_flow_shift(self) -> float:
        """``flow_shift`` of UniPC / DPM-Solver with ``use_flow_sigmas``: exp(mu) under dynamic shifting."""
        return math.exp(self.mu) if self.mu is not None else self.shift

    def inference_sigmas(self, nfe: int) -> list[float]:
        """The ``nfe`` decreasing sigmas FlowMatchEulerDiscreteScheduler.set_timesteps gives in this model's
        pipeline (float32 as there; the final 0 not included)."""
        n = self.num_train_timesteps
        if self.pipeline_sigmas:
            sigmas = np.linspace(1.0, 1.0 / nfe, nfe).astype(np.float32)
        else:
            # the scheduler's own range: its training sigmas, already shifted once when the shift is static
            train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
            if self.mu is None:
                train = self.shifted(train)
            sigmas = (np.linspace(float(train[0]) * n, float(train[-1]) * n, nfe) / n).astype(np.float32)
        sigmas = np.asarray(self.shifted(sigmas), dtype=np.float32)
        if self.shift_terminal:
            one_minus = 1.0 - sigmas
            sigmas = 1.0 - one_minus / (one_minus[-1] / (1.0 - self.shift_terminal))
        return [float(s) for s in np.asarray(sigmas, dtype=np.float32)]

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-_as_tensor(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _as_tensor(t)

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        t = _as_tensor(t)
        return torch.log1p(-t) - torch.log(t)

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-_as_tensor(lam))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return _as_tensor(t) * self.time_scale

    def init_scale(self) -> float:
        return 1.0

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"kind": self.kind, "t_min": self.t_min}
        # only what differs from a plain flow model, so existing fingerprints (gmm2d-flow) do not move
        for key, default in (("time_scale", 1000.0), ("shift", 1.0), ("mu", None), ("time_shift_type", "exponential"),
                             ("shift_terminal", None), ("pipeline_sigmas", False)):
            if getattr(self, key) != default:
                config[key] = getattr(self, key)
        return config
