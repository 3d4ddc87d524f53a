"""`s3`: predictor-guided search (S3, Liu et al., "A Unified Sampling Framework for Solver Searching of DPMs").

The loop: evaluate a seed population truly (the named baselines, then prior samples and mutations of them,
``n_init`` in all), train a light predictor (:mod:`autotune.predictors.s3`) from schedule features to
``log(metric)``, run an evolutionary search *on the predictor* (thousands of cheap predicted candidates bred
from the best truly evaluated vectors: tournament selection, per-step crossover, times jittered in log-SNR,
discrete choices resampled; every child decoded into a valid schedule), and propose the predicted-best
candidates not evaluated yet; retrain after every batch of tells and repeat until the runner's budget ends.

The batch: its first schedule minimises the ensemble's lower confidence bound (``mean - kappa * spread``),
each further one minimises a single member's prediction in turn (a Thompson-like draw), so a batch covers
what the members disagree on. By default the search on the predictor runs one generation of 2048 children
of the best true points: on gmm2d (NFE 4, 8 seeds) deeper searches (3-4 generations, with or without an
uncertainty penalty) drifted to where the predictor is wrong and did worse at budgets 40-80; the
``generations`` argument keeps them available. The predictor is retrained from scratch at every ask with
a seed fixed by the search seed and the number of told points (on one thread), so the JSON state (told
points, proposed hashes, rng, phase) is enough for a restored copy to ask exactly the same next batch.

`s3-mf`, the multi-fidelity variant: the predictor trained on a few dozen points ranks schedules it has not seen
no better than chance (bench/search_cost.py: Kendall tau -0.22 to 0.04 over its own proposals on gmm64, digits and
digits-flow, over-promising by e^1.3 to e^2.8), while the same schedules' mean error on the first 8 of the 128
search noises ranks them like the whole set does (Kendall 0.94 on digits and digits-flow, 0.74 at 8 of gmm64's 512;
160 prior samples and mutations of the named schedules, scratch, 2026-12-05). So it runs rounds: the runner scores
each of a round's picks on its first ``partial`` noises only (search/runner.py: a share of an evaluation, told as
the paired estimate of its whole-set mean), and the ``promoted`` best estimates are then scored in full. The first
round is the named seeds (``seed_promoted`` of them promoted); in each later one the predictor picks
``round_size - local`` schedules (the same lower bound and member draws) and ``local`` are mutations of the best
schedules scored in full, evolution's move, which the cheap screen sorts. The predictor learns from every full
score and every estimate, so it sees many more points for the same budget; only a schedule scored in full can be
the search's best.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from autotune.predictors.s3 import PREDICTORS, ScheduleFeatures, log_target, make_predictor
from autotune.search.strategy import (SearchContext, SearchError, register, rng_from_state, rng_state,
                                      schedule_from_json, schedule_to_json)
from autotune.space.schedule import Schedule

N_INIT = 24  # true evaluations before the first predictor (named seeds included)
PRIOR_SHARE = 1 / 3  # of the non-named initial points drawn from the prior; the rest mutate a named seed
GENERATIONS = 1  # generations of the evolutionary search on the predictor, per ask (see the module doc)
CHILDREN = 2048  # predicted candidates per generation
PARENTS = 48  # size of the pool children are bred from (true best and predicted best)
TRUE_PARENTS = 16  # best truly evaluated schedules always kept in that pool
TOURNAMENT = 3
CROSSOVER_P = 0.5
MUTATE_P = 0.15  # per discrete coordinate, at strength 1
TIME_SIGMA = 0.25  # std of the log-SNR jitter of each time, in mean steps in lambda, at strength 1
STRENGTHS = (0.5, 1.0, 2.0)  # mutation strengths, one drawn per child
KAPPA = 0.5  # lower confidence bound: predicted mean - KAPPA * ensemble spread
# `s3-mf` (multi-fidelity; module doc): the named seeds are scored on PARTIAL_SAMPLES noises first and the
# SEED_PROMOTED best of them in full; then each round scores ROUND candidates in part (LOCAL_PICKS of them mutations
# of the LOCAL_PARENTS best schedules scored in full, the rest the predictor's picks) and the PROMOTED best in full.
# Budget share to reach evolution's final value on the search stage (bench/search_cost.py, NFE 5, budget 96): before
# (8 noises, seeds in full, predictor picks only) digits-flow 0.41 / 0.32 (seeds 0, 5), gmm64 0.20 / 0.12 / 0.18
# (seeds 0-2); as here 0.21 / 0.09 and 0.15 / 0.09 / 0.14. One change at a time (session 30, a scratch subclass
# whose seed round differed slightly where a named seed lies outside the space, digits-flow seeds 0 / 5): seeds in
# part 0.40 / 0.28; local picks 0.28 / 0.41; both 0.28 / 0.24; both at 4 noises 0.23 / 0.17. Why local picks: the
# predictor ranks its own proposals no better than chance early on (module doc), so what finds the first
# improvements is the partial screen; mutations of the incumbents (evolution's move) are the candidates most likely
# to pass it. Why 4 noises: the screen only has to sort a round into "promising" and not, and at half the cost per
# candidate a round costs 1 evaluation instead of 2 before its 2 promotions.
PARTIAL_SAMPLES = 4
ROUND = 32
PROMOTED = 2
SEED_PROMOTED = 3
LOCAL_PICKS = 8
LOCAL_PARENTS = 3
LOCAL_STRENGTHS = (0.5, 1.0)  # mutation strengths of the local picks (STRENGTHS without the widest)
# s3-mf fits its predictor once a round (about 30 rounds in a budget of 96) on every full score and estimate (about
# 1000 points by the end), so the fit and the search on the predictor were its loop's cost: on digits NFE 5, 74 s of
# strategy time in a 96-evaluation search (52 s of fits, 20 s decoding 2048 children a round), where scoring took
# 113 s on one core; on gmm64 they were nearly the whole loop. Half the epochs, a quarter of the sampled ranking pairs
# and half the children: 33 s (scratch, synthetic values: strategy time alone). Shares to reach evolution's final
# value (bench/search_cost.py, budget 96) before -> after: digits-flow seeds 0 / 5 0.21 / 0.09 -> 0.15 / 0.19, gmm64
# (seeds 0-2) 0.15 / 0.09 / 0.14 -> 0.27 / 0.07 / 0.16, digits (seeds 0-4) 0.12 / 0.02 / 0.21 / 0.13 / 0.15 ->
# 0.10 / 0.02 / 0.12 / 0.18 / 0.15; finals within the seeds' spread (digits 2.4e-3 / 2.7e-3 / 1.6e-3 / 1.9e-3 /
# 3.8e-3 against 2.8e-3 / 3.7e-3 / 3.2e-3 / 1.8e-3 / 3.3e-3 before). Search loop, in one process with another run
# on the other core: gmm64 108-115 s -> 48-50 s, digits-flow 167-182 s -> 140-142 s (scoring, 113 s of digits' on an
# idle core, is the rest).
MF_EPOCHS = 150
MF_PAIRS_PER_POINT = 16
MF_CHILDREN = 1024


class Prediction(NamedTuple):
    """The predictor's word on one schedule it proposed: ``mean`` and ``spread`` of the members' predicted
    log(metric), ``told`` the number of true points it was trained on, ``distance`` the Euclidean distance in
    feature space to the nearest of them (how far it extrapolated)."""

    hash: str
    round: int
    told: int
    mean: float
    spread: float
    distance: float


@register("s3")
class S3:
    """S3: true evaluations train a predictor; evolution on the predictor proposes the next true evaluations.

    Args:
        context: the space, noise schedule, seeds (named baselines) and rng seed.
        n_init: true evaluations before the predictor takes over (named seeds first).
        predictor: "mlp" (ranking-aware MLP ensemble) or "forest" (scikit-learn random forest).
        generations, children: size of the evolutionary search on the predictor per ask.
        kappa: weight of the ensemble spread in the lower confidence bound candidates are ranked by.
        select: "members" (first pick by the bound, then one pick per ensemble member in turn) or "lcb"
            (the whole batch by the bound).
        partial, round_size, promoted: multi-fidelity (`s3-mf`, 0 = off): each round's ``round_size`` picks are
            scored on their first ``partial`` noises, and the ``promoted`` best estimates in full.
        seed_promoted: multi-fidelity: the named seeds are scored in part first, and this many best in full.
        local: multi-fidelity: of each round's picks, this many mutate one of the LOCAL_PARENTS best schedules
            scored in full; the predictor picks the rest.
        fit_options: passed to the predictor (predictors/s3.py: e.g. ``epochs``, ``pairs_per_point``).
    """

    name = "s3"

    def __init__(self, context: SearchContext, n_init: int = N_INIT, predictor: str = "mlp",
                 generations: int = GENERATIONS, children: int = CHILDREN, kappa: float = KAPPA,
                 select: str = "members", partial: int = 0, round_size: int = ROUND, promoted: int = PROMOTED,
                 seed_promoted: int = SEED_PROMOTED, local: int = LOCAL_PICKS, name: str = "s3",
                 fit_options: dict[str, Any] | None = None) -> None:
        if partial < 0 or (partial and not (1 <= promoted <= round_size and seed_promoted >= 1
                                            and 0 <= local <= round_size)):
            raise SearchError(f"s3: expected partial >= 0, 1 <= promoted <= round_size, seed_promoted >= 1 and "
                              f"0 <= local <= round_size, got {partial}, {promoted}, {round_size}, {seed_promoted}, "
                              f"{local}")
        if select not in ("members", "lcb"):
            raise SearchError(f"s3: select must be 'members' or 'lcb', got {select!r}")
        if predictor not in PREDICTORS:
            raise SearchError(f"s3: unknown predictor {predictor!r} (one of {', '.join(PREDICTORS)})")
        self.context = context
        self.space = context.space
        self.name = name
        # multi-fidelity: the named seeds are the first round (scored in part like the others; their estimates are
        # plain partial means, there being nothing scored in full to pair them with yet)
        self.partial, self.round_size, self.promoted = partial, round_size, promoted
        self.seed_promoted, self.local = seed_promoted, local
        self.partial_scores = partial > 0  # the runner scores a batch in part when batch_samples() says so
        if partial:
            n_init = min(n_init, len(context.seeds))
        self.estimates: dict[str, tuple[Schedule, float]] = {}  # partial scores (the runner's estimates), by hash
        self.queue: list[Schedule] = []  # this round's picks not handed out yet
        self.round_hashes: list[str] = []  # this round's picks, in order
        self.seed_round = False  # whether this round's picks are the named seeds (SEED_PROMOTED of them promoted)
        self.last_partial = False  # whether the batch asked last is to be scored in part
        self.n_init, self.predictor_kind = n_init, predictor
        self.fit_options = dict(fit_options or {})
        self.generations, self.children, self.kappa, self.select = generations, children, kappa, select
        self.features = ScheduleFeatures(self.space, context.noise)
        self.rng = np.random.default_rng(context.seed)
        self.evaluated: list[tuple[Schedule, float]] = []  # told points, in tell order (inf = diverged)
        self.proposed: list[str] = []  # hashes of every schedule asked for, in order
        self._proposed_set: set[str] = set()
        self._told_set: set[str] = set()
        self.seed_cursor = 0  # named seeds handed out so far
        self.rounds = 0  # asks answered by the predictor
        self.predictions: list[Prediction] = []  # what the predictor said of each schedule it proposed
        self._docs: dict[int, tuple[Schedule, dict[str, Any]]] = {}  # _doc's memo, by id: the exact object
        coords = self.space.coords
        self.time_idx = np.array([i for i, c in enumerate(coords) if c.family == "t"], dtype=np.int64)
        self.other_idx = np.array([i for i, c in enumerate(coords) if c.family != "t"], dtype=np.int64)
        self._other_real = np.array([coords[i].kind == "real" for i in self.other_idx], dtype=bool)
        self.step_of = np.array([c.step for c in coords], dtype=np.int64)
        self._lam = self._lambda_interval()

    @property
    def phase(self) -> str:
        """"init" while the seed population is being proposed, then "model"."""
        return "init" if len(self.proposed) < self.n_init else "model"

    # -- ask / tell -----------------------------------------------------------------------------------------

    def ask(self, n: int) -> list[Schedule]:
        self.last_partial = False
        if self.partial:
            return self._round_batch(n)
        out: list[Schedule] = []
        seeds = self.context.seeds
        while len(out) < n and self.seed_cursor < len(seeds):
            s = seeds[self.seed_cursor]
            self.seed_cursor += 1
            if self.space.contains(s) and self._propose(s):
                out.append(s)
        while len(out) < n and self.phase == "init":
            out.append(self._initial_candidate())
        if len(out) < n:
            out += self._model_batch(n - len(out))
        return out

    def batch_samples(self) -> int | None:
        """The noises the batch asked last is to be scored on: ``partial`` during a round, None (all) otherwise."""
        return self.partial if self.last_partial else None

    def _round_batch(self, n: int) -> list[Schedule]:
        """Multi-fidelity: hand out this round's picks for partial scores, ``n`` at a time; once all are scored, the
        ``promoted`` best estimates (``seed_promoted`` in the named seeds' round), for full scores; then the next
        round's picks. The first round is the named seeds."""
        scored = [self.estimates[h] for h in self.round_hashes if h in self.estimates]
        if self.round_hashes and not self.queue and len(scored) == len(self.round_hashes):
            full = {s.hash() for s, _ in self.evaluated}
            best = sorted((v, i) for i, (_, v) in enumerate(scored) if math.isfinite(v) and scored[i][0].hash()
                          not in full)
            count = self.seed_promoted if self.seed_round else self.promoted
            self.round_hashes, self.seed_round = [], False
            promote = [scored[i][0] for _, i in best[: min(count, n)]]  # n: what the budget has left
            if promote:
                return promote
        if not self.queue and self.seed_cursor < len(self.context.seeds):
            self.queue = [s for s in self.context.seeds if self.space.contains(s) and self._propose(s)]
            self.seed_cursor = len(self.context.seeds)
            self.seed_round = bool(self.queue)
            self.round_hashes = [s.hash() for s in self.queue]
        if not self.queue:
            predicted = self.round_size - min(self.local, self.round_size)
            picks = self._model_batch(predicted) if predicted else []  # all local: no predictor to fit
            self.queue = picks + self._local_picks(min(self.local, self.round_size))
            if not self.queue:  # all local, and nothing scored in full is finite: the predictor (or the prior)
                self.queue = self._model_batch(self.round_size)
            self.round_hashes = [s.hash() for s in self.queue]
        out, self.queue = self.queue[:n], self.queue[n:]
        self.last_partial = True
        return out

    def tell(self, schedule: Schedule, value: float) -> None:
        h = schedule.hash()
        if h in self._told_set or not self.space.contains(schedule):
            return
        if self.last_partial and h in self.round_hashes and h not in self.estimates:
            self.estimates[h] = (schedule, float(value) if math.isfinite(value) else math.inf)
            return
        self._told_set.add(h)
        self.evaluated.append((schedule, float(value) if math.isfinite(value) else math.inf))

    def _propose(self, s: Schedule) -> bool:
        """Record ``s`` as asked for; False when it was asked for before."""
        h = s.hash()
        if h in self._proposed_set:
            return False
        self._proposed_set.add(h)
        self.proposed.append(h)
        return True

    def _local_picks(self, n: int) -> list[Schedule]:
        """Up to ``n`` mutations (strengths LOCAL_STRENGTHS) of the LOCAL_PARENTS best schedules scored in full, not
        proposed before (none before a finite full score)."""
        ranked = sorted((v, i) for i, (_, v) in enumerate(self.evaluated) if math.isfinite(v))[:LOCAL_PARENTS]
        parents = [self.space.encode(self.evaluated[i][0]) for _, i in ranked]
        out: list[Schedule] = []
        for _ in range(50 * n if parents else 0):
            if len(out) == n:
                break
            s = self._mutant(parents[int(self.rng.integers(len(parents)))], LOCAL_STRENGTHS)
            if self._propose(s):
                out.append(s)
        return out

    def _mutant(self, vec: np.ndarray, strengths: tuple[float, ...]) -> Schedule:
        """The schedule of ``vec`` mutated (``_mutate``) at a strength drawn from ``strengths``."""
        strength = np.array([strengths[int(self.rng.integers(len(strengths)))]])
        return self.space.decode(self._mutate(vec[None, :], strength)[0])

    # -- the seed population --------------------------------------------------------------------------------

    def _initial_candidate(self) -> Schedule:
        """A prior sample (share PRIOR_SHARE) or a mutation of a random named seed, not proposed before."""
        seeds = [s for s in self.context.seeds if self.space.contains(s)]
        for _ in range(100):
            if not seeds or self.rng.random() < PRIOR_SHARE:
                s = self.space.sample_prior(self.rng)
            else:
                s = self._mutant(self.space.encode(seeds[int(self.rng.integers(len(seeds)))]), STRENGTHS)
            if self._propose(s):
                return s
        return s  # a tiny space where every draw was proposed already: let the runner's cache answer

    # -- the predictor and the evolutionary search on it ----------------------------------------------------

    def _model_batch(self, n: int) -> list[Schedule]:
        """The ``n`` predicted-best candidates not proposed before, from an evolutionary search on the predictor.

        The first pick minimises the ensemble's lower confidence bound; pick ``j > 0`` minimises member
        ``(j - 1) mod members`` alone (a Thompson-like draw), which spreads a batch over what the members
        disagree on instead of spending it on near-copies of one predicted optimum.
        """
        known = self._known()
        finite = [v for _, v in known if math.isfinite(v)]
        if len(finite) < 2:  # nothing to learn from yet (all diverged, or nothing told): keep exploring
            return [self._initial_candidate() for _ in range(n)]
        self.rounds += 1
        vectors = np.stack([self.space.encode(s) for s, _ in known])
        targets = log_target([v for _, v in known])
        seed = (int(self.context.seed) * 1_000_003 + len(known)) % (2**31)
        model = make_predictor(self.predictor_kind, seed=seed, **self.fit_options).fit(self.features(vectors), targets)

        true_best = np.argsort(targets, kind="stable")[:TRUE_PARENTS]
        pool_vecs, pool_scores = vectors[true_best], targets[true_best]
        found: dict[str, Schedule] = {}  # candidates, in the order they were bred
        preds = np.zeros((0, 0))  # (members, len(found)) predictions
        for g in range(self.generations):
            fresh: dict[str, tuple[Schedule, np.ndarray]] = {}
            for vec in self._breed(pool_vecs, pool_scores, self.children):
                s = self.space.decode(vec)
                h = s.hash()
                if h not in self._proposed_set and h not in found and h not in fresh:
                    fresh[h] = (s, self.space.encode(s))
            if fresh:
                p = model.predict_members(self.features(np.stack([v for _, v in fresh.values()])))
                preds = p if not found else np.concatenate([preds, p], axis=1)
                found.update((h, s) for h, (s, _) in fresh.items())
            if not found or g == self.generations - 1:
                continue
            score = preds.mean(axis=0) - self.kappa * preds.std(axis=0)
            elite = np.argsort(score, kind="stable")[: PARENTS - len(true_best)]  # next pool: true + predicted best
            candidates = list(found.values())
            elite_vecs = np.stack([self.space.encode(candidates[i]) for i in elite])
            pool_vecs = np.concatenate([vectors[true_best], elite_vecs])
            pool_scores = np.concatenate([targets[true_best], score[elite]])
        out: list[Schedule] = []
        if found:
            candidates = list(found.values())
            score = preds.mean(axis=0) - self.kappa * preds.std(axis=0)
            picked_from = len(self.proposed)
            rankings = [np.argsort(score, kind="stable")]
            if self.select == "members":
                rankings += [np.argsort(member, kind="stable") for member in preds]
            cursor = [0] * len(rankings)
            while len(out) < min(n, len(candidates)):
                r = 0 if len(out) == 0 or len(rankings) == 1 else 1 + (len(out) - 1) % (len(rankings) - 1)
                while not self._propose(candidates[rankings[r][cursor[r]]]):
                    cursor[r] += 1
                out.append(candidates[rankings[r][cursor[r]]])
            self._record_predictions(candidates, preds, self.proposed[picked_from:], vectors)
        while len(out) < n:
            out.append(self._initial_candidate())
        return out

    def _known(self) -> list[tuple[Schedule, float]]:
        """What the predictor learns from: every full score, then the partial estimates of schedules not scored in
        full (multi-fidelity), in the order told."""
        full = {s.hash() for s, _ in self.evaluated}
        return self.evaluated + [(s, v) for h, (s, v) in self.estimates.items() if h not in full]

    def _record_predictions(self, candidates: list[Schedule], preds: np.ndarray, picked: list[str],
                            told_vectors: np.ndarray) -> None:
        """Keep the predictor's word on each picked candidate, to set against its true value later."""
        index = {s.hash(): i for i, s in enumerate(candidates)}
        rows = [index[h] for h in picked if h in index]
        if not rows:
            return
        told = self.features(told_vectors)
        feats = self.features(np.stack([self.space.encode(candidates[i]) for i in rows]))
        nearest = np.sqrt(((feats[:, None, :] - told[None, :, :]) ** 2).sum(-1)).min(axis=1)
        for j, i in enumerate(rows):
            self.predictions.append(Prediction(candidates[i].hash(), self.rounds, len(told_vectors),
                                               float(preds[:, i].mean()), float(preds[:, i].std()),
                                               float(nearest[j])))

    def _breed(self, vecs: np.ndarray, scores: np.ndarray, count: int) -> np.ndarray:
        """``count`` children: tournament parents, per-step uniform crossover (w.p. CROSSOVER_P), mutation."""
        def tournament() -> np.ndarray:
            picks = self.rng.integers(len(vecs), size=(count, min(TOURNAMENT, len(vecs))))
            return picks[np.arange(count), np.argmin(scores[picks], axis=1)]

        a, b = vecs[tournament()], vecs[tournament()]
        cross = self.rng.random(count) < CROSSOVER_P
        take_b = self.rng.random((count, self.space.n_steps)) < 0.5
        child = np.where((take_b & cross[:, None])[:, self.step_of], b, a)
        strength = np.asarray(STRENGTHS)[self.rng.integers(len(STRENGTHS), size=count)]
        return self._mutate(child, strength)

    def _mutate(self, vecs: np.ndarray, strength: np.ndarray) -> np.ndarray:
        """Rows of ``vecs`` mutated: times jittered in log-SNR, each other coordinate resampled w.p. MUTATE_P."""
        vecs = vecs.copy()
        if len(self.time_idx):
            vecs[:, self.time_idx] = self._jitter_times(vecs[:, self.time_idx], strength)
        if len(self.other_idx):
            bounds = self.space.bounds[self.other_idx]
            hit = self.rng.random((len(vecs), len(self.other_idx))) < MUTATE_P * strength[:, None]
            u = self.rng.random((len(vecs), len(self.other_idx)))
            draw = np.where(self._other_real, bounds[:, 0] + u * (bounds[:, 1] - bounds[:, 0]),
                            np.floor(bounds[:, 0] + u * (bounds[:, 1] - bounds[:, 0] + 1)))
            vecs[:, self.other_idx] = np.where(hit, np.minimum(draw, bounds[:, 1]), vecs[:, self.other_idx])
        return vecs

    def _lambda_interval(self) -> tuple[float, float] | None:
        """log-SNR at t_start and at the end (t_min when ending on the data); None if not finite."""
        noise, sp = self.context.noise, self.space
        if noise is None:
            return None
        end = sp.t_end if sp.t_end > 0 else float(noise.t_min)
        lam = noise.lambda_(torch.tensor([sp.t_start, end], dtype=torch.float64))
        lo, hi = float(lam[0]), float(lam[1])
        return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) and lo != hi else None

    def _jitter_times(self, times: np.ndarray, strength: np.ndarray) -> np.ndarray:
        """Move interior times by Gaussian noise in log-SNR (linearly in t without one), kept in the interval."""
        sp, m = self.space, times.shape[1]
        noise = self.rng.normal(0.0, 1.0, times.shape) * (TIME_SIGMA * strength[:, None] / (m + 1))
        if self._lam is None:
            span = sp.t_start - sp.t_end
            return np.clip(times - noise * span, sp.t_end, sp.t_start)
        lo, hi = self._lam
        ns = self.context.noise
        lam = ns.lambda_(torch.from_numpy(times.copy())).numpy()
        lam = np.clip(np.nan_to_num(lam, nan=hi, posinf=hi, neginf=lo) + noise * abs(hi - lo), min(lo, hi),
                      max(lo, hi))
        return ns.t_of_lambda(torch.from_numpy(lam)).clamp(sp.t_end, sp.t_start).numpy()

    # -- state ----------------------------------------------------------------------------------------------

    def _doc(self, schedule: Schedule) -> dict[str, Any]:
        """``schedule_to_json(schedule)``, made once a schedule object: the runner saves the state after every
        batch, and the lists it holds only grow (s3-mf: a thousand schedules at budget 96, each written 100 times
        over). Keyed by id, the memo holding the object (equal schedules may differ in metadata, which the
        document holds); the documents are shared between states, which are read, never changed."""
        entry = self._docs.get(id(schedule))
        if entry is None:
            entry = self._docs[id(schedule)] = (schedule, schedule_to_json(schedule))
        return entry[1]

    def state(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "rng": rng_state(self.rng),
            "evaluated": [[self._doc(s), v if math.isfinite(v) else None] for s, v in self.evaluated],
            "proposed": list(self.proposed),
            "seed_cursor": self.seed_cursor,
            "rounds": self.rounds,
            "predictions": [list(p) for p in self.predictions],
            "estimates": [[self._doc(s), v if math.isfinite(v) else None] for s, v in self.estimates.values()],
            "queue": [self._doc(s) for s in self.queue],
            "round": list(self.round_hashes),
            "seed_round": self.seed_round,
            "last_partial": self.last_partial,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng = rng_from_state(state["rng"])
        self.evaluated = [(schedule_from_json(d), math.inf if v is None else float(v)) for d, v in state["evaluated"]]
        self._told_set = {s.hash() for s, _ in self.evaluated}
        self.proposed = list(state["proposed"])
        self._proposed_set = set(self.proposed)
        self.seed_cursor = int(state["seed_cursor"])
        self.rounds = int(state["rounds"])
        self.predictions = [Prediction(*p) for p in state.get("predictions", [])]  # older states: none kept
        estimates = [(schedule_from_json(d), math.inf if v is None else float(v))
                     for d, v in state.get("estimates", [])]
        self.estimates = {s.hash(): (s, v) for s, v in estimates}
        self.queue = [schedule_from_json(d) for d in state.get("queue", [])]
        self.round_hashes = list(state.get("round", []))
        self.last_partial = bool(state.get("last_partial", False))
        self.seed_round = bool(state.get("seed_round", False))


@register("s3-mf")
def multi_fidelity_s3(context: SearchContext) -> S3:
    """`s3-mf`: S3 whose picks, the named seeds first, are scored on PARTIAL_SAMPLES noises first, the best of each
    round in full (SEED_PROMOTED seeds, then PROMOTED of each ROUND)."""
    return S3(context, partial=PARTIAL_SAMPLES, name="s3-mf", children=MF_CHILDREN,
              fit_options={"epochs": MF_EPOCHS, "pairs_per_point": MF_PAIRS_PER_POINT})
