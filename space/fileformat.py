"""Versioned JSON schedule files: explicit writer, strict reader that names the bad field.

Format (``schema_version`` 1)::

    {"schema_version": 1, "kind": "autotune.schedule", "name": "dpmsolver++2m", "nfe": 5,
     "t_start": 1.0, "guidance": null, "final_denoise": false, "dc_order": 2,
     "steps": [{"t": 0.8, "order": 1, "solver": "dpm", "prediction": "data", "corrector": "none",
                "corrector_order": 0, "ratio": 1.0, "skip": []}, ...],
     "hash": "…", "metadata": {}}

``nfe`` and ``hash`` are written for people and tools and are never trusted on reading: both are
recomputed; a file whose ``nfe`` disagrees with its steps is rejected (its author expected another cost),
a stale ``hash`` (a hand-edited file) is simply replaced by the recomputed one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from autotune.errors import ScheduleError
from autotune.space.schedule import Schedule, Step, step_to_dict

SCHEMA_VERSION = 1
KIND = "autotune.schedule"
_TOP_KEYS = {"schema_version", "kind", "name", "nfe", "t_start", "guidance", "final_denoise", "dc_order", "steps",
             "hash", "metadata"}
_STEP_KEYS = {"t", "order", "solver", "prediction", "corrector", "corrector_order", "ratio", "skip"}


def to_dict(s: Schedule) -> dict[str, Any]:
    """The JSON document of a schedule."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "name": s.name,
        "nfe": s.nfe,
        "t_start": s.t_start,
        "guidance": s.guidance,
        "final_denoise": s.final_denoise,
        "dc_order": s.dc_order,
        "steps": [step_to_dict(step) for step in s.steps],
        "hash": s.hash(),
        "metadata": s.metadata,
    }


def dumps(s: Schedule) -> str:
    return json.dumps(to_dict(s), indent=2, allow_nan=False) + "\n"


def write_atomically(path: str | Path, text: str) -> Path:
    """Write a text file so that a crash never leaves half of it (write beside, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def save(s: Schedule, path: str | Path) -> Path:
    """Write a schedule file atomically."""
    return write_atomically(path, dumps(s))


def _reject_constant(name: str) -> float:
    raise ScheduleError("(file)", f"{name} is not allowed in a schedule file")


def loads(text: str, source: str | None = None, units: Iterable[str] | None = None) -> Schedule:
    """Parse and validate a schedule document; ``units`` (a model's prunable units) checks skip masks too."""
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ScheduleError as e:
        raise ScheduleError(e.field, e.reason, source) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints beyond Python's digit limit
        raise ScheduleError("(file)", f"not valid JSON ({e})", source) from None
    try:
        schedule = from_dict(doc)
        if units is not None:
            schedule.check_units(units)
        return schedule
    except ScheduleError as e:
        raise ScheduleError(e.field, e.reason, source) from None


def load(path: str | Path, units: Iterable[str] | None = None) -> Schedule:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ScheduleError("(file)", f"cannot read: {e.strerror or e}", str(path)) from None
    except UnicodeDecodeError:
        raise ScheduleError("(file)", "not a UTF-8 text file", str(path)) from None
    return loads(text, str(path), units)


def _get(d: dict, key: str, where: str, types: tuple, required: bool = True, default: Any = None) -> Any:
    if key not in d:
        if required:
            raise ScheduleError(f"{where}{key}", "missing")
        return default
    value = d[key]
    if isinstance(value, bool) and bool not in types:
        raise ScheduleError(f"{where}{key}", f"expected {_names(types)}, got a boolean")
    if not isinstance(value, types):
        raise ScheduleError(f"{where}{key}", f"expected {_names(types)}, got {type(value).__name__}")
    if float in types and isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            raise ScheduleError(f"{where}{key}", "number too large") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ScheduleError(f"{where}{key}", "must be finite")
    return value


def _names(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
             dict: "an object", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _key(key: str) -> str:
    """A file's key as a field name; quoted when it holds characters that would break the one-line error."""
    return key if len(f"<{key}>".splitlines()) == 1 else repr(key)


def from_dict(doc: Any) -> Schedule:
    """Build a Schedule from a parsed document, validating types, version and every schedule rule."""
    if not isinstance(doc, dict):
        raise ScheduleError("(file)", f"expected a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION or type(version) is not int:
        raise ScheduleError("schema_version", f"unsupported version {version!r} (this autotune reads {SCHEMA_VERSION})")
    if doc.get("kind", KIND) != KIND:
        raise ScheduleError("kind", f"expected {KIND!r}, got {doc.get('kind')!r}")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ScheduleError(_key(unknown[0]), "unknown field")
    steps_doc = _get(doc, "steps", "", (list,))
    steps = []
    for k, sd in enumerate(steps_doc):
        where = f"steps[{k}]."
        if not isinstance(sd, dict):
            raise ScheduleError(f"steps[{k}]", "expected an object")
        unknown = sorted(set(sd) - _STEP_KEYS)
        if unknown:
            raise ScheduleError(f"{where}{_key(unknown[0])}", "unknown field")
        skip = _get(sd, "skip", where, (list,), required=False, default=[])
        for j, u in enumerate(skip):
            if not isinstance(u, str):
                raise ScheduleError(f"{where}skip[{j}]", f"expected a unit name, got {type(u).__name__}")
        steps.append(
            Step(
                t=float(_get(sd, "t", where, (int, float))),
                order=_get(sd, "order", where, (int,)),
                solver=_get(sd, "solver", where, (str,), required=False, default="dpm"),
                prediction=_get(sd, "prediction", where, (str,), required=False, default="data"),
                corrector=_get(sd, "corrector", where, (str,), required=False, default="none"),
                corrector_order=_get(sd, "corrector_order", where, (int,), required=False, default=0),
                ratio=float(_get(sd, "ratio", where, (int, float), required=False, default=1.0)),
                skip=tuple(skip),
            )
        )
    guidance = _get(doc, "guidance", "", (int, float, type(None)), required=False)
    metadata = _get(doc, "metadata", "", (dict,), required=False, default={})
    schedule = Schedule(
        t_start=float(_get(doc, "t_start", "", (int, float))),
        steps=tuple(steps),
        guidance=None if guidance is None else float(guidance),
        final_denoise=_get(doc, "final_denoise", "", (bool,), required=False, default=False),
        dc_order=_get(doc, "dc_order", "", (int,), required=False, default=2),
        name=_get(doc, "name", "", (str,), required=False, default=""),
        metadata=metadata,
    )
    if "nfe" in doc:
        nfe = _get(doc, "nfe", "", (int,))
        if nfe != schedule.nfe:
            raise ScheduleError("nfe", f"file says {nfe} but its steps spend {schedule.nfe} evaluations")
    _get(doc, "hash", "", (str,), required=False)  # informational: recomputed, so hand edits stay loadable
    return schedule
