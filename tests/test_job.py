"""The search job as a library call (search/job.py): what it returns is what it wrote, its counts are the
store's, a bad config is one line before any work, a cut job resumes, and it prints nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest

from autotune.cache.store import open_store
from autotune.errors import AutotuneError
from autotune.search.job import QUIET, JobConfig, JobHooks, run_search_job
from autotune.space.fileformat import from_dict, load

# the smallest job that still runs every stage the CLI runs by default (search, validation, report set)
SMALL = dict(model="gmm2d", nfe="4", budget=8, batch=4, set_size=16, validate=32, report_size=32)


def _step_recorder():
    """A job's ``step`` hook that records the line of every step it shows, and the list it records them in."""
    steps: list[str] = []

    @contextlib.contextmanager
    def step(description):
        steps.append(description)
        yield None

    return steps, step


def _search_rows(store, eval_set: str) -> set[str]:
    """Hashes of the schedules scored on this search set (the store's key: set id / reference version)."""
    return {e["schedule_hash"] for e in store.iter_evaluations() if e["eval_set"].startswith(eval_set + "/")}


def test_the_outcome_is_the_schedule_written(tmp_path, gmm, capsys):
    out = tmp_path / "best.json"
    outcome = run_search_job(JobConfig(**SMALL, out=out, refine=3), model=gmm)
    written = load(out)
    assert outcome.schedule_path == out and outcome.pareto_path is None
    assert written.hash() == outcome.best.hash() and written.name == outcome.best.name == "s3-nfe4"
    assert written.nfe == outcome.best.nfe == 4
    assert written.metadata["true_evaluations"] == outcome.true_evaluations == 8
    assert written.metadata["search_value"] == outcome.best_value
    # the validation chose what was written, among finalists that include the refined grid
    assert outcome.validation.chosen.schedule.hash() == written.hash()
    assert written.metadata["validation"]["chosen"] == outcome.validation.chosen.label
    labels = [f.label for f in outcome.validation.scored]  # stage 1's refinement may give up (GIVE_UP)
    assert any(label.split(" (gave up")[0] == "refined" for label in labels), labels
    assert outcome.refinement.before == outcome.search.best_trial.mse_ref
    # the closing table's rows: ours first, then every named schedule at the best's NFE
    assert [r.name for r in outcome.ours] == ["s3-nfe4"]
    assert outcome.peers and all(r.schedule.nfe == 4 for r in outcome.peers)
    assert outcome.report_set.startswith("report-") and outcome.seconds > outcome.search.seconds
    assert capsys.readouterr() == ("", "")  # the library prints nothing
    # the reference solution's own distribution metrics come with the rows: the converged ODE's samples sit
    # closer to the data than any 4-step schedule's
    ref = outcome.reference_metrics
    assert set(ref) == {"nll_gap", "swd"}
    assert all(ref["nll_gap"] < r.metrics["nll_gap"] for r in outcome.ours + outcome.peers)


def test_true_evaluations_are_the_stores(tmp_path, gmm):
    with open_store(tmp_path / "cache.sqlite") as store:
        outcome = run_search_job(JobConfig(**{**SMALL, "validate": 0, "refine": 0}, score_report=False), store,
                                 model=gmm)
        trials = store.trials(outcome.search_id)
        computed = [t for t in trials if not t["metrics"]["cached"]]
        assert len(computed) == outcome.true_evaluations == 8
        assert len(trials) == outcome.true_evaluations + outcome.search.cache_hits
        # without refinement or validation, only stage 1 scores on the search set
        assert _search_rows(store, outcome.eval_set) == {t["schedule_hash"] for t in computed}
        assert outcome.trial_records(store) == trials
        assert outcome.study_url == store.url
    assert outcome.schedule_path is None and not outcome.ours  # no out, no report: nothing written or scored


class _Cut(Exception):
    pass


def test_a_cut_job_resumes_without_scoring_anything_twice(tmp_path, gmm):
    config = JobConfig(**{**SMALL, "validate": 0, "refine": 0}, out=tmp_path / "s.json", score_report=False)

    @contextlib.contextmanager
    def cut_after_first_batch(description, budget):
        def on_batch(progress):
            raise _Cut  # after the runner saved its state: as if the process died here

        yield on_batch

    with open_store(tmp_path / "cache.sqlite") as store:
        with pytest.raises(_Cut):
            run_search_job(config, store, model=gmm, hooks=JobHooks(search_progress=cut_after_first_batch))
        assert not config.out.exists()
        outcome = run_search_job(config, store, model=gmm)
        assert outcome.search.resumed and outcome.true_evaluations == 8
        computed = [t["schedule_hash"] for t in store.trials(outcome.search_id) if not t["metrics"]["cached"]]
        assert len(computed) == len(set(computed)) == 8
        assert _search_rows(store, outcome.eval_set) == set(computed)
        assert load(config.out).metadata["search_id"] == outcome.search_id
        again = run_search_job(config, store, model=gmm)  # a finished job answers from its saved state
        assert again.search.resumed and again.best.hash() == outcome.best.hash()


@pytest.mark.parametrize("options, says", [
    ({"strength": 2.0}, "--strength 2.0: expected a fraction in (0, 1)"),
    ({"strength": 0.5, "nfe": "3-5"}, "--strength: give one --nfe"),
    ({"nfe": "99999"}, "--nfe 99999: at most"),
    ({"nfe": "five"}, "--nfe: expected a count like 5"),
    ({"latency_budget": 0.0}, "--latency-budget 0.0: expected a positive fraction"),
    ({"objectives": ("mse_ref", "mse_ref")}, "objectives: expected distinct metric names"),
    ({"budget": 0}, "expected a budget"),
])
def test_a_bad_config_is_one_line_before_any_work(options, says):
    with pytest.raises(AutotuneError) as e:
        JobConfig(model="no-such-model", **options)  # refused before the model is looked for
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("options, says", [
    ({"guidance": 2.0}, "gmm2d is unconditional"),
    ({"stage2_budget": 2}, "--stage2-budget: gmm2d has no prunable units"),
    ({"method": "nope"}, "unknown search method 'nope'"),
    ({"reuse": True}, "--reuse: it applies to stage 2"),
    ({"solvers": ("dpm", "heun")}, "'heun' is not one a search step can choose"),
])
def test_options_the_model_or_registry_refuse_are_one_line_and_write_nothing(tmp_path, gmm, options, says):
    out = tmp_path / "s.json"
    with pytest.raises(AutotuneError) as e:
        run_search_job(JobConfig(**{**SMALL, **options}, out=out), model=gmm)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_the_hooks_hear_every_step_and_the_search_loop(gmm):
    steps: dict[str, list] = {}
    batches: list = []

    @contextlib.contextmanager
    def step(description):
        steps[description] = []
        yield steps[description].append

    @contextlib.contextmanager
    def search_progress(description, budget):
        assert (description, budget) == ("s3 NFE 4", 8)
        yield batches.append

    run_search_job(JobConfig(**SMALL), model=gmm, hooks=JobHooks(step=step, search_progress=search_progress))
    assert list(steps)[:2] == ["loading gmm2d", "reference solution, 16 samples"]
    assert any(d.startswith("validation: ") for d in steps) and any(d.endswith(", report set") for d in steps)
    finalists = next(events for d, events in steps.items() if d.startswith("validation: "))
    assert finalists[-1].task == "finalists, validation set" and finalists[-1].done == finalists[-1].total
    assert [b.true_evaluations for b in batches] == [4, 8]


def test_a_pareto_job_writes_the_front_beside_the_schedule(tmp_path, gmm):
    out = tmp_path / "mo.json"
    outcome = run_search_job(JobConfig(**{**SMALL, "nfe": "3-4"}, objectives=("mse_ref", "nfe"), out=out,
                                       score_report=False), model=gmm)
    assert outcome.method == "evolution" and outcome.validation is None  # validation chooses by mse_ref only
    assert outcome.pareto_path == tmp_path / "mo.pareto.json"
    front = json.loads(outcome.pareto_path.read_text())
    assert len(front) == len(outcome.search.front) and front
    assert from_dict(front[0]["schedule"]).hash() == load(out).hash() == outcome.best.hash()


def test_stage2_skips_units_of_the_written_schedule_on_digits(tmp_path, monkeypatch):
    """Stage 2 through the job, on a model with prunable units; latency is a deterministic cost here (tests do
    not time things), as in test_multiobjective's stage-2 test."""
    from autotune.models.registry import load_model
    from autotune.search import runner

    def cost_ms(model, schedule, eval_set, spec):
        return float(sum(1 + len(model.units) - len(st.skip) for st in schedule.steps))

    monkeypatch.setattr(runner, "measure_latency", cost_ms)
    out = tmp_path / "pruned.json"
    config = JobConfig(model="digits", nfe="4", budget=4, batch=4, set_size=8, validate=0, stage2_budget=6,
                       out=out, score_report=False)
    outcome = run_search_job(config, model=load_model("digits"))
    assert outcome.stage2.result is not None, outcome.stage2.reason
    written = load(out)
    assert written.hash() == outcome.stage2.result.best.hash() == outcome.best.hash()
    assert any(st.skip for st in written.steps)
    meta = written.metadata["stage2"]
    assert meta["found"] and meta["latency_ms"] <= meta["limit_ms"] and meta["search_id"] == outcome.stage2.search_id


def test_stage2_of_a_validating_job_chooses_its_mask_on_the_validation_set(tmp_path, monkeypatch):
    """With validation on, the job's stage 2 scores its best feasible masks on the validation set, writes the one
    chosen there and records their validation figures in the file."""
    from autotune.models.registry import load_model
    from autotune.search import runner

    monkeypatch.setattr(runner, "measure_latency", lambda model, schedule, eval_set, spec: float(
        sum(1 + len(model.units) - len(st.skip) for st in schedule.steps)))
    out = tmp_path / "pruned.json"
    config = JobConfig(model="digits", nfe="4", budget=4, batch=4, set_size=8, validate=8, stage2_budget=8,
                       out=out, score_report=False, refine=0)
    outcome = run_search_job(config, model=load_model("digits"))
    stage = outcome.stage2
    assert stage.result is not None, stage.reason
    written = load(out)
    assert written.hash() == stage.best.hash() == outcome.best.hash() == stage.best_trial.hash
    assert stage.best_trial.hash in stage.validation and len(stage.validation) > 1
    assert all(stage.retimed[h] <= config.latency_budget for h in stage.validation)  # the finalists held the limit
    assert written.metadata["stage2"]["validation_mse_ref"] == stage.validation


@pytest.mark.parametrize("nfe", ["4", "8"])
def test_every_set_is_scored_against_the_reference_its_nfe_needs(tmp_path, gmm, nfe):
    """A job at NFE <= FEW_STEP_NFE scores its search, validation and report sets against the few-step reference
    (one at more NFE against the default one), and `autotune eval` of the written schedule, which picks its
    reference by the same rule, answers from the row the job stored."""
    from typer.testing import CliRunner

    from autotune.cli import app
    from autotune.evaluate.ids import DEFAULT_REF_STEPS, FEW_STEP_NFE, FEW_STEP_REF_STEPS, ref_version

    steps = FEW_STEP_REF_STEPS if int(nfe) <= FEW_STEP_NFE else DEFAULT_REF_STEPS
    out, cache = tmp_path / "best.json", tmp_path / "cache.sqlite"
    with open_store(cache) as store:
        outcome = run_search_job(JobConfig(**{**SMALL, "nfe": nfe}, out=out), store, model=gmm)
        scored = {tuple(e["eval_set"].split("/", 1)) for e in store.iter_evaluations()}
    assert {kind.split("-")[0] for kind, _ in scored} == {"search", "validation", "report"}
    assert {version for _, version in scored} == {ref_version(None, steps)}
    result = CliRunner().invoke(app, ["eval", "--model", "gmm2d", "--schedule", str(out), "--size", "32", "--json",
                                      "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["cached"] is True and figures["mse_ref"] == outcome.ours[0].metrics["mse_ref"]


def test_named_schedules_far_behind_on_the_search_set_are_neither_validated_nor_reported(gmm):
    """Validation and the closing table skip a named schedule more than NAMED_FINALIST_SLACK times worse than the
    best named one on the search set (diverged ones too), and keep every other; validation keeps the best few."""
    import math

    from autotune.sampling.named import build
    from autotune.search.job import NAMED_FINALIST_SLACK, _named_finalists

    named = [build(n, gmm.noise, 4) for n in ("ddim", "dpmsolver++2m", "unipc-bh2-o2", "ipndm")]
    values = dict(zip((s.hash() for s in named), (1.0, 0.3, 0.3 * NAMED_FINALIST_SLACK, math.nan)))

    class SearchSet:
        def evaluate(self, s):
            return {"mse_ref": values[s.hash()]}

    kept = _named_finalists(SearchSet(), named)
    assert [label for label, _ in kept] == ["named dpmsolver++2m", "named unipc-bh2-o2"]
    assert _named_finalists(SearchSet(), [named[3]]) == []
    assert [label for label, _ in _named_finalists(SearchSet(), named, most=1)] == ["named dpmsolver++2m"]


def test_a_second_refinement_start_only_when_the_search_stayed_near_a_named_schedule(gmm):
    """The refinement also starts from the best named schedule (same NFE, not the search's best itself) when its
    search-set mean is within SECOND_START_SLACK of the search's best; never from a diverged or far one."""
    import math

    from autotune.sampling.named import build
    from autotune.search.job import SECOND_START_SLACK, second_start

    named = [build(n, gmm.noise, 4) for n in ("ddim", "dpmsolver++2m", "unipc-bh2-o2", "ipndm")]
    other_nfe = build("unipc-bh2-o2", gmm.noise, 5)
    values = dict(zip((s.hash() for s in named + [other_nfe]), (1.0, 0.5, 0.4, math.nan, 0.01)))

    class SearchSet:
        def evaluate(self, s):
            return {"mse_ref": values[s.hash()]}

    everything = named + [other_nfe]
    best = named[1]  # the search's best is a named schedule: the next named one is the second start
    assert second_start(SearchSet(), best, 0.5, everything) is named[2]
    found = build("dpmsolver++3m", gmm.noise, 4)  # a find of the search, better than every named one
    assert second_start(SearchSet(), found, 0.4 / SECOND_START_SLACK * 1.001, everything) is named[2]
    assert second_start(SearchSet(), found, 0.4 / SECOND_START_SLACK * 0.99, everything) is None
    assert second_start(SearchSet(), found, math.inf, everything) is None
    assert second_start(SearchSet(), found, 0.1, [named[3]]) is None  # diverged


def test_the_job_refines_the_second_start_and_validation_sees_both(gmm, monkeypatch):
    """When stage 1 stays near the best named schedule, the job refines that schedule too, and both refined grids
    are validation finalists (the chosen one is written)."""
    from autotune.evaluate.evaluator import Evaluator
    from autotune.search import job
    from autotune.search.job import named_peers_for, second_start

    monkeypatch.setattr(job, "GIVE_UP", math.inf)  # every refinement runs its steps (giving up: its own test)

    config = JobConfig(**{**SMALL, "nfe": "5"}, refine=5, score_report=False)
    outcome = run_search_job(config, model=gmm)
    search_set = Evaluator(gmm, "search", size=config.set_size, seed=config.seed)
    _, named = named_peers_for(gmm.noise, 5, 5, None, None)  # the job's named peers
    other = second_start(search_set, outcome.search.best, outcome.search.best_trial.mse_ref, list(named))
    assert other is not None  # this small search stays near a named schedule
    labels = [f.label for f in outcome.validation.scored]
    assert "refined" in labels and f"refined from {other.name}" in labels
    assert outcome.best.metadata["validation"]["chosen"] == outcome.validation.chosen.label


def test_diffusers_bh1_ending_at_sigma_min_is_compared_with_but_never_a_search_start(gmm, monkeypatch):
    """The job's named peers hold diffusers' bh1 (ending at sigma_min) beside ours (ending at 0), so validation and
    the closing table compare with both; the strategy's seeds and the second refinement start never take one (the
    space ends every schedule at 0)."""
    from autotune.sampling.named import SIGMA_MIN_NAMED, build
    from autotune.search import job, strategy

    t_start, named = job.named_peers_for(gmm.noise, 4, 4, None, None)
    ends = {s.name: s.times[-1] for s in named}
    assert set(SIGMA_MIN_NAMED) == {"unipc-bh1-o2-smin", "unipc-bh1-o3-smin"} <= set(ends)
    assert ends["unipc-bh1-o2-smin"] == gmm.noise.t_min > 0 and ends["unipc-bh1-o2"] == 0.0
    seen = {}
    make = strategy.make_strategy

    def spy(method, context):
        seen["seeds"] = context.seeds
        return make(method, context)

    monkeypatch.setattr(strategy, "make_strategy", spy)
    space, _, _ = job._strategy(JobConfig(**SMALL), gmm.noise, t_start, named, None, None)
    assert {s.name for s in seen["seeds"]} == set(ends) - set(SIGMA_MIN_NAMED)
    assert all(space.contains(s) for s in seen["seeds"])

    class SearchSet:  # the sigma_min ones best by far
        def evaluate(self, s):
            return {"mse_ref": 0.1 if s.name in SIGMA_MIN_NAMED else 1.0}

    other = job.second_start(SearchSet(), build("unipc-bh2-o3", gmm.noise, 4), 1.0, list(named))
    assert other is not None and other.name not in SIGMA_MIN_NAMED and space.contains(other)


def test_a_search_ending_at_sigma_min_searches_seeds_and_writes_schedules_ending_there(gmm, tmp_path):
    """--final sigma_min: the space ends at the model's t_min, the seeds are the named schedules ending there, and the
    written schedule ends there (or above: the refinement frees a last time that is not 0); a bad value or an
    img2img search with it is refused on construction."""
    from autotune.errors import InputError
    from autotune.space.fileformat import load, loads

    with pytest.raises(InputError, match="--final 'data'"):
        JobConfig(model="gmm2d", final="data")
    with pytest.raises(InputError, match="--strength"):
        JobConfig(model="gmm2d", final="sigma_min", strength=0.5)
    outcome = run_search_job(JobConfig(**SMALL, final="sigma_min", out=tmp_path / "s.json", refine=3), model=gmm)
    t_min = float(gmm.noise.t_min)
    assert outcome.search.trials and all(loads(t.schedule).times[-1] == t_min for t in outcome.search.trials)
    end = outcome.best.times[-1]  # float32 rounding of t_min at worst
    assert t_min * (1 - 1e-6) <= end < outcome.best.times[-2] and load(tmp_path / "s.json") == outcome.best
    named = {p.name for p in outcome.peers}
    assert named and all(p.schedule.times[-1] in (0.0, t_min) for p in outcome.peers), named


def test_the_analytic_first_start_is_the_best_named_schedule_with_an_analytic_first_step(gmm):
    """analytic_first_start scores AFS_NAMED with an analytic first step at the search's NFE (the same calls, one
    step more) and returns the lowest; none for a start below T, a one-call schedule or when every one diverged."""
    import math

    from autotune.sampling.named import build, with_analytic_first
    from autotune.search.job import AFS_NAMED, analytic_first_start

    scored = []

    class SearchSet:
        def __init__(self, values):
            self.values = values

        def evaluate(self, s):
            scored.append(s)
            return {"mse_ref": self.values.get(s.name, 1.0)}

    best = dataclasses.replace(build("unipc-bh2-o2", gmm.noise, 4), guidance=None)
    start = analytic_first_start(SearchSet({"unipc-bh1-o3+afs": 0.2, "dpmsolver++2m+afs": 0.3}), gmm.noise, best)
    assert start == with_analytic_first("unipc-bh1-o3", gmm.noise, 4)
    assert start.nfe == 4 and len(start.steps) == 5 and start.steps[0].solver == "afs"
    assert start.steps[0].corrector == "none" and start.steps[1:] == build("unipc-bh1-o3", gmm.noise, 5).steps[1:]
    assert sorted(s.name for s in scored) == sorted(f"{n}+afs" for n in AFS_NAMED)
    assert analytic_first_start(SearchSet({f"{n}+afs": math.nan for n in AFS_NAMED}), gmm.noise, best) is None
    below_t = dataclasses.replace(best, t_start=0.9)
    assert analytic_first_start(SearchSet({}), gmm.noise, below_t) is None
    assert analytic_first_start(SearchSet({}), gmm.noise, build("ddim", gmm.noise, 1)) is None


def test_the_job_refines_an_analytic_first_start_unless_told_not_to(gmm):
    """By default the job refines the best named schedule with an analytic first step as one more validation
    finalist; --no-analytic-first (``analytic_first=False``) leaves it out, so nothing the job writes has one."""
    from autotune.search import job

    on = run_search_job(JobConfig(**SMALL, refine=5, score_report=False), model=gmm)
    labels = [f.label for f in on.validation.scored]
    # "... (gave up after N steps)": GIVE_UP; the chosen finalist's data-scaled twin is not another start
    afs = [f for f in on.validation.scored if "+afs" in f.label and not f.label.endswith(job.SCALED_SUFFIX)]
    assert len(afs) == 1 and afs[0].label.startswith("refined from "), labels
    assert afs[0].schedule.steps[0].solver == "afs" and afs[0].schedule.nfe == 4
    off = run_search_job(JobConfig(**SMALL, refine=5, score_report=False, analytic_first=False), model=gmm)
    assert not any("+afs" in f.label for f in off.validation.scored)
    assert all(s.solver != "afs" for s in off.best.steps)


def test_the_starts_ending_at_t_min_come_only_where_the_named_schedules_ending_there_score_clearly_lower(gmm):
    """t_min_starts scores AFS_NAMED built to end at t_min and at 0 on the search set: where the lowest ending at t_min
    is below T_MIN_MARGIN x the lowest ending at 0 it returns that schedule and the lowest ending at t_min with an
    analytic first step (not with analytic_first=False); else, and for a start that is not from T onto 0, none."""
    from autotune.sampling.named import build, with_analytic_first
    from autotune.search.job import AFS_NAMED, T_MIN_MARGIN, t_min_starts

    t_min = float(gmm.noise.t_min)

    class SearchSet:  # each schedule's value by its name and where it ends
        def __init__(self, at_zero, at_t_min):
            self.values = {0.0: at_zero, t_min: at_t_min}

        def evaluate(self, s):
            return {"mse_ref": self.values[s.times[-1]].get(s.name, 1.0)}

    best = dataclasses.replace(build("unipc-bh2-o2", gmm.noise, 4), guidance=None)
    clearly = SearchSet({"unipc-bh2-o3": 0.5}, {"dpmsolver++2m": 0.99 * T_MIN_MARGIN * 0.5, "unipc-bh1-o2+afs": 0.1,
                                               "unipc-bh2-o3+afs": 0.2})
    named, afs = t_min_starts(clearly, gmm.noise, best)
    assert named == build("dpmsolver++2m", gmm.noise, 4, "sigma_min")
    assert afs == with_analytic_first("unipc-bh1-o2", gmm.noise, 4, "sigma_min") and afs.times[-1] == t_min
    assert t_min_starts(clearly, gmm.noise, best, analytic_first=False) == [named]
    barely = SearchSet({"unipc-bh2-o3": 0.5}, {"dpmsolver++2m": 1.01 * T_MIN_MARGIN * 0.5})
    assert t_min_starts(barely, gmm.noise, best) == []
    diverged = SearchSet({}, {n: math.nan for n in AFS_NAMED})
    assert t_min_starts(diverged, gmm.noise, best) == []
    ending = dataclasses.replace(best, steps=best.steps[:-1] + (dataclasses.replace(best.steps[-1], t=t_min),))
    for other in (ending, dataclasses.replace(best, t_start=0.9), build("ddim", gmm.noise, 1)):
        assert t_min_starts(clearly, gmm.noise, other) == []


def test_the_job_refines_the_starts_ending_at_t_min_and_validation_may_choose_one(gmm, monkeypatch):
    """Where t_min_starts gives starts (here every time: T_MIN_MARGIN raised), each is refined with its last time free
    and is a validation finalist ending at t_min or above; the written schedule is one of the finalists. With
    --final sigma_min or without validation, no such start."""
    from autotune.search import job

    monkeypatch.setattr(job, "T_MIN_MARGIN", math.inf)
    outcome = run_search_job(JobConfig(**SMALL, refine=4, score_report=False), model=gmm)
    t_min = float(gmm.noise.t_min)
    # the starts (the chosen finalist's data-scaled twin, when there is one, is not another start)
    ending = [f for f in outcome.validation.scored
              if " to t_min" in f.label and not f.label.endswith(job.SCALED_SUFFIX)]
    assert len(ending) == 2 and any("+afs" in f.label for f in ending), [f.label for f in outcome.validation.scored]
    for f in ending:
        assert t_min * (1 - 1e-6) <= f.schedule.times[-1] < f.schedule.times[-2]
    chosen = outcome.validation.chosen
    assert chosen in outcome.validation.scored and outcome.best.times == chosen.schedule.times
    steps, step = _step_recorder()

    for config in (JobConfig(**SMALL, refine=4, score_report=False),
                   JobConfig(**SMALL, refine=4, score_report=False, final="sigma_min"),
                   JobConfig(**{**SMALL, "validate": 0}, refine=4, score_report=False)):
        steps.clear()
        run_search_job(config, model=gmm, hooks=JobHooks(step=step))
        refining = [d for d in steps if d.startswith("refining from") and d.endswith("to t_min (steps 1-2 of 4)")]
        assert len(refining) == (2 if config.final == "zero" and config.validating else 0), steps


def test_where_the_starts_ending_at_t_min_come_a_second_search_ends_there_and_its_best_is_refined(tmp_path, gmm,
                                                                                                   monkeypatch):
    """T_MIN_SEARCH: where t_min_starts gives starts (T_MIN_MARGIN raised), a second stage 1 with the same budget
    searches the space ending at t_min under its own search id (every trial ends there), its best is refined as one
    more validation finalist, the file records it and the outcome counts both searches' evaluations; a rerun on the
    same store resumes both. Where the rule does not fire, or with T_MIN_SEARCH off, no second search."""
    from autotune.search import job
    from autotune.search.job import T_MIN_SEARCH_LABEL

    t_min = float(gmm.noise.t_min)
    steps, step = _step_recorder()
    bars: list[str] = []

    @contextlib.contextmanager
    def bar(description, budget):
        bars.append(description)
        yield lambda progress: None

    monkeypatch.setattr(job, "T_MIN_MARGIN", math.inf)
    config = JobConfig(**SMALL, refine=4, score_report=False, out=tmp_path / "s.json")
    with open_store(tmp_path / "cache.sqlite") as store:
        outcome = run_search_job(config, store, model=gmm, hooks=JobHooks(step=step, search_progress=bar))
        there = outcome.t_min_search
        assert there is not None and bars == ["s3 NFE 4", "s3 NFE 4 to t_min"]
        meta = load(config.out).metadata["t_min_search"]
        assert meta["search_id"] != outcome.search_id and meta["true_evaluations"] == there.true_evaluations > 0
        trials = store.trials(meta["search_id"])
        assert len(trials) == there.true_evaluations + there.cache_hits
        assert all(t.schedule_value().times[-1] == t_min for t in there.trials)
        assert all(t.schedule_value().times[-1] == 0.0 for t in outcome.search.trials)
        assert outcome.true_evaluations == outcome.search.true_evaluations + there.true_evaluations
        assert outcome.budget_spent == outcome.search.spent + there.spent == meta["budget_spent"] + outcome.search.spent
        assert outcome.search_seconds == outcome.search.seconds + there.seconds > outcome.search.seconds
        refined = [f.schedule for f in outcome.validation.scored if f.label.startswith(T_MIN_SEARCH_LABEL)]
        assert len(refined) == 1, [f.label for f in outcome.validation.scored]
        assert t_min * (1 - 1e-6) <= refined[0].times[-1] < refined[0].times[-2]
        assert "refining the t_min search's best (steps 1-2 of 4)" in steps
        again = run_search_job(config, store, model=gmm)
        assert again.search.resumed and again.t_min_search.resumed and again.best.hash() == outcome.best.hash()

    for margin, on in ((0.0, True), (math.inf, False)):
        monkeypatch.setattr(job, "T_MIN_MARGIN", margin)
        monkeypatch.setattr(job, "T_MIN_SEARCH", on)
        bars.clear()
        outcome = run_search_job(JobConfig(**SMALL, refine=4, score_report=False), model=gmm,
                                 hooks=JobHooks(search_progress=bar))
        assert outcome.t_min_search is None and bars == ["s3 NFE 4"]
        assert outcome.true_evaluations == outcome.search.true_evaluations
        assert outcome.budget_spent == outcome.search.spent
        assert not any(f.label.startswith(T_MIN_SEARCH_LABEL) for f in outcome.validation.scored)


def test_the_winner_is_also_refined_without_shifts_and_validation_chooses(gmm, monkeypatch):
    """A second refinement of stage 1's best keeps the shifts where they were (the times and ratios move); both
    refined schedules are validation finalists. Without validation nothing could choose, so there is no second."""
    from autotune.search import job
    from autotune.search.job import NO_SHIFT_LABEL

    monkeypatch.setattr(job, "GIVE_UP", math.inf)  # every refinement runs its steps (giving up: its own test)

    steps, step = _step_recorder()

    config = JobConfig(**SMALL, refine=5, score_report=False)
    outcome = run_search_job(config, model=gmm, hooks=JobHooks(step=step))
    scored = {f.label: f.schedule for f in outcome.validation.scored}
    start = outcome.search.best
    assert "refined" in scored and NO_SHIFT_LABEL in scored
    without = scored[NO_SHIFT_LABEL]
    assert [s.shift for s in without.steps] == [s.shift for s in start.steps]
    assert without.times != start.times  # its grid moved
    assert any(s.shift != 0.0 for s in scored["refined"].steps)  # the first refinement moved the shifts
    assert "refining times and ratios without shifts (steps 1-2 of 5)" in steps

    steps.clear()
    run_search_job(JobConfig(**{**SMALL, "validate": 0}, refine=5, score_report=False), model=gmm,
                   hooks=JobHooks(step=step))
    assert not any("without shifts" in d for d in steps) and any(d.startswith("refining times") for d in steps)


def test_the_refinements_race_to_halfway_and_those_far_above_the_lowest_loss_give_up(gmm, monkeypatch):
    """RACE: every start runs half its steps; then, from the lowest loss up, each goes on only while its best is
    within GIVE_UP x the lowest loss reached (finished runs included), else it stops there and stays a finalist,
    its label saying so. The lowest at halfway always goes on, whichever start it is."""
    from autotune.search import gradient, job

    runs, starts = [], []
    descent = gradient.Descent

    class Recorded(descent):
        def __init__(self, model, start, *args, **kwargs):
            super().__init__(model, start, *args, **kwargs)
            starts.append(start)
            runs.append(self)

        def halfway(self):
            super().halfway()
            self.at_halfway = self.best_loss

    monkeypatch.setattr(gradient, "Descent", Recorded)
    monkeypatch.setattr(job, "SCALE_FIT_STEPS", 0)  # the starts' descents only (SCALE_FIT's: its own test)
    monkeypatch.setattr(job, "GIVE_UP", 1e-9)  # a bar nothing clears: all but the lowest at halfway give up
    outcome = run_search_job(JobConfig(**SMALL, refine=6, score_report=False), model=gmm)
    labels = [f.label for f in outcome.validation.scored]
    assert len(runs) >= 3 and starts[0].steps[0].solver == "afs" and starts[1] == outcome.search.best
    lowest = min(runs, key=lambda r: r.at_halfway)
    assert len(lowest.result.losses) == 6 and not lowest.result.gave_up  # it went on
    assert all(r.result is None and len(r.so_far.losses) == 3 for r in runs if r is not lowest)  # stopped halfway
    assert sum(label.endswith("(gave up after 3 steps)") for label in labels) == len(runs) - 1, labels
    assert outcome.refinement.before == outcome.search.best_trial.mse_ref  # the note: stage 1's best ...
    assert outcome.refinement.gave_up_after == (0 if runs[1] is lowest else 3)  # ... and whether it gave up

    runs.clear()
    monkeypatch.setattr(job, "GIVE_UP", math.inf)  # no bar: each runs every step
    outcome = run_search_job(JobConfig(**SMALL, refine=6, score_report=False), model=gmm)
    assert len(runs) >= 3 and all(not r.result.gave_up and len(r.result.losses) == 6 for r in runs)
    assert outcome.refinement.gave_up_after == 0
    assert not any("gave up" in f.label for f in outcome.validation.scored)


@pytest.fixture
def l_bfgs_recorded(monkeypatch):
    """Every L-BFGS descent a job makes (in ``made``) and every step line it shows (``steps``, through the ``step``
    hook it returns)."""
    from autotune.search import gradient

    made = []
    steps, step = _step_recorder()

    class Recorded(gradient.QuasiNewtonDescent):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(gradient, "QuasiNewtonDescent", Recorded)
    return made, steps, step


def test_a_descent_that_backed_off_races_an_l_bfgs_twin_and_the_lower_goes_on(gmm, monkeypatch, l_bfgs_recorded):
    """QUASI_NEWTON: every start whose Adam descent backed off is refined by L-BFGS to halfway too, and the lower
    of the two goes on in its place (labelled, and said in the refinement's note); a job whose descents do not back
    off makes no L-BFGS descent."""
    from autotune.search import gradient, job

    made, steps, step = l_bfgs_recorded
    monkeypatch.setattr(job, "POLISH_SHARE", 0.0)  # the twin alone (POLISH makes L-BFGS descents of its own)
    monkeypatch.setattr(job, "SCALE_FIT_STEPS", 0)  # and so does SCALE_FIT
    config = JobConfig(**SMALL, refine=6, score_report=False)
    plain = run_search_job(config, model=gmm)
    assert made == [] and not plain.refinement.quasi_newton
    assert not any("L-BFGS" in f.label for f in plain.validation.scored)

    monkeypatch.setattr(gradient, "BACKOFF", 0.0)  # every iterate after the first is a spike: Adam backs off
    outcome = run_search_job(config, model=gmm, hooks=JobHooks(step=step))
    twins = [s for s in steps if s.startswith("L-BFGS: ") and s.endswith("(steps 1-3 of 6)")]
    assert len(made) == len(twins) == 3  # every start backed off, and is within GIVE_UP (3x) of the lowest
    assert "L-BFGS: times, shifts and ratios (steps 1-3 of 6)" in steps  # stage 1's best has one too
    labels = [f.label for f in outcome.validation.scored]
    assert any("(L-BFGS" in label for label in labels)  # a twin lower than its start took its place
    went_on = [twin for twin in made if twin.result is not None and not twin.result.gave_up]
    assert len(went_on) == 1 and went_on[0].evaluations == 6  # the lowest at halfway; the others gave up there
    assert sum(s.startswith("L-BFGS: ") and s.endswith("(steps 4-6)") for s in steps) == 1
    assert outcome.refinement.quasi_newton == any(label.startswith("refined (L-BFGS") for label in labels)


def test_the_chosen_stiff_refinement_is_polished_by_l_bfgs_if_lower(gmm, monkeypatch, l_bfgs_recorded):
    """POLISH: the finalist validation chose, when it is a refinement whose descent met a stiff direction (Adam
    backed off, or L-BFGS took it), goes on by L-BFGS for POLISH_SHARE x --refine evaluations on the set the
    refinements fitted (Adam's by a fresh L-BFGS; one its L-BFGS twin took by that same descent, its history
    kept); the polished schedule (lower there) is scored on validation and written only when its selection value
    is lower. Without backoffs, or when the chosen finalist is no refinement, nothing is polished."""
    from autotune.search import gradient, job, validate
    from autotune.search.selection import selection_value

    made, steps, step = l_bfgs_recorded
    monkeypatch.setattr(job, "POLISH_SHARE", 0.5)
    monkeypatch.setattr(job, "SCALE_FIT_STEPS", 0)  # the polish alone (SCALE_FIT comes after it: its own test)
    config = JobConfig(**SMALL, refine=8, score_report=False)
    outcome = run_search_job(config, model=gmm, hooks=JobHooks(step=step))  # no descent backs off on gmm2d
    assert made == [] and not any(s.startswith("polishing") for s in steps)
    assert not any(f.label.endswith(job.POLISHED_SUFFIX) for f in outcome.validation.scored)

    monkeypatch.setattr(gradient, "BACKOFF", 0.0)  # every iterate after the first is a spike: Adam backs off
    picked = validate.pick_on_validation

    def run_choosing(wanted):  # validation chooses the first finalist ``wanted`` accepts
        def pick(evaluator, candidates, **kwargs):
            _, scored = picked(evaluator, candidates, **kwargs)
            return next(f for f in scored if wanted(f.label)), scored

        made.clear()
        steps.clear()
        monkeypatch.setattr(validate, "pick_on_validation", pick)
        outcome = run_search_job(config, model=gmm, hooks=JobHooks(step=step))
        v = outcome.validation
        (polished,) = [f for f in v.scored if f.label.endswith(job.POLISHED_SUFFIX)]
        (base,) = [f for f in v.scored if f.label + job.POLISHED_SUFFIX == polished.label]
        assert wanted(base.label) and "polishing validation's choice by L-BFGS (4 steps)" in steps
        assert v.scored[-1] is polished and v.scored.index(base) < len(v.scored) - 1  # scored after the choice
        assert polished.schedule.times != base.schedule.times
        lower = selection_value(polished.validation) < selection_value(base.validation)
        assert v.chosen is (polished if lower else base)
        assert outcome.best.times == v.chosen.schedule.times  # what validation chose is what the job wrote
        return made

    # on gmm2d every twin takes its start; the one chosen went on (the others gave up halfway)
    by_twin = run_choosing(lambda label: label.startswith("refined") and label.endswith("(L-BFGS)"))
    assert all(run.iterations != 4 for run in by_twin)  # no fresh descent: the twin that went on goes on
    (went_on,) = [run for run in by_twin if run.iterations == 12]
    losses = went_on.so_far.losses
    assert went_on.evaluations == len(losses) == 12 and min(losses[8:]) < min(losses[:8])  # lower on the fitted set
    with monkeypatch.context() as patched:  # no twin takes its start: every finalist is Adam's, backed off
        patched.setattr(job, "_quasi_newton_twins", lambda *args: set())
        by_adam = run_choosing(lambda label: label.startswith("refined"))
    (fresh,) = by_adam  # a fresh L-BFGS from the chosen finalist
    assert fresh.iterations == fresh.evaluations == 4 and min(fresh.so_far.losses) < fresh.so_far.losses[0]

    made.clear()
    steps.clear()
    monkeypatch.setattr(validate, "pick_on_validation", picked)

    def pick_a_trial(evaluator, candidates, **kwargs):  # validation chooses a finalist that is no refinement
        _, scored = picked(evaluator, candidates, **kwargs)
        return next(f for f in scored if not f.label.startswith("refined")), scored

    monkeypatch.setattr(validate, "pick_on_validation", pick_a_trial)
    outcome = run_search_job(config, model=gmm, hooks=JobHooks(step=step))
    assert made and all(run.iterations == 8 for run in made) and not any(s.startswith("polishing") for s in steps)
    assert not any(f.label.endswith(job.POLISHED_SUFFIX) for f in outcome.validation.scored)


def test_an_l_bfgs_twin_takes_a_start_only_when_lower_at_halfway():
    """_quasi_newton_twins on stand-in runs: every start that backed off and is within GIVE_UP of the lowest gets
    a twin, and a twin replaces its start only when its loss is lower."""
    from autotune.search.job import GIVE_UP, _quasi_newton_twins

    class Run:
        def __init__(self, loss, backoffs):
            self.best_loss, self.backoffs = loss, backoffs

        def above(self, bar):
            return self.best_loss > bar

        def halfway(self):
            pass

    starts = [(f"s{i}", f"start {i}", None, True) for i in range(4)]
    made = []

    def make(*losses):  # the twins' losses, in the order they are made
        def twin(start, shifts):
            made.append(Run(losses[len(made)], 0))
            return made[-1]
        return twin

    runs = [Run(1.0, 0), Run(2.0, 1), Run(1.5, 2), Run(1.0 * GIVE_UP * 1.01, 3)]
    kept = list(runs)
    assert _quasi_newton_twins(runs, starts, 1.0, QUIET, 3, 6, make(2.5, 1.2)) == {2}  # start 1's twin is higher
    assert len(made) == 2 and runs[1] is kept[1] and runs[2] is made[1] and runs[3] is kept[3]
    made.clear()
    runs = [Run(1.0, 0), Run(2.0, 1), Run(1.5, 2)]
    assert _quasi_newton_twins(runs, starts, 1.0, QUIET, 3, 6, make(0.5, 0.9)) == {1, 2}
    assert runs[1:] == made
    made.clear()
    assert _quasi_newton_twins([Run(1.0, 0), Run(5.0, 1)], starts, 1.0, QUIET, 3, 6, make(0.1)) == set()
    assert made == []  # above GIVE_UP x the lowest: it gives up anyway, no twin


def test_validations_choice_gets_its_data_scales_fitted_and_is_replaced_only_if_lower(gmm, monkeypatch):
    """SCALE_FIT: after validation has chosen, the choice's data scales alone are fitted by L-BFGS on the refinement
    set (its times, shifts and ratios kept); the scaled schedule is scored on validation and written only when its
    selection value is lower. Not with SCALE_FIT_STEPS 0, nor without validation."""
    from autotune.search import job
    from autotune.search.selection import selection_value

    steps, step = _step_recorder()

    config = JobConfig(**SMALL, refine=8, score_report=False)
    outcome = run_search_job(config, model=gmm, hooks=JobHooks(step=step))
    v = outcome.validation
    (scaled,) = [f for f in v.scored if f.label.endswith(job.SCALED_SUFFIX)]
    (base,) = [f for f in v.scored if f.label + job.SCALED_SUFFIX == scaled.label]
    assert f"fitting the choice's data scales by L-BFGS ({job.SCALE_FIT_STEPS} steps)" in steps
    assert v.scored[-1] is scaled
    assert [dataclasses.replace(st, data_scale=1.0) for st in scaled.schedule.steps] == \
        [dataclasses.replace(st, data_scale=1.0) for st in base.schedule.steps]
    assert any(st.data_scale != 1.0 for st in scaled.schedule.steps)
    assert all(st.data_scale == 1.0 for st in base.schedule.steps)
    assert v.chosen is (scaled if selection_value(scaled.validation) < selection_value(base.validation) else base)
    assert outcome.best.hash() == v.chosen.schedule.hash()  # what validation chose is what the job wrote
    assert outcome.best.metadata["validation"]["chosen"] == v.chosen.label

    for changes in ({"validate": 0}, {}):
        steps.clear()
        with monkeypatch.context() as patched:
            if not changes:
                patched.setattr(job, "SCALE_FIT_STEPS", 0)
            outcome = run_search_job(dataclasses.replace(config, **changes), model=gmm, hooks=JobHooks(step=step))
        assert not any("data scales" in s for s in steps)
        assert all(st.data_scale == 1.0 for st in outcome.best.steps)
        assert outcome.validation is None or not any(f.label.endswith(job.SCALED_SUFFIX)
                                                     for f in outcome.validation.scored)


def test_every_long_step_after_loading_runs_on_threads_fitted_to_the_free_cpus(gmm, monkeypatch):
    from autotune.evaluate import cpus

    events: list[str] = []
    monkeypatch.setattr(cpus, "fit_threads_to_free_cpus", lambda: events.append("fit"))

    @contextlib.contextmanager
    def step(description):
        events.append(description)
        yield None

    run_search_job(JobConfig(**SMALL), model=gmm, hooks=JobHooks(step=step))
    steps = [i for i, e in enumerate(events) if e != "fit"]
    assert events[steps[0]] == "loading gmm2d" and events[:steps[0]] == []  # torch is not imported to fit them
    later = [i for i in steps[1:] if not events[i].startswith("starting Ray")]
    assert later and all(events[i - 1] == "fit" for i in later), events
