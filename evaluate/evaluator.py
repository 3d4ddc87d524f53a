"""The Evaluator: scores schedules on a model and one evaluation set, remembering everything in a store.

References are computed once per (model, set, guidance) and evaluations once per schedule hash; with a
store (``autotune.cache``) both survive across processes and runs. Searches, `autotune eval` and
`autotune compare` all score through this one class.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from autotune.evaluate.metrics import METRIC_VERSION, Screen, score, scored_by
from autotune.evaluate.ids import DEFAULT_REF_STEPS, model_memo_key, ref_steps_for, ref_version
from autotune.evaluate.progress import ProgressFn
from autotune.evaluate.reference import Reference, compute_reference
from autotune.evaluate.sets import EvalSet, eval_set_for
from autotune.sampling.denoiser import Denoiser
from autotune.sampling.noise import noised, starts_from_image
from autotune.space.fileformat import dumps
from autotune.space.schedule import Schedule


class Evaluator:
    """Score schedules of one model on one evaluation set.

    Args:
        model: the Denoiser.
        kind: "search", "validation" or "report" evaluation set.
        size, seed: of the evaluation set (0: the kind's default size).
        prompts: a text-to-image model's prompts, cycled over the set (none: the empty prompt).
        store: an ``autotune.cache`` Store, or None to keep everything in memory only.
        ref_steps: steps of the reference solver; None (the default): as many as the schedule scored needs
            (``ref_steps_for`` its NFE; references asked for without an NFE take DEFAULT_REF_STEPS), so one
            schedule gets the same figure from every command.
        model_spec: how the user named the model (a built-in name or a directory): stored rows then let
            `autotune eval` answer without loading the model.
    """

    def __init__(self, model: Denoiser, kind: str = "search", size: int = 0, seed: int = 0, store: Any = None,
                 ref_steps: int | None = None, prompts: tuple[str, ...] = (), model_spec: str | None = None
                 ) -> None:
        self.model = model
        self.eval_set: EvalSet = eval_set_for(model, kind, size, seed, prompts)
        self.store = store
        self.ref_steps = ref_steps
        self.fingerprint = model.fingerprint()
        self.references: dict[Any, Reference] = {}
        self._starts: dict[tuple[float | None, float, int], torch.Tensor] = {}  # image-to-image start states
        self._memo: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0
        self.model_spec = model_spec  # the MODEL argument, when the model came from one
        # DC-Solver hook (search/dc_fit.py: attach_ratio_source): maps a candidate to the schedule actually
        # scored, with fitted or CPR-predicted compensation ratios; None scores candidates as they are
        self.ratio_source: Callable[["Evaluator", Schedule], Schedule] | None = None
        # hears how far a reference solve is (the one step here that takes long); the CLI draws it
        self.progress: ProgressFn | None = None
        # samples in place of sample_in_chunks (same signature), e.g. split over a Ray pool's workers
        # (RayPool.sample_split); None: here. The figures are the same up to float rounding of other batch sizes.
        self.sampler: Callable[..., Any] | None = None
        # a report set's rows carry bootstrap draws of the model's distribution metrics (paired intervals between
        # schedules in the closing table and `autotune compare`); a search's thousands of evaluations do not
        self.data_draws = self.eval_set.kind == "report"

    def partial_start(self, schedule: Schedule) -> float | None:
        """The schedule's t_start when it starts below T (image-to-image), else None."""
        return schedule.t_start if starts_from_image(self.model.noise, schedule.t_start) else None

    def steps_for(self, nfe: int | None) -> int:
        """Steps of the reference that schedules of ``nfe`` evaluations are scored against."""
        if self.ref_steps is not None:
            return self.ref_steps
        return DEFAULT_REF_STEPS if nfe is None else ref_steps_for(nfe)

    def reference_version(self, guidance: float | None, t_start: float | None = None, nfe: int | None = None) -> str:
        return ref_version(guidance, self.steps_for(nfe), t_start)

    def start_state(self, guidance: float | None, t_start: float, nfe: int | None = None) -> torch.Tensor:
        """Image-to-image start: the set's images noised to t_start. The images are the model's own samples
        (the full reference's final states: no dataset is needed, and they are what the model makes), noised
        with the set's second noise draw (made once per guidance, start and reference steps, not per candidate)."""
        key = (guidance, float(t_start), self.steps_for(nfe))
        if key not in self._starts:
            images = self.reference(guidance, nfe=nfe).final
            self._starts[key] = noised(self.model.noise, images, self.eval_set.image_noise(images.dtype), t_start)
        return self._starts[key]

    def reference(self, guidance: float | None = None, t_start: float | None = None, nfe: int | None = None
                  ) -> Reference:
        """The reference solution at this guidance, from T or from the noised images at ``t_start``, as fine as
        schedules of ``nfe`` evaluations need (computed once, then read from memory or the store)."""
        version = self.reference_version(guidance, t_start, nfe)
        if version in self.references:
            return self.references[version]
        ref = None
        if self.store is not None:
            found = self.store.get_reference(self.fingerprint, self.eval_set.id, version)
            if found is not None:
                ref = Reference.from_arrays(*found)
        if ref is None:
            start = None if t_start is None else self.start_state(guidance, t_start, nfe)
            ref = compute_reference(self.model, self.eval_set, guidance, steps=self.steps_for(nfe),
                                    progress=self.progress, t_start=t_start, start=start, sampler=self.sampler)
            if self.store is not None:
                from autotune.cache.store import CacheTooLarge

                try:
                    self.store.put_reference(self.fingerprint, self.eval_set.id, version, ref.to_arrays(), ref.meta)
                except CacheTooLarge as e:  # e.g. 1024 dense 32x32 RGB trajectories: keep it, do not lose the run
                    warnings.warn(f"{e}: kept in this process's memory only (another run solves it again)",
                                  RuntimeWarning, stacklevel=2)
        self.references[version] = ref
        return ref

    def reference_data_metrics(self, schedule: Schedule) -> dict[str, float]:
        """The model's distribution metrics on the reference solution ``schedule`` is scored against (the model's
        own samples, its ODE solved finely): a few-step schedule can score "better" than them (digits: class
        accuracy 0.99 at 5 steps of UniPC, 0.970 converged). Empty for a model without distribution metrics or an
        image-to-image schedule."""
        from autotune.sampling.capabilities import capabilities_of

        if not capabilities_of(self.model).data_metrics or self.partial_start(schedule) is not None:
            return {}
        final = self.reference(schedule.guidance, nfe=schedule.nfe).final
        return {k: float(v) for k, v in self.model.data_metrics(final, self.eval_set.labels()).items()}

    def key(self, schedule: Schedule):
        from autotune.cache.store import EvalKey

        version = self.reference_version(schedule.guidance, self.partial_start(schedule), schedule.nfe)
        return EvalKey(self.fingerprint, f"{self.eval_set.id}/{version}",
                       schedule.hash(), METRIC_VERSION)

    def cached(self, schedule: Schedule) -> dict[str, Any] | None:
        """The stored metrics of this schedule, or None (never computes)."""
        h = schedule.hash()
        if h in self._memo:
            return self._memo[h]
        if self.store is not None:
            found = self.store.get_evaluation(self.key(schedule))
            if found is not None:
                self._memo[h] = found
                return found
        return None

    def evaluate(self, schedule: Schedule, screen: Screen | None = None) -> dict[str, Any]:
        """Metrics of the schedule (with ``cached``: whether they came from memory or the store).

        ``screen`` may stop an uncached schedule early (evaluate/metrics.py's Screen); a stopped candidate's
        metrics are neither remembered nor stored: asked again, without a screen, it is scored in full. Schedules
        scored with DC-Solver ratios (``ratio_source``) are never screened."""
        if self.ratio_source is not None:  # DC-Solver hook: score (and store) the schedule with its ratios
            fitted = self.ratio_source(self, schedule)
            return {**self._evaluate(fitted), "evaluated_schedule": dumps(fitted)}
        return self._evaluate(schedule, screen)

    def _evaluate(self, schedule: Schedule, screen: Screen | None = None) -> dict[str, Any]:
        found = self.cached(schedule)
        if found is not None:
            self.hits += 1
            # rows stored before the evaluator named its figure were all ODE schedules, scored by mse_ref
            return {"scored_by": scored_by(schedule), **found, "cached": True}
        self.misses += 1
        t_start = self.partial_start(schedule)
        with torch.no_grad():
            start = None if t_start is None else self.start_state(schedule.guidance, t_start, schedule.nfe)
            reference = self.reference(schedule.guidance, t_start, schedule.nfe)
            metrics = score(self.model, schedule, self.eval_set, reference, start_state=start, screen=screen,
                            sampler=self.sampler, data_draws=self.data_draws)
        metrics["schedule_hash"] = schedule.hash()
        if metrics.get("screened"):
            return {**metrics, "cached": False}
        self._memo[schedule.hash()] = metrics
        if self.store is not None:
            self.store.put_evaluation(self.key(schedule), metrics, dumps(schedule))
            if self.model_spec is not None:  # lets `autotune eval` find this row later without loading the model
                self.store.put_model_memo(model_memo_key(self.model_spec), {
                    "fingerprint": self.fingerprint, "sample_shape": list(self.eval_set.sample_shape),
                    "num_classes": self.eval_set.num_classes})
        return {**metrics, "cached": False}
