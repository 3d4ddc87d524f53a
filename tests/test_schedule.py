"""The Schedule value: every validation rule names its field; hash and equality; immutability."""

from __future__ import annotations

import dataclasses
import math

import pytest

from autotune.errors import ScheduleError
from autotune.space.schedule import Schedule, Step


def two(step1: Step, step0: Step = Step(0.5), **kw) -> Schedule:
    """A two-step schedule from t = 1 with the given steps."""
    return Schedule(1.0, (step0, step1), **kw)


def four(**kw) -> Schedule:
    """A valid four-step schedule; ``kw`` replaces fields of the schedule."""
    steps = (Step(0.75), Step(0.5, order=2), Step(0.25, order=2), Step(0.0))
    return Schedule(1.0, steps, **kw)


def with_step(k: int, **changes) -> Schedule:
    """``four()`` with step ``k``'s fields changed."""
    s = four()
    steps = list(s.steps)
    steps[k] = dataclasses.replace(steps[k], **changes)
    return Schedule(1.0, tuple(steps))


INVALID = {
    # times
    "t_start zero": (lambda: Schedule(0.0, (Step(0.0),)), "t_start"),
    "t_start negative": (lambda: Schedule(-1.0, (Step(0.0),)), "t_start"),
    "t_start nan": (lambda: Schedule(math.nan, (Step(0.0),)), "t_start"),
    "t_start inf": (lambda: Schedule(math.inf, (Step(0.0),)), "t_start"),
    "t_start bool": (lambda: Schedule(True, (Step(0.0),)), "t_start"),
    "t_start string": (lambda: Schedule("1.0", (Step(0.0),)), "t_start"),
    "no steps": (lambda: Schedule(1.0, ()), "steps"),
    "not a Step": (lambda: Schedule(1.0, ({"t": 0.0},)), "steps[0]"),
    "t nan": (lambda: with_step(1, t=math.nan), "steps[1].t"),
    "t inf": (lambda: with_step(0, t=math.inf), "steps[0].t"),
    "t -inf": (lambda: with_step(3, t=-math.inf), "steps[3].t"),
    "t negative": (lambda: with_step(3, t=-0.1), "steps[3].t"),
    "t string": (lambda: with_step(2, t="0.2"), "steps[2].t"),
    "t increases": (lambda: with_step(2, t=0.6), "steps[2].t"),
    "t repeats": (lambda: with_step(2, t=0.5), "steps[2].t"),
    "first t above t_start": (lambda: with_step(0, t=1.5), "steps[0].t"),
    "first t equals t_start": (lambda: with_step(0, t=1.0), "steps[0].t"),
    "interior t = 0": (lambda: Schedule(1.0, (Step(0.0), Step(0.0))), "steps[0].t"),
    # orders
    "order above history": (lambda: with_step(1, order=3), "steps[1].order"),
    "first step order 2": (lambda: with_step(0, order=2), "steps[0].order"),
    "order 0": (lambda: with_step(1, order=0), "steps[1].order"),
    "order float": (lambda: with_step(1, order=2.0), "steps[1].order"),
    "order bool": (lambda: with_step(0, order=True), "steps[0].order"),
    "dpm order 4": (lambda: Schedule(1.0, tuple(Step(t, order=min(k + 1, 4)) for k, t in
                                                enumerate((0.8, 0.6, 0.4, 0.2)))), "steps[3].order"),
    "ipndm order 5": (lambda: Schedule(1.0, tuple(Step(t, order=k + 1, solver="ipndm") for k, t in
                                                  enumerate((0.8, 0.6, 0.4, 0.3, 0.2)))), "steps[4].order"),
    "dpm order 2 onto t = 0": (lambda: with_step(3, order=2), "steps[3].order"),
    "unip order 2 onto t = 0": (lambda: with_step(3, order=2, solver="unip-bh2"), "steps[3].order"),
    # solver, prediction, corrector
    "unknown solver": (lambda: with_step(1, solver="euler"), "steps[1].solver"),
    "unknown prediction": (lambda: with_step(1, prediction="v"), "steps[1].prediction"),
    "unknown corrector": (lambda: with_step(1, corrector="bh3", corrector_order=1), "steps[1].corrector"),
    "corrector on last step": (lambda: with_step(3, corrector="bh2", corrector_order=1), "steps[3].corrector"),
    "corrector_order without corrector": (lambda: with_step(1, corrector_order=1), "steps[1].corrector_order"),
    "corrector without order": (lambda: with_step(1, corrector="bh1"), "steps[1].corrector_order"),
    "corrector_order 4": (lambda: with_step(2, corrector="bh1", corrector_order=4), "steps[2].corrector_order"),
    "corrector_order above history": (lambda: with_step(1, corrector="bh1", corrector_order=3),
                                      "steps[1].corrector_order"),
    "corrector_order float": (lambda: with_step(1, corrector="bh1", corrector_order=1.0), "steps[1].corrector_order"),
    "corrector_order bool": (lambda: with_step(1, corrector="bh1", corrector_order=True), "steps[1].corrector_order"),
    # DC ratio
    "ratio before history (dc_order 2)": (lambda: with_step(1, ratio=1.1), "steps[1].ratio"),
    "ratio on first step": (lambda: with_step(0, ratio=0.9), "steps[0].ratio"),
    "ratio before history (dc_order 3)": (lambda: four(dc_order=3).with_steps(
        [*four().steps[:2], dataclasses.replace(four().steps[2], ratio=1.1), four().steps[3]]), "steps[2].ratio"),
    "ratio nan": (lambda: with_step(3, ratio=math.nan), "steps[3].ratio"),
    "ratio inf": (lambda: with_step(3, ratio=math.inf), "steps[3].ratio"),
    # model-time shift
    "shift nan": (lambda: with_step(1, shift=math.nan), "steps[1].shift"),
    "shift beyond the limit": (lambda: with_step(2, shift=-4.5), "steps[2].shift"),
    # data-prediction scale
    "data_scale nan": (lambda: with_step(1, data_scale=math.nan), "steps[1].data_scale"),
    "data_scale zero": (lambda: with_step(1, data_scale=0.0), "steps[1].data_scale"),
    "data_scale beyond the limit": (lambda: with_step(2, data_scale=2.5), "steps[2].data_scale"),
    "data_scale on an analytic step": (lambda: Schedule(1.0, (Step(0.5, solver="afs", data_scale=0.9), Step(0.0))),
                                       "steps[0].data_scale"),
    # skip
    "duplicate skip unit": (lambda: with_step(1, skip=("mid", "mid")), "steps[1].skip"),
    "empty unit name": (lambda: with_step(1, skip=("",)), "steps[1].skip"),
    "non-string unit": (lambda: with_step(1, skip=(3,)), "steps[1].skip"),
    # schedule-level fields
    "final_denoise onto t = 0": (lambda: four(final_denoise=True), "final_denoise"),
    "final_denoise not bool": (lambda: two(Step(0.1), final_denoise=1), "final_denoise"),
    "guidance negative": (lambda: four(guidance=-1.0), "guidance"),
    "guidance nan": (lambda: four(guidance=math.nan), "guidance"),
    "guidance bool": (lambda: four(guidance=True), "guidance"),
    "dc_order 0": (lambda: four(dc_order=0), "dc_order"),
    "dc_order 4": (lambda: four(dc_order=4), "dc_order"),
    "dc_order bool": (lambda: four(dc_order=True), "dc_order"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_schedule_names_its_field(case):
    make, field = INVALID[case]
    with pytest.raises(ScheduleError) as info:
        make()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert "\n" not in str(info.value)


VALID = {
    "one step onto data": lambda: Schedule(1.0, (Step(0.0),)),
    "one step to sigma_min with final denoise": lambda: Schedule(1.0, (Step(1e-3),), final_denoise=True),
    "four steps": four,
    "ipndm order 4 onto t = 0": lambda: Schedule(1.0, tuple(
        Step(t, order=min(k + 1, 4), solver="ipndm", prediction="noise") for k, t in enumerate((0.8, 0.6, 0.4, 0.0)))),
    "ratio once history suffices": lambda: with_step(2, ratio=1.1),
    "dc_order 1 ratio at step 1": lambda: four(dc_order=1).with_steps(
        [four().steps[0], dataclasses.replace(four().steps[1], ratio=0.9), *four().steps[2:]]),
    "corrector up to history": lambda: with_step(1, corrector="bh2", corrector_order=2),
    "integer times": lambda: Schedule(10, (Step(5), Step(0))),
    "guidance": lambda: four(guidance=7.5),
    "skip": lambda: with_step(0, skip=("down.0", "mid")),
    "shifted model time": lambda: with_step(0, shift=-0.3),
    "scaled data prediction": lambda: with_step(0, data_scale=0.97),
    "data_scale at its limits": lambda: Schedule(1.0, (Step(0.75, data_scale=0.5), Step(0.5, order=2, data_scale=2.0),
                                                       Step(0.0))),
}


@pytest.mark.parametrize("case", list(VALID))
def test_valid_schedules_construct(case):
    s = VALID[case]()
    assert s.nfe == len(s.steps) + int(s.final_denoise)
    assert s.times[0] == s.t_start and len(s.times) == len(s.steps) + 1


def test_check_units_names_the_step():
    s = Schedule(1.0, (Step(0.5, skip=("mid",)), Step(0.0, skip=("down.0", "typo"))))
    s.check_units(["mid", "down.0", "typo"])
    with pytest.raises(ScheduleError) as info:
        s.check_units(["mid", "down.0", "up.0"])
    assert info.value.field == "steps[1].skip"
    assert "'typo'" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ScheduleError) as info:
        s.check_units([])
    assert info.value.field == "steps[0].skip"


# -- equality and hash --------------------------------------------------------------------------------------


def test_equal_schedules_hash_equal():
    a, b = four(), four()
    assert a is not b and a == b and a.hash() == b.hash() and hash(a) == hash(b)
    assert len(a.hash()) == 16 and int(a.hash(), 16) >= 0


def test_hash_is_stable_across_versions():
    """Pins the canonical identity: cache keys on disk must survive refactors."""
    assert four().hash() == "4e980a6403e6197d"
    assert Schedule(1.0, (Step(0.5), Step(0.0))).hash() == "6a66ebfabbffeaf5"


def test_name_and_metadata_do_not_change_the_hash():
    a = four()
    b = four(name="mine", metadata={"search": "optuna", "trial": 3})
    assert a.hash() == b.hash() and a.identity() == b.identity()
    assert four(metadata={"x": 1}) == four(metadata={"y": 2})  # metadata is not compared
    assert a != b  # but the name is


@pytest.mark.parametrize("field, k, value, neutral", [("shift", 1, 0.25, 0), ("data_scale", 2, 0.95, 1)])
def test_a_schedule_without_a_field_keeps_its_identity_and_the_field_round_trips(field, k, value, neutral):
    """``shift`` and ``data_scale`` enter the identity and the file only where a step is not at its neutral value:
    every older schedule keeps its hash."""
    from autotune.space.fileformat import dumps, loads

    assert field not in dumps(four()) and four().hash() == "4e980a6403e6197d"
    changed = with_step(k, **{field: value})
    assert changed.identity()["steps"][k][field] == value and field not in changed.identity()["steps"][k - 1]
    back = loads(dumps(changed))
    assert back == changed and getattr(back.steps[k], field) == value and back.hash() == changed.hash()
    assert with_step(k, **{field: neutral}).hash() == four().hash()  # the neutral value, however written


def test_skip_masks_are_canonical():
    a = Step(0.5, skip=("mid", "down.0"))
    b = Step(0.5, skip=["down.0", "mid"])
    assert a == b and a.skip == ("down.0", "mid") and hash(a) == hash(b)


FIELD_CHANGES = {
    "t_start": lambda s: dataclasses.replace(s, t_start=2.0),
    "guidance": lambda s: dataclasses.replace(s, guidance=1.5),
    "final_denoise": lambda s: s.with_steps([*s.steps[:3], Step(0.01)], final_denoise=True),
    "dc_order": lambda s: dataclasses.replace(s, dc_order=1),
    "steps (count)": lambda s: s.with_steps([Step(0.75), Step(0.5, order=2), Step(0.0)]),
}
STEP_CHANGES = {
    "t": dict(t=0.3),
    "order": dict(order=1),
    "solver": dict(solver="unip-bh1"),
    "prediction": dict(prediction="noise"),
    "corrector": dict(corrector="bh1", corrector_order=2),
    "corrector_order": dict(corrector="bh2", corrector_order=1),
    "ratio": dict(ratio=1.05),
    "skip": dict(skip=("mid",)),
    "shift": dict(shift=0.1),
    "data_scale": dict(data_scale=1.02),
}


@pytest.mark.parametrize("change", list(FIELD_CHANGES) + [f"step.{f}" for f in STEP_CHANGES])
def test_any_field_change_changes_the_hash(change):
    base = with_step(2, corrector="bh2", corrector_order=2)
    if change in FIELD_CHANGES:
        other = FIELD_CHANGES[change](base)
    else:
        steps = list(base.steps)
        steps[2] = dataclasses.replace(steps[2], **STEP_CHANGES[change.split(".", 1)[1]])
        other = base.with_steps(steps)
    assert other != base and other.hash() != base.hash()


def test_equal_schedules_with_int_and_float_fields_hash_equal():
    a = Schedule(1.0, (Step(0.5, ratio=1.0), Step(0.0)))
    b = Schedule(1, (Step(0.5, ratio=1), Step(-0.0)))
    assert a == b
    assert a.hash() == b.hash()


# -- immutability -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["t_start", "steps", "guidance", "final_denoise", "dc_order", "name", "metadata"])
def test_schedule_fields_cannot_be_assigned(field):
    s = four()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(s, field, getattr(s, field))


@pytest.mark.parametrize("field", ["t", "order", "solver", "prediction", "corrector", "corrector_order", "ratio",
                                   "skip"])
def test_step_fields_cannot_be_assigned(field):
    step = Step(0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(step, field, getattr(step, field))


def test_steps_are_a_tuple_and_with_steps_copies():
    steps = [Step(0.5), Step(0.0)]
    s = Schedule(1.0, steps)
    steps.append(Step(-1.0))  # mutating the caller's list does not reach the schedule
    assert isinstance(s.steps, tuple) and len(s.steps) == 2
    t = s.with_steps([Step(0.25), Step(0.0)])
    assert s.steps[0].t == 0.5 and t.steps[0].t == 0.25


def test_with_steps_validates():
    with pytest.raises(ScheduleError) as info:
        four().with_steps([Step(0.5), Step(0.6)])
    assert info.value.field == "steps[1].t"
