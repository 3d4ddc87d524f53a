"""ScheduleSpace: layout, exact encode/decode round trip, always-valid decoding, the random prior."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from autotune.errors import ScheduleError
from autotune.sampling.named import NAMED, build
from autotune.sampling.noise import EDM, FlowMatching, VPDiscrete, VPLinear
from autotune.space.encoding import TIME_NUDGE, ScheduleSpace
from autotune.space.schedule import CORRECTORS, MAX_CORRECTOR_ORDER, MAX_ORDER, PREDICTIONS, Schedule, Step
from autotune.space.solvers import SEARCH_SOLVERS as SOLVERS

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
NOISES = {"vp_discrete": VPDiscrete.from_diffusers_config({}), "vp_linear": VPLinear(), "edm": EDM(),
          "flow": FlowMatching()}


def subset(values: tuple) -> st.SearchStrategy:
    """A non-empty sub-tuple of ``values``, in their order."""
    return st.lists(st.sampled_from(values), min_size=1, unique=True).map(lambda v: tuple(x for x in values if x in v))


@st.composite
def spaces(draw) -> ScheduleSpace:
    """A random space: step count, end points, allowed choices and fixed schedule-level fields."""
    t_start = draw(st.sampled_from([1.0, 80.0, 0.5, 1000.0]))
    t_end = draw(st.sampled_from([0.0, 0.0, 1e-3, t_start / 3]))
    return ScheduleSpace(
        n_steps=draw(st.integers(1, 8)), t_start=t_start, t_end=t_end,
        units=draw(st.lists(st.sampled_from(["down.0", "mid", "up.1", "attn"]), unique=True, max_size=3).map(tuple)),
        solvers=draw(subset(SOLVERS)), allow_corrector=draw(st.booleans()), predictions=draw(subset(PREDICTIONS)),
        max_order=draw(st.none() | st.integers(1, 4)),
        ratio_range=draw(st.sampled_from([None, (0.8, 1.2), (1.0, 2.0)])),
        dc_order=draw(st.integers(1, 3)), guidance=draw(st.sampled_from([None, 0.0, 7.5])),
        final_denoise=t_end > 0 and draw(st.booleans()),
    )


@st.composite
def members(draw, space: ScheduleSpace) -> Schedule:
    """Any schedule of ``space`` (drawn independently of the encoder's own code)."""
    n = space.n_steps
    inner = st.floats(space.t_end, space.t_start, exclude_min=True, exclude_max=True)
    times = sorted(draw(st.lists(inner, min_size=n - 1, max_size=n - 1, unique=True)), reverse=True) + [space.t_end]
    # the decoder keeps times at least TIME_NUDGE of the span apart (a multistep update on closer ones is singular)
    edges = [space.t_start] + times
    assume(all(a - b >= (space.t_start - space.t_end) * TIME_NUDGE for a, b in zip(edges, edges[1:])))
    steps = []
    for k, t in enumerate(times):
        solver = draw(st.sampled_from(space.solvers))
        cap = min(MAX_ORDER[solver], k + 1, space.max_order or 4)
        cap = 1 if t == 0 and solver != "ipndm" else cap
        corrector = draw(st.sampled_from(CORRECTORS)) if space.allow_corrector and k < n - 1 else "none"
        co = draw(st.integers(1, min(MAX_CORRECTOR_ORDER, k + 1))) if corrector != "none" else 0
        ratio = 1.0
        if space.ratio_range is not None and k >= space.dc_order:
            ratio = draw(st.just(1.0) | st.floats(*space.ratio_range))
        skip = tuple(draw(st.sets(st.sampled_from(space.units)))) if space.units else ()
        steps.append(Step(t=t, order=draw(st.integers(1, cap)), solver=solver,
                          prediction=draw(st.sampled_from(space.predictions)), corrector=corrector,
                          corrector_order=co, ratio=ratio, skip=skip))
    return Schedule(space.t_start, tuple(steps), guidance=space.guidance, final_denoise=space.final_denoise,
                    dc_order=space.dc_order)


SPACE_AND_MEMBER = spaces().flatmap(lambda sp: st.tuples(st.just(sp), members(sp)))


def vectors(space: ScheduleSpace) -> st.SearchStrategy:
    """Arbitrary vectors of the space's length: out of bounds, NaN and infinities included."""
    return hnp.arrays(np.float64, space.dim, elements=st.floats(allow_nan=True, allow_infinity=True, width=64))


SPACE_AND_VECTOR = spaces().flatmap(lambda sp: st.tuples(st.just(sp), vectors(sp)))


# -- layout -------------------------------------------------------------------------------------------------


def test_layout_of_a_full_space():
    sp = ScheduleSpace(3, 1.0, 0.0, units=("mid", "down.0"))
    fam = lambda f: [f"{f}[{k}]" for k in range(3)]  # noqa: E731
    assert sp.names == tuple(
        ["t[0]", "t[1]"] + fam("order") + fam("solver") + fam("prediction") + fam("corrector")
        + fam("corrector_order") + fam("ratio") + [f"skip[{k}].{u}" for k in range(3) for u in ("mid", "down.0")]
    )
    assert sp.dim == len(sp.names) == len(sp.kinds) == sp.bounds.shape[0] == 2 + 6 * 3 + 6
    b = dict(zip(sp.names, map(tuple, sp.bounds)))
    assert b["t[0]"] == (0.0, 1.0) and b["order[2]"] == (1, 4) and b["solver[0]"] == (0, len(SOLVERS) - 1)
    assert b["prediction[1]"] == (0, 1) and b["corrector[0]"] == (0, 2) and b["corrector_order[0]"] == (0, 3)
    assert b["ratio[2]"] == (0.8, 1.2) and b["skip[1].mid"] == (0, 1)
    assert dict(zip(sp.names, sp.kinds))["solver[0]"] == "cat" and sp.choices("solver") == SOLVERS
    assert sp.choices("corrector") == CORRECTORS and sp.choices("prediction") == PREDICTIONS


def test_constant_families_are_left_out():
    sp = ScheduleSpace(1, 1.0, 0.0, solvers=("dpm",), predictions=("data",), allow_corrector=False,
                       ratio_range=None, max_order=1)
    assert sp.dim == 0 and sp.names == () and sp.bounds.shape == (0, 2)
    assert sp.decode([]) == Schedule(1.0, (Step(0.0),))
    assert sp.encode(sp.decode(np.zeros(0))).shape == (0,)
    sp = ScheduleSpace(4, 80.0, 0.002, solvers=("ipndm",), predictions=("noise",), allow_corrector=False,
                       ratio_range=None)
    assert sp.names == ("t[0]", "t[1]", "t[2]", "order[0]", "order[1]", "order[2]", "order[3]")


@SETTINGS
@given(spaces())
def test_layout_invariants(sp):
    assert sp.dim == len(sp.names) == len(set(sp.names)) == len(sp.kinds) == sp.bounds.shape[0]
    assert sp.bounds.dtype == np.float64 and np.all(sp.bounds[:, 0] <= sp.bounds[:, 1])
    assert sum(n.startswith("t[") for n in sp.names) == sp.n_steps - 1
    assert sum(n.startswith("skip[") for n in sp.names) == sp.n_steps * len(sp.units)


# -- round trip ---------------------------------------------------------------------------------------------


@SETTINGS
@given(SPACE_AND_MEMBER)
def test_decode_encode_round_trip_is_exact(case):
    sp, s = case
    assert sp.contains(s)
    v = sp.encode(s)
    assert v.dtype == np.float64 and v.shape == (sp.dim,)
    assert np.all(sp.bounds[:, 0] <= v) and np.all(v <= sp.bounds[:, 1])
    back = sp.decode(v)
    assert back == s and back.hash() == s.hash()
    assert np.array_equal(sp.encode(back), v)


@pytest.mark.parametrize("noise", list(NOISES))
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_named_schedules_round_trip(noise, final):
    for nfe in (1, 2, 3, 5, 8, 10, 20):
        for name in NAMED:
            s = build(name, NOISES[noise], nfe, final)
            sp = ScheduleSpace.for_schedule(s)
            back = sp.decode(sp.encode(s), name=s.name, metadata=s.metadata)
            assert back.identity() == s.identity() and back.hash() == s.hash(), (name, nfe)
            assert back == s and back.metadata == s.metadata


def test_named_schedules_share_one_space():
    """All named schedules at one NFE onto t = 0 on the default DDPM noise lie in one space."""
    noise = NOISES["vp_discrete"]
    sp = ScheduleSpace(10, 1.0, 0.0)
    vectors_ = {name: sp.encode(build(name, noise, 10)) for name in NAMED}
    assert len({v.tobytes() for v in vectors_.values()}) == len(NAMED)
    for name, v in vectors_.items():
        assert sp.decode(v).hash() == build(name, noise, 10).hash()


# -- encode rejects schedules outside the space -------------------------------------------------------------


def _base() -> Schedule:
    return Schedule(1.0, (Step(0.7), Step(0.4, order=2, corrector="bh2", corrector_order=2), Step(0.0)))


OUTSIDE = {
    "steps": (dict(), lambda s: s.with_steps([Step(0.5), Step(0.0)])),
    "t_start": (dict(), lambda s: dataclasses.replace(s, t_start=2.0)),
    "steps[2].t": (dict(), lambda s: s.with_steps([*s.steps[:2], Step(0.1)])),
    "guidance": (dict(), lambda s: dataclasses.replace(s, guidance=3.0)),
    "dc_order": (dict(), lambda s: dataclasses.replace(s, dc_order=1)),
    "steps[0].solver": (dict(solvers=("dpm", "unip-bh2")), lambda s: s.with_steps(
        [dataclasses.replace(s.steps[0], solver="ipndm"), *s.steps[1:]])),
    "steps[1].prediction": (dict(predictions=("data",)), lambda s: s.with_steps(
        [s.steps[0], dataclasses.replace(s.steps[1], prediction="noise"), s.steps[2]])),
    "steps[1].corrector": (dict(allow_corrector=False), lambda s: s),
    "steps[1].order": (dict(max_order=1), lambda s: s),
    "steps[2].ratio": (dict(ratio_range=(0.9, 1.1)), lambda s: s.with_steps(
        [*s.steps[:2], dataclasses.replace(s.steps[2], ratio=1.5)])),
    "steps[0].skip": (dict(units=("mid",)), lambda s: s.with_steps(
        [dataclasses.replace(s.steps[0], skip=("mid", "up.0")), *s.steps[1:]])),
}


@pytest.mark.parametrize("field", list(OUTSIDE))
def test_encode_rejects_schedules_outside_the_space(field):
    overrides, change = OUTSIDE[field]
    sp = ScheduleSpace(3, 1.0, 0.0, **{"units": ("mid",), **overrides})
    assert sp.contains(_base()) == (field not in ("steps[1].corrector", "steps[1].order"))
    s = change(_base())
    assert not sp.contains(s)
    with pytest.raises(ScheduleError) as info:
        sp.encode(s)
    assert info.value.field == field and "\n" not in str(info.value)


# -- decode: any vector gives a valid schedule of the space -------------------------------------------------


@SETTINGS
@given(SPACE_AND_VECTOR)
def test_any_vector_decodes_to_a_member(case):
    sp, v = case
    s = sp.decode(v)  # Schedule validates itself on construction
    assert sp.contains(s) and len(s.steps) == sp.n_steps and s.times[-1] == sp.t_end
    assert sp.decode(sp.encode(s)) == s  # decode is a projection: decoding its own output changes nothing


@SETTINGS
@given(SPACE_AND_MEMBER, st.integers(0, 2**32 - 1))
def test_decode_ignores_the_order_of_interior_times(case, seed):
    sp, s = case
    v = sp.encode(s)
    v[: sp.n_steps - 1] = np.random.default_rng(seed).permutation(v[: sp.n_steps - 1])
    assert sp.decode(v) == s


def _vec(sp: ScheduleSpace, fill: float = 0.0, **values: float) -> np.ndarray:
    """A vector of ``fill`` with named coordinates set (``t_0`` for ``t[0]``, ``skip_1_mid`` for ``skip[1].mid``)."""
    v = np.full(sp.dim, fill)
    for key, x in values.items():
        family, k, *unit = key.split("_") if not key.startswith("corrector_order") else ["corrector_order",
                                                                                            key.rsplit("_", 1)[1]]
        v[sp.names.index(f"{family}[{k}]" + (f".{unit[0]}" if unit else ""))] = x
    return v


def test_decode_clamps_orders_to_history_solver_and_data():
    sp = ScheduleSpace(4, 1.0, 0.0, solvers=("dpm", "ipndm"), allow_corrector=False, ratio_range=None)
    v = _vec(sp, t_0=0.75, t_1=0.5, t_2=0.25, order_0=4, order_1=4, order_2=4, order_3=4)
    assert [st.order for st in sp.decode(v).steps] == [1, 2, 3, 1]  # dpm: history, max 3, onto t = 0
    v[[sp.names.index(f"solver[{k}]") for k in range(4)]] = 1  # ipndm
    assert [st.order for st in sp.decode(v).steps] == [1, 2, 3, 4]
    v[sp.names.index("order[3]")] = 2.6  # rounds half up to 3
    assert sp.decode(v).steps[3].order == 3
    sp = ScheduleSpace(4, 1.0, 1e-3, solvers=("dpm",), allow_corrector=False, ratio_range=None)
    assert [st.order for st in sp.decode(np.full(sp.dim, 9.0)).steps] == [1, 2, 3, 3]  # t_end > 0: no clamp to 1


def test_decode_drops_the_last_corrector_and_clamps_corrector_orders():
    sp = ScheduleSpace(3, 1.0, 0.0, solvers=("unip-bh2",), predictions=("data",), ratio_range=None)
    v = _vec(sp, 2.0, t_0=0.6, t_1=0.3)  # corrector index 2 = bh2, corrector_order 2, orders 2
    steps = sp.decode(v).steps
    assert [(s.corrector, s.corrector_order) for s in steps] == [("bh2", 1), ("bh2", 2), ("none", 0)]
    v[sp.names.index("corrector_order[1]")] = 0  # a corrector is on: order at least 1
    assert sp.decode(v).steps[1].corrector_order == 1
    v[sp.names.index("corrector[1]")] = 0  # "none": corrector_order becomes 0
    assert (sp.decode(v).steps[1].corrector, sp.decode(v).steps[1].corrector_order) == ("none", 0)


@pytest.mark.parametrize("dc_order", [1, 2, 3])
def test_decode_keeps_ratio_one_until_compensation_is_allowed(dc_order):
    sp = ScheduleSpace(5, 1.0, 0.0, solvers=("dpm",), allow_corrector=False, dc_order=dc_order)
    v = sp.decode(np.concatenate([[0.8, 0.6, 0.4, 0.2], np.ones(sp.dim - 4) * 99.0]))
    assert [s.ratio for s in v.steps] == [1.0] * dc_order + [1.2] * (5 - dc_order)


def test_decode_sorts_and_separates_times():
    sp = ScheduleSpace(5, 1.0, 0.0, solvers=("dpm",), predictions=("data",), allow_corrector=False,
                       ratio_range=None, max_order=1)
    assert sp.decode([0.1, 0.9, 0.5, 0.3]).times == (1.0, 0.9, 0.5, 0.3, 0.1, 0.0)
    for bad in ([0.5] * 4, [0.0] * 4, [1.0] * 4, [-5, 7, math.nan, math.inf], [math.nan] * 4, [-math.inf] * 4):
        times = sp.decode(bad).times
        assert all(a > b for a, b in zip(times, times[1:])) and times[0] == 1.0 and times[-1] == 0.0, bad


def test_decode_separates_clamped_times_enough_for_an_order_3_update():
    """A mutation clamped at t_start used to decode an ulp below it; UniP-3 then found two of its nodes at one log-SNR
    and its system was singular (an s3-mf search on digits crashed). Decoded times now stand TIME_NUDGE of the span
    apart, and a hand-written schedule with such times gets a ScheduleError naming the first step whose multistep
    update reads both (steps[1], order 2: no solve there to fail), on any CPU (coefficients.py: NODES_APART)."""
    from autotune.sampling.coefficients import make_plan

    noise = VPLinear()
    sp = ScheduleSpace(5, 1.0, 0.0, solvers=("unip-bh1",), predictions=("data",), allow_corrector=False,
                       ratio_range=None, max_order=3)
    steps = tuple(Step(t, order=o, solver="unip-bh1", prediction="data")
                  for t, o in zip((0.5, 0.42, 0.3, 0.2, 0.0), (1, 2, 3, 3, 1)))
    vec = sp.encode(Schedule(1.0, steps))
    vec[[c.name for c in sp.coords].index("t[0]")] = 1.0  # the first time clamped at t_start
    decoded = sp.decode(vec)
    assert decoded.times[1] == 1.0 - TIME_NUDGE and decoded.steps[2].order == 3
    make_plan(decoded, noise)  # solvable
    ulp_apart = dataclasses.replace(decoded, steps=(dataclasses.replace(decoded.steps[0], t=math.nextafter(1.0, 0)),)
                                    + decoded.steps[1:])
    with pytest.raises(ScheduleError, match=r"steps\[1\]\.t.*times 0 and 1 .*singular"):
        make_plan(ulp_apart, noise)
    first_order_there = dataclasses.replace(ulp_apart, steps=(ulp_apart.steps[0], dataclasses.replace(
        ulp_apart.steps[1], order=1)) + ulp_apart.steps[2:])  # step 2's order 3 still reads times 0 and 1
    with pytest.raises(ScheduleError, match=r"steps\[2\]\.t.*times 0 and 1 .*singular"):
        make_plan(first_order_there, noise)


def test_decode_rejects_a_vector_of_the_wrong_length():
    sp = ScheduleSpace(3, 1.0, 0.0)
    for bad in (np.zeros(sp.dim + 1), [], np.zeros((2, sp.dim)), ["a"] * sp.dim):
        with pytest.raises(ScheduleError) as info:
            sp.decode(bad)
        assert info.value.field == "vector"


def test_decode_skip_threshold_and_name():
    sp = ScheduleSpace(2, 1.0, 0.0, units=("a", "b"), solvers=("dpm",), allow_corrector=False, ratio_range=None)
    v = _vec(sp, t_0=0.5, skip_0_a=0.5, skip_0_b=0.49, skip_1_b=7)
    s = sp.decode(v, name="trial-3", metadata={"trial": 3})
    assert [st.skip for st in s.steps] == [("a",), ("b",)] and s.name == "trial-3" and s.metadata == {"trial": 3}


def _reuse_space(**kw):
    return ScheduleSpace(5, 1.0, 0.0, units=("deep0",), reusable=("deep0", "deep0.inner"), solvers=("dpm",),
                         allow_corrector=False, ratio_range=None, **kw)


def test_reuse_masks_and_order_are_coordinates_and_round_trip():
    sp = _reuse_space(max_reuse_order=1)
    assert [n for n in sp.names if n.startswith("reuse")] == (
        [f"reuse[{k}].{u}" for k in range(1, 5) for u in ("deep0", "deep0.inner")] + ["reuse_order"])
    assert "reuse_order" not in _reuse_space().names  # order 0 only: no coordinate
    s = sp.decode(_vec(sp, t_0=0.8, t_1=0.6, t_2=0.4, t_3=0.2))
    steps = list(s.steps)
    steps[1] = dataclasses.replace(steps[1], reuse=("deep0",))
    steps[3] = dataclasses.replace(steps[3], reuse=("deep0.inner",), skip=())
    s = dataclasses.replace(s.with_steps(steps), reuse_order=1)
    v = sp.encode(s)
    assert v[sp.names.index("reuse[1].deep0")] == 1 and v[sp.names.index("reuse_order")] == 1
    assert sp.decode(v) == s
    assert ScheduleSpace.for_schedule(s, solvers=("dpm",), allow_corrector=False, ratio_range=None).contains(s)


def test_decode_makes_reuse_valid():
    """Skip wins over reuse at a step; a reuse no earlier call computed (the unit or its enclosing unit reused or
    skipped before) is dropped; the reuse order is 0 when nothing is reused."""
    sp = _reuse_space(max_reuse_order=1)
    times = dict(t_0=0.8, t_1=0.6, t_2=0.4, t_3=0.2)
    v = _vec(sp, **times)
    for name, x in {"skip[0].deep0": 1, "reuse[1].deep0.inner": 1,  # deep0 skipped at 0: deep0.inner never ran
                    "skip[2].deep0": 1, "reuse[2].deep0": 1,  # both: skipped
                    "reuse[3].deep0": 1, "reuse_order": 1}.items():
        v[sp.names.index(name)] = x
    s = sp.decode(v)
    assert [(st.skip, st.reuse) for st in s.steps] == [
        (("deep0",), ()), ((), ()), (("deep0",), ()), ((), ("deep0",)), ((), ())]
    assert s.reuse_order == 1
    v[sp.names.index("reuse[3].deep0")] = 0
    assert sp.decode(v).reuse_order == 0  # nothing reused: the order is canonical 0


def test_reuse_outside_the_space_is_refused_naming_the_field():
    sp = _reuse_space()
    s = sp.decode(_vec(sp, t_0=0.8, t_1=0.6, t_2=0.4, t_3=0.2))
    reused = s.with_steps([s.steps[0], dataclasses.replace(s.steps[1], reuse=("deep0",)), *s.steps[2:]])
    with pytest.raises(ScheduleError) as info:
        sp.encode(dataclasses.replace(reused, reuse_order=1))
    assert info.value.field == "reuse_order"
    other = s.with_steps([s.steps[0], dataclasses.replace(s.steps[1], reuse=("up0",)), *s.steps[2:]])
    with pytest.raises(ScheduleError) as info:
        sp.encode(other)
    assert info.value.field == "steps[1].reuse"
    with pytest.raises(ScheduleError, match="max_reuse_order"):
        _reuse_space(max_reuse_order=5)


# -- the random prior ---------------------------------------------------------------------------------------


@SETTINGS
@given(spaces(), st.integers(0, 2**32 - 1))
def test_sample_prior_is_a_member_and_seeded(sp, seed):
    a = sp.sample_prior(np.random.default_rng(seed))
    assert sp.contains(a)
    assert sp.sample_prior(np.random.default_rng(seed)) == a
    assert sp.decode(sp.encode(a)) == a


def test_sample_prior_covers_the_space():
    sp = ScheduleSpace(6, 1.0, 0.0, units=("mid",))
    rng = np.random.default_rng(0)
    draws = [sp.sample_prior(rng) for _ in range(300)]
    steps = [st for s in draws for st in s.steps]
    assert {st.solver for st in steps} == set(SOLVERS) and {st.prediction for st in steps} == set(PREDICTIONS)
    assert {st.corrector for st in steps} == set(CORRECTORS) and {st.order for st in steps} == {1, 2, 3, 4}
    assert any(st.ratio != 1.0 for st in steps) and any(st.skip for st in steps) and any(not st.skip for st in steps)
    assert len({s.hash() for s in draws}) == len(draws)
    none = ScheduleSpace(6, 1.0, 0.0, units=("mid",)).sample_prior(np.random.default_rng(1), skip_prob=0.0)
    assert not none.units_used


# -- the space's own validation -----------------------------------------------------------------------------

BAD_SPACES = {
    "n_steps": dict(n_steps=0),
    "t_start": dict(t_start=-1.0),
    "t_end": dict(t_end=1.0),
    "solvers": dict(solvers=("euler",)),
    "predictions": dict(predictions=()),
    "units": dict(units=("a", "a")),
    "max_order": dict(max_order=5),
    "ratio_range": dict(ratio_range=(1.1, 1.2)),
    "dc_order": dict(dc_order=0),
    "guidance": dict(guidance=-1.0),
    "final_denoise": dict(final_denoise=True),
}


@pytest.mark.parametrize("field", list(BAD_SPACES))
def test_bad_space_names_its_field(field):
    with pytest.raises(ScheduleError) as info:
        ScheduleSpace(**{**dict(n_steps=3, t_start=1.0, t_end=0.0), **BAD_SPACES[field]})
    assert info.value.field == field


def test_space_is_immutable_and_canonical():
    sp = ScheduleSpace(3, 1, 0, units=["mid"], solvers=["dpm"], ratio_range=[0.9, 1.1])
    assert sp == ScheduleSpace(3, 1.0, 0.0, units=("mid",), solvers=("dpm",), ratio_range=(0.9, 1.1))
    assert isinstance(sp.t_start, float) and sp.units == ("mid",) and hash(sp) == hash(
        ScheduleSpace(3, 1.0, 0.0, units=("mid",), solvers=("dpm",), ratio_range=(0.9, 1.1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sp.n_steps = 4
    assert isinstance(sp.decode(np.zeros(sp.dim)).t_start, float)  # int inputs never reach a schedule's hash
