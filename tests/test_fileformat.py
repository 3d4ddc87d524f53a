"""Schedule files: exact round trip, and every bad file is a one-line ScheduleError naming a field."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autotune.errors import ScheduleError
from autotune.space.fileformat import dumps, from_dict, load, loads, save, to_dict
from autotune.space.solvers import REGISTRY
from autotune.space.schedule import CORRECTORS, MAX_CORRECTOR_ORDER, MAX_ORDER, PREDICTIONS, SOLVERS, Schedule, Step

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

FINITE = st.floats(allow_nan=False, allow_infinity=False)
JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | FINITE | st.text(max_size=8)
JSON = st.recursive(JSON_LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=8)
UNIT = st.text(min_size=1, max_size=8)


@st.composite
def steps_at(draw, k: int, t: float, n: int, dc_order: int) -> Step:
    """A valid step ``k`` of ``n`` arriving at ``t``."""
    solver = draw(st.sampled_from([s for s in SOLVERS if k == 0 or not REGISTRY[s].first_step_only]))
    info = REGISTRY[solver]
    limit = min(MAX_ORDER[solver], info.max_order if info.self_starting else k + 1)
    if t == 0:
        limit = min(limit, info.onto_data_max_order)
    corrector = draw(st.sampled_from(CORRECTORS)) if k < n - 1 else "none"
    co = draw(st.integers(1, min(MAX_CORRECTOR_ORDER, k + 1))) if corrector != "none" else 0
    return Step(
        t=t, order=draw(st.integers(1, limit)), solver=solver, prediction=draw(st.sampled_from(PREDICTIONS)),
        corrector=corrector, corrector_order=co, ratio=draw(st.just(1.0) | FINITE) if k >= dc_order else 1.0,
        skip=tuple(draw(st.lists(UNIT, unique=True, max_size=3))),
        data_mean=tuple(draw(st.lists(FINITE, max_size=4))) if info.reads_data_mean else (),
    )


@st.composite
def schedules(draw, max_steps: int = 8) -> Schedule:
    """Any valid schedule: arbitrary finite floats, every solver/corrector/ratio/skip the rules allow."""
    t_start = draw(st.sampled_from([1.0, 80.0, 1000.0]) | st.floats(min_value=1e-300, max_value=1e300))
    n = draw(st.integers(1, max_steps))
    times = draw(st.lists(st.floats(0.0, t_start, exclude_max=True), min_size=n, max_size=n, unique=True))
    times.sort(reverse=True)
    dc_order = draw(st.integers(1, 3))
    steps = tuple(draw(steps_at(k, t, n, dc_order)) for k, t in enumerate(times))
    return Schedule(
        t_start=t_start, steps=steps, guidance=draw(st.none() | st.floats(0.0, 1e6)),
        final_denoise=times[-1] > 0 and draw(st.booleans()), dc_order=dc_order,
        name=draw(st.text(max_size=12)), metadata=draw(st.dictionaries(st.text(max_size=6), JSON, max_size=4)),
    )


# -- (a) round trip -----------------------------------------------------------------------------------------


@SETTINGS
@given(schedules())
def test_round_trip_is_exact(s):
    text = dumps(s)
    back = loads(text)
    assert back == s and back.name == s.name and back.metadata == s.metadata
    assert back.hash() == s.hash() and back.nfe == s.nfe
    assert dumps(back) == text  # bit-exact floats (repr), same key order, same metadata


def test_save_then_load(tmp_path):
    s = Schedule(80.0, (Step(40.0), Step(0.002, order=2, solver="ipndm", prediction="noise")), final_denoise=True,
                 guidance=7.5, name="x", metadata={"search": "random", "seed": 0})
    path = save(s, tmp_path / "deep" / "x.json")
    assert load(path) == s and load(str(path)).metadata == s.metadata
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]  # no .tmp left behind


def test_minimal_document_takes_defaults():
    s = loads('{"schema_version": 1, "t_start": 1, "steps": [{"t": 0.5, "order": 1}, {"t": 0, "order": 1}]}')
    assert s == Schedule(1.0, (Step(0.5), Step(0.0)))
    assert isinstance(s.t_start, float) and isinstance(s.steps[1].t, float)


# -- (b) every bad file is a one-line ScheduleError naming a field ------------------------------------------

TOP_TYPES = {"t_start": "number", "guidance": "number|null", "final_denoise": "bool", "dc_order": "int",
             "name": "str", "nfe": "int", "hash": "str", "metadata": "object", "steps": "list"}
STEP_TYPES = {"t": "number", "order": "int", "solver": "str", "prediction": "str", "corrector": "str",
              "corrector_order": "int", "ratio": "number", "skip": "list"}
NESTED = st.integers(1, 60).flatmap(lambda d: st.sampled_from([json.loads("[" * d + "]" * d),
                                                                json.loads('{"a":' * d + "1" + "}" * d)]))
WRONG = {
    "number": st.sampled_from([True, False, "1.0", "", None, [], {}, [1.0]]) | NESTED,
    "number|null": st.sampled_from([True, False, "null", [], {}]) | NESTED,
    "int": st.sampled_from([True, False, 1.5, 2.0, 1e300, "1", None, [], {}]) | NESTED,
    "bool": st.sampled_from([0, 1, 0.0, "true", "false", None, [], {}]) | NESTED,
    "str": st.sampled_from([0, 1.5, True, None, [], {}, ["dpm"]]) | NESTED,
    "object": st.sampled_from([[], "x", 1, 0.5, True, None, [{}]]),
    "list": st.sampled_from([{}, "x", "", 1, True, None]),
}
TOP_KEYS = set(TOP_TYPES) | {"schema_version", "kind"}
NO_CONTROL = st.characters(blacklist_categories=("Cc", "Cs"))  # newline keys: tested separately below


def _text(doc) -> str:
    return json.dumps(doc, indent=2)


def _step(draw, doc) -> int:
    return draw(st.integers(0, len(doc["steps"]) - 1))


def m_drop_required(draw, doc):
    """Delete a required key (top level or in a step)."""
    if draw(st.booleans()):
        key = draw(st.sampled_from(["schema_version", "t_start", "steps"]))
        del doc[key]
        return _text(doc), key
    k, key = _step(draw, doc), draw(st.sampled_from(["t", "order"]))
    del doc["steps"][k][key]
    return _text(doc), f"steps[{k}].{key}"


def m_wrong_type(draw, doc):
    """A value of the wrong type (booleans for numbers, floats for integers, nested garbage...)."""
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(TOP_TYPES)))
        doc[key] = draw(WRONG[TOP_TYPES[key]])
        return _text(doc), key
    k, key = _step(draw, doc), draw(st.sampled_from(sorted(STEP_TYPES)))
    doc["steps"][k][key] = draw(WRONG[STEP_TYPES[key]])
    return _text(doc), f"steps[{k}].{key}"


def m_bad_skip_entry(draw, doc):
    """A skip list holding something other than a unit name."""
    k = _step(draw, doc)
    doc["steps"][k]["skip"] = [draw(st.sampled_from([1, None, True, ["a"], {}, 0.5]))]
    return _text(doc), f"steps[{k}].skip[0]"


def m_non_finite_token(draw, doc):
    """NaN / Infinity / -Infinity tokens where a number is expected (or anywhere, e.g. in metadata)."""
    token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
    where = draw(st.sampled_from(["t_start", "guidance", "t", "ratio", "metadata"]))
    if where in ("t", "ratio"):
        doc["steps"][_step(draw, doc)][where] = "@TOKEN@"
    elif where == "metadata":
        doc["metadata"] = {"x": ["@TOKEN@"]}
    else:
        doc[where] = "@TOKEN@"
    return _text(doc).replace('"@TOKEN@"', token), ""


def m_huge_float(draw, doc):
    """A number literal that overflows to infinity."""
    key = draw(st.sampled_from(["t_start", "guidance"]))
    doc[key] = "@TOKEN@"
    return _text(doc).replace('"@TOKEN@"', draw(st.sampled_from(["1e999", "-1e400"]))), key


def m_non_monotonic(draw, doc):
    """A time at or above the one before it (or above t_start)."""
    k = _step(draw, doc)
    prev = doc["t_start"] if k == 0 else doc["steps"][k - 1]["t"]
    doc["steps"][k]["t"] = draw(st.sampled_from([prev, prev * 2 + 1, doc["t_start"] + 1]))
    return _text(doc), f"steps[{k}].t"


def m_negative_time(draw, doc):
    """A negative time on the last step."""
    doc["steps"][-1]["t"] = -draw(st.floats(min_value=1e-300, max_value=1e300))
    return _text(doc), f"steps[{len(doc['steps']) - 1}].t"


def m_order_too_large(draw, doc):
    """An order above the model outputs known at that step (or above the solver's maximum: a self-starting solver,
    Heun, makes the calls its order needs itself, so order 2 at step 0 is valid for it)."""
    k = _step(draw, doc)
    info = REGISTRY[doc["steps"][k].get("solver", "dpm")]
    low = info.max_order + 1 if info.self_starting else k + 2
    doc["steps"][k]["order"] = draw(st.integers(low, low + 4))
    return _text(doc), f"steps[{k}].order"


def m_unknown_key(draw, doc):
    """An unknown key, top level or in a step."""
    key = draw(st.text(NO_CONTROL, min_size=1, max_size=10))
    if draw(st.booleans()):
        if key in TOP_KEYS:
            key += "_x"
        doc[key] = draw(JSON)
        return _text(doc), key
    k = _step(draw, doc)
    if key in STEP_TYPES:
        key += "_x"
    doc["steps"][k][key] = draw(JSON)
    return _text(doc), f"steps[{k}].{key}"


def m_schema_version(draw, doc):
    """A missing or unsupported schema_version."""
    value = draw(st.sampled_from([0, 2, -1, 99, "1", True, False, None, 1.5, [1], {"v": 1}, "@DELETE@"]))
    if value == "@DELETE@":
        del doc["schema_version"]
    else:
        doc["schema_version"] = value
    return _text(doc), "schema_version"


def m_kind(draw, doc):
    """A document of another kind."""
    doc["kind"] = draw(st.sampled_from(["autotune.model", "", None, 1, ["autotune.schedule"]]))
    return _text(doc), "kind"


def m_wrong_nfe(draw, doc):
    """An nfe that disagrees with the steps."""
    doc["nfe"] += draw(st.integers(-5, 5).filter(bool))
    return _text(doc), "nfe"


def m_rule(draw, doc):
    """A well-typed document breaking a schedule rule."""
    n = len(doc["steps"])
    k = _step(draw, doc)
    rule = draw(st.sampled_from(["solver", "prediction", "corrector", "corrector_last", "ratio", "dup_skip",
                                 "empty_skip", "no_steps", "step_not_object", "dc_order", "guidance", "t_start"]))
    step = doc["steps"][k]
    if rule in ("solver", "prediction", "corrector"):
        step[rule] = draw(st.sampled_from(["euler", "", "DPM", "bh3", "v"]))
        return _text(doc), f"steps[{k}].{rule}"
    if rule == "corrector_last":
        doc["steps"][-1].update(corrector="bh2", corrector_order=1)
        return _text(doc), f"steps[{n - 1}].corrector"
    if rule == "ratio":
        k = min(k, doc["dc_order"] - 1)
        doc["steps"][k]["ratio"] = 1.5
        return _text(doc), f"steps[{k}].ratio"
    if rule in ("dup_skip", "empty_skip"):
        step["skip"] = ["mid", "mid"] if rule == "dup_skip" else [""]
        return _text(doc), f"steps[{k}].skip"
    if rule == "no_steps":
        doc["steps"] = []
        return _text(doc), "steps"
    if rule == "step_not_object":
        doc["steps"][k] = draw(st.sampled_from([[], 0.5, "step", None, True]))
        return _text(doc), f"steps[{k}]"
    doc[rule] = {"dc_order": 4, "guidance": -1.0, "t_start": 0}[rule]
    return _text(doc), rule


def m_not_an_object(draw, doc):
    """Valid JSON that is not an object: the document wrapped in a list, or any other JSON value."""
    value = draw(st.just([doc]) | JSON.filter(lambda v: not isinstance(v, dict)))
    return json.dumps(value), ""


def m_truncated(draw, doc):
    """The file cut short."""
    text = _text(doc)
    return text[: draw(st.integers(0, text.rindex("}") - 1))], ""


def m_garbage(draw, doc):
    """Arbitrary text (any field may be named: it is usually not JSON at all)."""
    fixed = st.sampled_from(["", " ", "{", "}", "null", "{}", "[]", "\x00", "\ufeff{}"])
    return draw(st.text(max_size=200) | fixed), None


def m_deep_nesting(draw, doc):
    """Nesting deeper than the JSON parser's recursion limit, alone or inside a valid document."""
    depth = draw(st.sampled_from([10_000, 100_000]))
    deep = draw(st.sampled_from(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth]))
    if draw(st.booleans()):
        return deep, ""
    doc["metadata"] = "@TOKEN@"
    return _text(doc).replace('"@TOKEN@"', deep), ""


MUTATIONS = [m_drop_required, m_wrong_type, m_bad_skip_entry, m_non_finite_token, m_huge_float, m_non_monotonic,
             m_negative_time, m_order_too_large, m_unknown_key, m_schema_version, m_kind, m_wrong_nfe, m_rule,
             m_not_an_object, m_truncated, m_garbage, m_deep_nesting]


@st.composite
def bad_files(draw):
    """(text, expected field or None) for a mutated valid document."""
    doc = to_dict(draw(schedules(max_steps=5)))
    doc = copy.deepcopy(json.loads(json.dumps(doc)))
    mutate = draw(st.sampled_from(MUTATIONS))
    return mutate(draw, doc)


def assert_one_line_error(text: str, source: str | None = None) -> ScheduleError:
    """loads() rejects ``text`` with a one-line ScheduleError naming a field (any other exception fails the test)."""
    with pytest.raises(ScheduleError) as info:
        loads(text, source=source)
    err = info.value
    assert isinstance(err.field, str)  # "" for the file as a whole (not JSON, not an object)
    assert "\n" not in str(err) and "\r" not in str(err)
    assert f"{err.field}: " in str(err) if err.field else not str(err).startswith(": ")
    return err


@SETTINGS
@given(bad_files())
def test_bad_files_give_one_line_schedule_errors(case):
    text, field = case
    err = assert_one_line_error(text)
    if field is not None:
        assert err.field == field, str(err)


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda m: m.__name__)
def test_each_mutation_is_rejected_with_its_source(mutate):
    """Every mutation at least once, deterministically, with the file name in the message."""

    @settings(max_examples=15, deadline=None, derandomize=True, database=None)
    @given(st.data())
    def check(data):
        doc = json.loads(json.dumps(to_dict(data.draw(schedules(max_steps=4)))))
        text, field = mutate(data.draw, doc)
        err = assert_one_line_error(text, source="s.json")
        assert str(err).startswith("s.json: ") and err.source == "s.json"
        if field is not None:
            assert err.field == field

    check()


def test_from_dict_rejects_non_objects():
    for value in (None, [], "x", 1, 1.5, True):
        with pytest.raises(ScheduleError) as info:
            from_dict(value)
        assert info.value.field == ""


@pytest.mark.parametrize("where", ["t_start", "guidance", "t", "ratio"])
def test_huge_integer_literal_is_a_schedule_error(where):
    doc = to_dict(Schedule(1.0, (Step(0.5), Step(0.25), Step(0.1), Step(0.0))))
    if where in ("t", "ratio"):
        doc["steps"][-1][where] = "@TOKEN@"
    else:
        doc[where] = "@TOKEN@"
    assert_one_line_error(json.dumps(doc).replace('"@TOKEN@"', "1" + "0" * 400))


def test_integer_literal_over_the_digit_limit_is_a_schedule_error():
    doc = to_dict(Schedule(1.0, (Step(0.0),)))
    doc["metadata"] = {"x": "@TOKEN@"}
    text = json.dumps(doc).replace('"@TOKEN@"', "7" * 5000)
    try:
        loads(text)
    except ScheduleError:
        return
    raise AssertionError("accepted")


@pytest.mark.parametrize("where", ["top", "step"])
def test_unknown_key_with_a_newline_gives_one_line(where):
    doc = to_dict(Schedule(1.0, (Step(0.0),)))
    (doc if where == "top" else doc["steps"][0])["bad\nkey"] = 1
    assert_one_line_error(json.dumps(doc))


# -- (c) load() of unreadable files -------------------------------------------------------------------------


def test_load_missing_file(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(ScheduleError) as info:
        load(path)
    assert info.value.field == "" and info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: cannot read: ") and "\n" not in str(info.value)


def test_load_directory(tmp_path):
    with pytest.raises(ScheduleError) as info:
        load(tmp_path)
    assert info.value.field == ""


@pytest.mark.parametrize("content", [bytes(range(256)), b"\x89PNG\r\n\x1a\n\x00\x00", b"\xff\xfe{\x00}\x00",
                                     b"\x00" * 64, b"{\"schema_version\": 1, \"name\": \"\xe9\"}"])
def test_load_binary_file(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(ScheduleError) as info:
        load(path)
    assert info.value.field == "" and str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_load_checks_units(tmp_path):
    path = save(Schedule(1.0, (Step(0.5, skip=("mid",)), Step(0.0, skip=("typo",)))), tmp_path / "x.json")
    assert load(path, units=["mid", "typo"]).units_used == {"mid", "typo"}
    with pytest.raises(ScheduleError) as info:
        load(path, units=["mid"])
    assert info.value.field == "steps[1].skip" and info.value.source == str(path)


# -- (d) nfe and hash are recomputed ------------------------------------------------------------------------


def _doc() -> dict:
    return to_dict(Schedule(1.0, (Step(0.5), Step(0.1, order=2)), final_denoise=True))


def test_wrong_nfe_is_rejected():
    doc = _doc()
    assert doc["nfe"] == 3
    for nfe in (2, 4, 0, -1):
        doc["nfe"] = nfe
        with pytest.raises(ScheduleError) as info:
            loads(json.dumps(doc))
        assert info.value.field == "nfe" and f"file says {nfe}" in str(info.value)


def test_stale_hash_is_accepted_and_replaced():
    doc = _doc()
    real = doc["hash"]
    doc["hash"] = "0123456789abcdef"
    s = loads(json.dumps(doc))
    assert s.hash() == real and to_dict(s)["hash"] == real
    assert json.loads(dumps(s))["hash"] == real


def test_nfe_and_hash_are_optional():
    doc = _doc()
    del doc["nfe"], doc["hash"]
    s = loads(json.dumps(doc))
    assert s.nfe == 3 and s.hash() == _doc()["hash"]
