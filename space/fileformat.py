"""Versioned JSON schedule files: explicit writer, strict reader that names the bad field.

Format (``schema_version`` 1)::

    {"schema_version": 1, "kind": "autotune.schedule", "name": "dpmsolver++2m", "nfe": 5,
     "t_start": 1.0, "guidance": null, "final_denoise": false, "dc_order": 2,   # + "reuse_order": 1 when used
     "steps": [{"t": 0.8, "order": 1, "solver": "dpm", "prediction": "data", "corrector": "none",
                "corrector_order": 0, "ratio": 1.0, "skip": []}, ...],   # + "reuse": [...] when a step reuses,
                                                                        # + "shift": x when a step shifts its model time
                                                                        # + "data_mean": [...] on an analytic first step
                                                                        # + "data_scale": x when a step scales its
                                                                        #   data prediction
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
MAX_NFE = 1000  # the most model evaluations (steps) any command or file accepts: far beyond fast sampling
_TOP_KEYS = {"schema_version", "kind", "name", "nfe", "t_start", "guidance", "final_denoise", "dc_order", "reuse_order",
             "steps", "hash", "metadata"}
_STEP_KEYS = {"t", "order", "solver", "prediction", "corrector", "corrector_order", "ratio", "skip", "reuse", "shift",
              "data_mean", "data_scale"}


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
        **({"reuse_order": s.reuse_order} if s.reuse_order else {}),  # only when used: older files stay byte for byte
        "steps": [step_to_dict(step) for step in s.steps],
        "hash": s.hash(),
        "metadata": s.metadata,
    }


def dumps(s: Schedule) -> str:
    return json.dumps(to_dict(s), indent=2, allow_nan=False) + "\n"


def write_atomically(path: str | Path, data: str | bytes) -> Path:
    """Write a file so that a crash or a refusal never leaves half of it (write beside, then rename).

    Raises:
        OutputError: the path is a directory, a parent is a file, or the folder is not writable; no
            ``<path>.tmp`` is left behind.
    """
    from autotune.errors import OutputError

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file path")
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        if tmp.is_file():
            tmp.unlink()
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def read_json_file(path: str | Path, error: type[Exception], what: str) -> Any:
    """The parsed JSON of a file; every way the file can be unreadable becomes ONE ``error`` naming it.

    Guards what json and open let escape: a directory, a missing file, bytes that are not UTF-8, nesting
    deeper than the parser's recursion limit, numbers beyond Python's digit limit, NaN/Infinity literals.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not UTF-8 text") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    return parse_json(text, error, f"{path}: {what}")


def parse_json(text: str, error: type[Exception], where: str) -> Any:
    """``json.loads`` with NaN/Infinity refused and every parse failure one ``error`` starting with ``where``."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise error(f"{where} is not usable JSON (nested too deeply)") from None
    except ValueError as e:  # NaN/Infinity, ints beyond Python's digit limit
        raise error(f"{where} is not usable JSON ({e})") from None


def save(s: Schedule, path: str | Path) -> Path:
    """Write a schedule file atomically."""
    return write_atomically(path, dumps(s))


def _reject_constant(name: str) -> float:
    raise ScheduleError("", f"{name} is not allowed in a schedule file")


def loads(text: str, source: str | None = None, units: Iterable[str] | None = None) -> Schedule:
    """Parse and validate a schedule document; ``units`` (a model's prunable units) checks skip and reuse masks too."""
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ScheduleError as e:
        raise ScheduleError(e.field, e.reason, source) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints beyond Python's digit limit
        raise ScheduleError("", f"not valid JSON ({e})", source) from None
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
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ScheduleError("", "is a directory, not a schedule file", str(path)) from None
    except OSError as e:
        raise ScheduleError("", f"cannot read: {e.strerror or e}", str(path)) from None
    except UnicodeDecodeError:
        raise ScheduleError("", "not a UTF-8 text file", str(path)) from None
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
        raise ScheduleError("", f"expected a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION or type(version) is not int:
        raise ScheduleError("schema_version", f"unsupported version {version!r} (this autotune reads {SCHEMA_VERSION})")
    if doc.get("kind", KIND) != KIND:
        raise ScheduleError("kind", f"expected {KIND!r}, got {doc.get('kind')!r}")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ScheduleError(_key(unknown[0]), "unknown field")
    steps_doc = _get(doc, "steps", "", (list,))
    if len(steps_doc) > MAX_NFE:
        raise ScheduleError("steps", f"{len(steps_doc)} steps; at most {MAX_NFE} are supported")
    steps = []
    for k, sd in enumerate(steps_doc):
        where = f"steps[{k}]."
        if not isinstance(sd, dict):
            raise ScheduleError(f"steps[{k}]", "expected an object")
        unknown = sorted(set(sd) - _STEP_KEYS)
        if unknown:
            raise ScheduleError(f"{where}{_key(unknown[0])}", "unknown field")
        skip = _get(sd, "skip", where, (list,), required=False, default=[])
        reuse = _get(sd, "reuse", where, (list,), required=False, default=[])
        for key, names in (("skip", skip), ("reuse", reuse)):
            for j, u in enumerate(names):
                if not isinstance(u, str):
                    raise ScheduleError(f"{where}{key}[{j}]", f"expected a unit name, got {type(u).__name__}")
        data_mean = _get(sd, "data_mean", where, (list,), required=False, default=[])
        for j, v in enumerate(data_mean):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ScheduleError(f"{where}data_mean[{j}]", f"expected a number, got {type(v).__name__}")
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
                reuse=tuple(reuse),
                shift=float(_get(sd, "shift", where, (int, float), required=False, default=0.0)),
                data_mean=tuple(float(v) for v in data_mean),
                data_scale=float(_get(sd, "data_scale", where, (int, float), required=False, default=1.0)),
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
        reuse_order=_get(doc, "reuse_order", "", (int,), required=False, default=0),
        name=_get(doc, "name", "", (str,), required=False, default=""),
        metadata=metadata,
    )
    if "nfe" in doc:
        nfe = _get(doc, "nfe", "", (int,))
        if nfe != schedule.nfe:
            raise ScheduleError("nfe", f"file says {nfe} but its steps spend {schedule.nfe} evaluations")
    _get(doc, "hash", "", (str,), required=False)  # informational: recomputed, so hand edits stay loadable
    return schedule
