"""S3 predictors (Liu et al., USF/S3): from a schedule's encoding to its quality metric, trained on few points.

Three pieces, each small:

* :class:`ScheduleFeatures` turns :class:`~autotune.space.encoding.ScheduleSpace` vectors into model inputs:
  times as normalised log-SNR positions (0 at ``t_start``, 1 at the last step's end, or ``t_min`` when the
  schedule ends on the data) plus the step sizes between them, integer coordinates scaled by their bounds,
  categorical coordinates one-hot, booleans as they are.
* :class:`MLPRanker`: an ensemble of small MLPs trained jointly (one batched network, one Adam) on a target
  such as ``log(metric)`` with MSE plus a pairwise logistic (RankNet) loss; each member has its own
  initialisation and Bayesian-bootstrap sample weights, so the ensemble spread is an uncertainty estimate.
  Deterministic for a given seed (training runs on one thread).
* :class:`ForestRegressor`: scikit-learn's random forest behind the same ``fit`` / ``predict`` interface, the
  comparison model.

:func:`log_target` makes the training target from raw metric values (diverged schedules rank last) and
:func:`ranking_quality` scores a prediction by rank agreement (Kendall tau-b, Spearman rho).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.uniform(size=(60, 3))
    >>> y = X[:, 0] + 0.5 * X[:, 1] ** 2
    >>> model = MLPRanker(seed=0).fit(X[:40], y[:40])
    >>> ranking_quality(model.predict(X[40:]), y[40:]).kendall > 0.7
    True
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from autotune.space.encoding import ScheduleSpace

DIVERGED_PENALTY = 1.0  # a diverged schedule's target: the worst finite target plus this (log units: e times worse)
# the ranking loss over every pair costs N^2 per epoch (a 1000-point fit: 16 s on one core, where s3-mf's partial
# estimates make training sets that large); above PAIR_LIMIT points it runs on PAIRS_PER_POINT * N pairs drawn once
PAIR_LIMIT = 256
PAIRS_PER_POINT = 64


# -- features -------------------------------------------------------------------------------------------------


class ScheduleFeatures:
    """Vectors of a space -> features: log-SNR positions and steps of the times, scaled ints, one-hot choices.

    Args:
        space: the space whose vectors are featurised.
        noise: the model's noise schedule; without it (or when its log-SNR is not finite at the end points)
            times are placed linearly between ``t_start`` and ``t_end`` instead.

    Example:
        >>> from autotune.sampling.noise import VPLinear
        >>> space = ScheduleSpace(3, 1.0, 0.0, solvers=("dpm", "ipndm"), predictions=("data",),
        ...                       allow_corrector=False, ratio_range=None)
        >>> f = ScheduleFeatures(space, VPLinear())
        >>> f.names
        ('pos[0]', 'pos[1]', 'dpos[0]', 'dpos[1]', 'dpos[2]', 'order[0]', 'order[1]', 'order[2]', 'solver[0]=dpm', \
'solver[0]=ipndm', 'solver[1]=dpm', 'solver[1]=ipndm', 'solver[2]=dpm', 'solver[2]=ipndm')
        >>> f(np.array([[0.5, 0.1, 1, 2, 3, 0, 1, 1]])).shape
        (1, 14)
    """

    def __init__(self, space: ScheduleSpace, noise: Any = None) -> None:
        self.space = space
        self.noise = noise
        coords = space.coords
        self.time_idx = np.array([i for i, c in enumerate(coords) if c.family == "t"], dtype=np.int64)
        self.scalar_idx = np.array([i for i, c in enumerate(coords) if c.family != "t" and c.kind != "cat"],
                                   dtype=np.int64)
        self.cat_idx = [(i, int(c.high) + 1) for i, c in enumerate(coords) if c.kind == "cat"]
        self._lam_ends = self._log_snr_ends()
        names = [f"pos[{k}]" for k in range(len(self.time_idx))]
        if len(self.time_idx):
            names += [f"dpos[{k}]" for k in range(len(self.time_idx) + 1)]
        names += [coords[i].name for i in self.scalar_idx]
        for i, n_choices in self.cat_idx:
            options = space.choices(coords[i].family)
            names += [f"{coords[i].name}={options[j]}" for j in range(n_choices)]
        self.names = tuple(names)

    @property
    def dim(self) -> int:
        """Number of features."""
        return len(self.names)

    def _log_snr_ends(self) -> tuple[float, float] | None:
        """log-SNR at t_start and at the effective end, or None when it is unavailable or not finite."""
        if self.noise is None:
            return None
        end = self.space.t_end if self.space.t_end > 0 else float(self.noise.t_min)
        try:
            lam = self.noise.lambda_(torch.tensor([self.space.t_start, end], dtype=torch.float64))
        except Exception:  # a schedule without a usable lambda: fall back to linear positions
            return None
        lo, hi = float(lam[0]), float(lam[1])
        return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) and hi != lo else None

    def positions(self, times: np.ndarray) -> np.ndarray:
        """Times -> positions in [0, 1]: 0 at t_start, 1 at the end (log-SNR when available, else linear)."""
        times = np.asarray(times, dtype=np.float64)
        if self._lam_ends is None:
            sp = self.space
            u = (sp.t_start - times) / (sp.t_start - sp.t_end)
        else:
            lo, hi = self._lam_ends
            with np.errstate(invalid="ignore"):
                lam = self.noise.lambda_(torch.from_numpy(times.copy())).numpy()
            u = (lam - lo) / (hi - lo)
            u = np.where(np.isnan(u), 1.0, u)  # lambda(0) = inf - ... ; anything undefined sits at the end
        return np.clip(u, 0.0, 1.0)

    def __call__(self, vectors: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """(N, space.dim) vectors -> (N, dim) float64 features."""
        v = np.asarray(vectors, dtype=np.float64).reshape(-1, self.space.dim)
        parts = []
        if len(self.time_idx):
            pos = np.sort(self.positions(v[:, self.time_idx]), axis=1)  # the decoder sorts times too
            edges = np.concatenate([np.zeros((len(v), 1)), pos, np.ones((len(v), 1))], axis=1)
            parts += [pos, np.diff(edges, axis=1)]
        if len(self.scalar_idx):
            b = self.space.bounds[self.scalar_idx]
            parts.append((v[:, self.scalar_idx] - b[:, 0]) / np.maximum(b[:, 1] - b[:, 0], 1e-12))
        for i, n_choices in self.cat_idx:
            idx = np.clip(np.floor(v[:, i] + 0.5), 0, n_choices - 1).astype(np.int64)
            parts.append(np.eye(n_choices)[idx])
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(v), 0))


def log_target(values: Sequence[float], penalty: float = DIVERGED_PENALTY) -> np.ndarray:
    """log(metric) per value; non-finite (diverged) values get the worst finite log plus ``penalty``.

    Example:
        >>> log_target([1.0, math.e, math.inf]).round(3).tolist()
        [0.0, 1.0, 2.0]
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    out = np.full(v.shape, np.nan)
    out[finite] = np.log(np.maximum(v[finite], 1e-300))
    worst = out[finite].max() if finite.any() else 0.0
    out[~finite] = worst + penalty
    return out


# -- ranking quality ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankingQuality:
    """Rank agreement between a prediction and the truth: Kendall tau-b and Spearman rho, both in [-1, 1]."""

    kendall: float
    spearman: float


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def ranking_quality(pred: Sequence[float], true: Sequence[float]) -> RankingQuality:
    """Kendall tau-b and Spearman rho of ``pred`` against ``true`` (NaN when either is constant).

    Example:
        >>> ranking_quality([1, 2, 3, 4], [10, 20, 40, 30])
        RankingQuality(kendall=0.6666666666666666, spearman=0.8)
    """
    p, t = np.asarray(pred, dtype=np.float64).ravel(), np.asarray(true, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in length ({p.size} vs {t.size})")
    dp, dt = np.sign(p[:, None] - p[None, :]), np.sign(t[:, None] - t[None, :])
    iu = np.triu_indices(len(p), 1)
    dp, dt = dp[iu], dt[iu]
    denom = math.sqrt(float(np.count_nonzero(dp)) * float(np.count_nonzero(dt)))
    kendall = float(np.sum(dp * dt) / denom) if denom > 0 else math.nan
    rp, rt = _ranks(p), _ranks(t)
    rp, rt = rp - rp.mean(), rt - rt.mean()
    denom = math.sqrt(float(np.sum(rp * rp) * np.sum(rt * rt)))
    spearman = float(np.sum(rp * rt) / denom) if denom > 0 else math.nan
    return RankingQuality(kendall, spearman)


# -- models ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread (bit-reproducible training here; search/set_sizes.py times its probe so),
    restoring the caller's setting."""
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)


class _Standardiser:
    """Per-column centring; columns that are not 0/1 indicators are also scaled to unit variance.

    One-hot columns keep their scale: standardising a rare category would blow it up to a large input.
    """

    def __init__(self, x: np.ndarray) -> None:
        self.mean = x.mean(axis=0)
        std = x.std(axis=0)
        binary = np.all((x == 0) | (x == 1), axis=0)
        self.std = np.where((std > 1e-8) & ~binary, std, 1.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


class MLPRanker:
    """Ensemble of ``members`` two-hidden-layer MLPs trained on MSE + pairwise logistic ranking loss.

    The members form one batched network (weights of shape ``(members, in, out)``) trained full-batch by one
    Adam, so an ensemble costs about as much as one net. Inputs and targets are standardised on the training
    set; member ``m`` weighs sample ``i`` by an Exp(1) draw (Bayesian bootstrap) in both losses. The ranking
    loss is ``softplus(-(p_i - p_j) / temperature)`` over every pair with ``y_i > y_j`` (above PAIR_LIMIT points,
    over ``pairs_per_point`` * N such pairs drawn once per fit).

    Args:
        seed: fixes initialisation and bootstrap weights; same seed + same data = same predictions.
        members: ensemble size.
        hidden: width of both hidden layers.
        epochs: full-batch Adam steps.
        lr, weight_decay: Adam settings (decoupled weight decay, AdamW).
        pairs_per_point: above PAIR_LIMIT points, the ranking loss runs on this many sampled pairs per point.
        rank_weight: weight of the ranking loss relative to the MSE.
        temperature: scale of prediction differences in the ranking loss (standardised target units).
    """

    def __init__(self, seed: int = 0, members: int = 5, hidden: int = 64, epochs: int = 300, lr: float = 1e-2,
                 weight_decay: float = 1.0, rank_weight: float = 1.0, temperature: float = 0.2,
                 pairs_per_point: int = PAIRS_PER_POINT) -> None:
        if epochs < 1 or pairs_per_point < 1:
            raise ValueError(f"MLPRanker: epochs and pairs_per_point must be >= 1, got {epochs}, {pairs_per_point}")
        self.seed, self.members, self.hidden, self.epochs = seed, members, hidden, epochs
        self.pairs_per_point = pairs_per_point
        self.lr, self.weight_decay, self.rank_weight, self.temperature = lr, weight_decay, rank_weight, temperature
        self._params: list[torch.Tensor] | None = None

    def _init(self, n_in: int, gen: torch.Generator) -> list[torch.Tensor]:
        sizes = [(n_in, self.hidden), (self.hidden, self.hidden), (self.hidden, 1)]
        params = []
        for fan_in, fan_out in sizes:
            bound = 1.0 / math.sqrt(max(fan_in, 1))
            w = (torch.rand(self.members, fan_in, fan_out, generator=gen, dtype=torch.float32) * 2 - 1) * bound
            b = (torch.rand(self.members, 1, fan_out, generator=gen, dtype=torch.float32) * 2 - 1) * bound
            params += [w.requires_grad_(), b.requires_grad_()]
        return params

    @staticmethod
    def _forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (members, N) predictions."""
        w1, b1, w2, b2, w3, b3 = params
        h = torch.nn.functional.silu(torch.matmul(x, w1) + b1)
        h = torch.nn.functional.silu(torch.bmm(h, w2) + b2)
        return (torch.bmm(h, w3) + b3).squeeze(-1)

    def fit(self, X: np.ndarray, y: Sequence[float]) -> "MLPRanker":
        """Train on features ``X`` (N, F) and targets ``y`` (N,), lower = better; returns self."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64).ravel()
        if len(X) != len(y) or len(y) < 2 or not np.all(np.isfinite(y)):
            raise ValueError("MLPRanker.fit needs at least 2 points with finite targets, one per row of X")
        self._xs = _Standardiser(X)
        self._y_mean, self._y_std = float(y.mean()), float(y.std()) or 1.0
        with one_thread():
            gen = torch.Generator().manual_seed(int(self.seed))
            x = torch.from_numpy(self._xs(X)).float()
            t = torch.from_numpy((y - self._y_mean) / self._y_std).float()
            params = self._init(x.shape[1], gen)
            weights = -torch.log(torch.rand(self.members, len(y), generator=gen, dtype=torch.float32).clamp_min(1e-12))
            weights = weights / weights.mean(dim=1, keepdim=True)
            rank_loss = self._rank_loss(t, weights, gen)
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            for _ in range(self.epochs):
                opt.zero_grad(set_to_none=True)
                p = self._forward(params, x)
                mse = ((p - t) ** 2 * weights).mean(dim=1)
                (mse + self.rank_weight * rank_loss(p)).sum().backward()
                opt.step()
        self._params = [p.detach() for p in params]
        return self

    def _rank_loss(self, t: torch.Tensor, weights: torch.Tensor,
                   gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
        """The per-member ranking loss of predictions (members, N): over every pair with ``t_i > t_j`` up to
        PAIR_LIMIT points (a dense N x N matrix), above it over ``pairs_per_point`` * N pairs drawn uniformly (ties
        dropped), each weighted by its two points' bootstrap weights."""
        n = len(t)
        if n <= PAIR_LIMIT:
            pair_w = weights[:, :, None] * weights[:, None, :] * (t[:, None] > t[None, :]).float()
            pair_norm = pair_w.sum(dim=(1, 2)).clamp_min(1e-12)

            def dense(p: torch.Tensor) -> torch.Tensor:
                diff = (p[:, :, None] - p[:, None, :]) / self.temperature
                return (torch.nn.functional.softplus(-diff) * pair_w).sum(dim=(1, 2)) / pair_norm
            return dense
        i = torch.randint(n, (n * self.pairs_per_point,), generator=gen)
        j = torch.randint(n, (n * self.pairs_per_point,), generator=gen)
        keep = t[i] != t[j]
        i, j = i[keep], j[keep]
        swap = t[i] < t[j]
        worse, better = torch.where(swap, j, i), torch.where(swap, i, j)
        sampled_w = weights[:, worse] * weights[:, better]
        sampled_norm = sampled_w.sum(dim=1).clamp_min(1e-12)

        def sampled(p: torch.Tensor) -> torch.Tensor:
            diff = (p[:, worse] - p[:, better]) / self.temperature
            return (torch.nn.functional.softplus(-diff) * sampled_w).sum(dim=1) / sampled_norm
        return sampled

    def predict_members(self, X: np.ndarray) -> np.ndarray:
        """Every member's prediction, (members, N), in target units."""
        if self._params is None:
            raise RuntimeError("MLPRanker.predict before fit")
        with one_thread(), torch.no_grad():
            x = torch.from_numpy(self._xs(np.asarray(X, dtype=np.float64))).float()
            return self._forward(self._params, x).double().numpy() * self._y_std + self._y_mean

    def predict(self, X: np.ndarray, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Ensemble mean prediction (N,), in target units; with ``return_std`` also the members' spread."""
        p = self.predict_members(X)
        return (p.mean(axis=0), p.std(axis=0)) if return_std else p.mean(axis=0)


class ForestRegressor:
    """scikit-learn random forest on the same features and targets: the comparison for :class:`MLPRanker`.

    Args:
        seed: the forest's ``random_state``.
        n_estimators, min_samples_leaf, max_features: passed to ``RandomForestRegressor``.
    """

    def __init__(self, seed: int = 0, n_estimators: int = 200, min_samples_leaf: int = 2,
                 max_features: float | str = 0.5) -> None:
        self.seed, self.n_estimators = seed, n_estimators
        self.min_samples_leaf, self.max_features = min_samples_leaf, max_features
        self._forest = None

    def fit(self, X: np.ndarray, y: Sequence[float]) -> "ForestRegressor":
        """Train on features ``X`` (N, F) and targets ``y`` (N,); returns self."""
        from sklearn.ensemble import RandomForestRegressor

        self._forest = RandomForestRegressor(
            n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf, max_features=self.max_features,
            random_state=self.seed, n_jobs=1,
        ).fit(np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64).ravel())
        return self

    def predict_members(self, X: np.ndarray, groups: int = 5) -> np.ndarray:
        """Predictions of ``groups`` sub-forests (the trees split into equal consecutive groups), (groups, N)."""
        if self._forest is None:
            raise RuntimeError("ForestRegressor.predict before fit")
        X = np.asarray(X, dtype=np.float64)
        per_tree = np.stack([t.predict(X) for t in self._forest.estimators_])
        return np.stack([chunk.mean(axis=0) for chunk in np.array_split(per_tree, groups)])

    def predict(self, X: np.ndarray, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Mean over trees (N,); with ``return_std`` also the trees' spread."""
        if self._forest is None:
            raise RuntimeError("ForestRegressor.predict before fit")
        X = np.asarray(X, dtype=np.float64)
        if not return_std:
            return self._forest.predict(X)
        per_tree = np.stack([t.predict(X) for t in self._forest.estimators_])
        return per_tree.mean(axis=0), per_tree.std(axis=0)


PREDICTORS = {"mlp": MLPRanker, "forest": ForestRegressor}


def make_predictor(kind: str = "mlp", seed: int = 0, **options: Any) -> MLPRanker | ForestRegressor:
    """A fresh predictor by name ("mlp" or "forest")."""
    if kind not in PREDICTORS:
        raise ValueError(f"unknown predictor {kind!r} (one of {', '.join(PREDICTORS)})")
    return PREDICTORS[kind](seed=seed, **options)
