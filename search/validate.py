"""Choose among a search's finalists on the held-out *validation* set.

A search sees only its search set; the schedule it finds best there (and a gradient-refined grid most of
all) can owe part of its margin to those particular noises: on `digits` a refined 5-step grid halved the
search-set error while one sample of the report set in 256 switched mode and doubled the mean. Scoring
the few finalists on a larger set the search never saw, and keeping the best there, is the usual guard;
the report set stays untouched for the final figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from autotune.evaluate.progress import ProgressFn, report
from autotune.search.selection import TOP_FINALISTS, selection_value
from autotune.search.trial import Trial
from autotune.space.fileformat import loads
from autotune.space.schedule import Schedule


@dataclass(frozen=True)
class Finalist:
    label: str
    schedule: Schedule
    validation: dict[str, Any]


def finalists(trials: Sequence[Trial], extra: Sequence[tuple[str, Schedule]] = (),
              top: int = TOP_FINALISTS) -> list[tuple[str, Schedule]]:
    """``extra`` (e.g. the refined grid) and the ``top`` distinct best finite trials, best first, no repeats."""
    out: list[tuple[str, Schedule]] = []
    seen: set[str] = set()
    for label, s in extra:
        if s.hash() not in seen:
            seen.add(s.hash())
            out.append((label, s))
    ranked = sorted((t for t in trials if t.finite), key=lambda t: t.value)
    for t in ranked:
        if sum(label.startswith("trial") for label, _ in out) >= top:
            break
        s = loads(t.schedule)
        if s.hash() not in seen:
            seen.add(s.hash())
            out.append((f"trial {t.number}", s))
    return out


def pick_on_validation(evaluator, candidates: Sequence[tuple[str, Schedule]], objective: str = "mse_ref",
                       progress: ProgressFn | None = None) -> tuple[Finalist, list[Finalist]]:
    """Score every candidate on the validation evaluator; the best (lowest ``objective``) and all of them.

    ``progress`` hears of each finalist scored (task "finalists, validation set"); the validation set's
    reference reports through ``evaluator.progress``."""
    if not candidates:
        raise ValueError("pick_on_validation: no candidates")
    scored: list[Finalist] = []
    report(progress, "finalists, validation set", 0, len(candidates))
    for label, s in candidates:
        scored.append(Finalist(label, s, evaluator.evaluate(s)))
        report(progress, "finalists, validation set", len(scored), len(candidates))
    if objective == "mse_ref":  # the default: mean plus a tail term (search/selection.py says why)
        best = min(scored, key=lambda f: selection_value(f.validation))
    else:
        best = min(scored, key=lambda f: f.validation.get(objective, math.inf))
    return best, scored
