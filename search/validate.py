"""Choose among a search's finalists on the held-out *validation* set.

A search sees only its search set; the schedule it finds best there (and a gradient-refined grid most of
all) can owe part of its margin to those particular noises: on `digits` a refined 5-step grid halved the
search-set error while one sample of the report set in 256 switched mode and doubled the mean. Scoring
the few finalists on a larger set the search never saw, and keeping the best there, is the usual guard;
the report set stays untouched for the final figures.

Most finalists are far from the best (on the README's digits NFE 5 search the named schedules and four of the
five trials were 2.7x-3.7x the refined grid's validation mean), so validation screens them as the search loop
does (search/runner.py's Screening): a finalist first samples the set's first VALIDATION_SCREEN_SAMPLES noises
and stops there when its mean on them is over VALIDATION_SCREEN_FACTOR times the mean of the best finalist so far
on the same noises. A stopped finalist is never chosen; it is listed with the noises it saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from autotune.evaluate.ids import PER_SAMPLE
from autotune.evaluate.metrics import Screen, decode_errors
from autotune.evaluate.progress import ProgressFn, report
from autotune.search.selection import TOP_FINALISTS, selection_value
from autotune.search.trial import Trial
from autotune.space.fileformat import loads
from autotune.space.schedule import Schedule


VALIDATION_SCREEN_SAMPLES = 128  # a quarter of the default validation set (512)
VALIDATION_SCREEN_FACTOR = 2.0  # looser than the search loop's 3x on 32 noises would be for a choice this final


@dataclass(frozen=True)
class Finalist:
    label: str
    schedule: Schedule
    validation: dict[str, Any]

    @property
    def screened(self) -> bool:
        """Stopped by validation's screen: its figures are on the first noises only, and it cannot be chosen."""
        return bool(self.validation.get("screened"))


def finalists(trials: Sequence[Trial], extra: Sequence[tuple[str, Schedule]] = (),
              top: int = TOP_FINALISTS) -> list[tuple[str, Schedule]]:
    """``extra`` (e.g. the refined grid) and the ``top`` distinct best finite trials, best first, no repeats (a trial
    scored on part of the search set, ``s3-mf``'s, holds an estimate: only trials scored in full are finalists)."""
    out: list[tuple[str, Schedule]] = []
    seen: set[str] = set()
    for label, s in extra:
        if s.hash() not in seen:
            seen.add(s.hash())
            out.append((label, s))
    ranked = sorted((t for t in trials if t.finite and t.cost is None), key=lambda t: t.value)
    for t in ranked:
        if sum(label.startswith("trial") for label, _ in out) >= top:
            break
        s = loads(t.schedule)
        if s.hash() not in seen:
            seen.add(s.hash())
            out.append((f"trial {t.number}", s))
    return out


def pick_on_validation(evaluator, candidates: Sequence[tuple[str, Schedule]], objective: str = "mse_ref",
                       progress: ProgressFn | None = None, screen: bool = True) -> tuple[Finalist, list[Finalist]]:
    """Score every candidate on the validation evaluator, in order; the best (lowest ``objective``) and all of
    them. With ``screen`` (and the default objective, on a set larger than VALIDATION_SCREEN_SAMPLES) each one
    after the first may stop early (the module's docstring); a stopped one is never the best.

    ``progress`` hears of each finalist scored (task "finalists, validation set"); the validation set's
    reference reports through ``evaluator.progress``."""
    if not candidates:
        raise ValueError("pick_on_validation: no candidates")
    screen = screen and objective == "mse_ref" and evaluator.eval_set.size > VALIDATION_SCREEN_SAMPLES
    scored: list[Finalist] = []
    report(progress, "finalists, validation set", 0, len(candidates))
    for label, s in candidates:
        scored.append(Finalist(label, s, evaluator.evaluate(s, screen=_screen(scored) if screen else None)))
        report(progress, "finalists, validation set", len(scored), len(candidates))
    full = [f for f in scored if not f.screened]
    if objective == "mse_ref":  # the default: mean plus a tail term (search/selection.py says why)
        best = min(full, key=lambda f: selection_value(f.validation))
    else:
        best = min(full, key=lambda f: f.validation.get(objective, math.inf))
    return best, scored


def _screen(scored: Sequence[Finalist]) -> Screen | None:
    """The screen for the next finalist: VALIDATION_SCREEN_FACTOR x the best-so-far's mean on the first
    VALIDATION_SCREEN_SAMPLES noises (None before any finite finalist)."""
    full = [f for f in scored if not f.screened and math.isfinite(selection_value(f.validation))]
    if not full:
        return None
    best = min(full, key=lambda f: selection_value(f.validation))
    head = float(decode_errors(best.validation[PER_SAMPLE])[:VALIDATION_SCREEN_SAMPLES].astype("float64").mean())
    if not head > 0:
        return None
    return Screen(VALIDATION_SCREEN_SAMPLES, VALIDATION_SCREEN_FACTOR * head)
