"""Every search, whatever its method, recorded as an Optuna study in the cache's database (for optuna-dashboard).

The study is named ``autotune-<search id>`` and lives in the same SQLAlchemy database as the cache (its
tables — studies, trials, trial_params, trial_values, ... — do not clash with the cache's meta, evaluations,
references, search_states and search_trials), so ``optuna-dashboard sqlite:///<cache file>`` (or the
PostgreSQL URL of a shared cache) shows every search. One Optuna trial per search trial:

* params: the schedule's coordinates in the search space (:mod:`autotune.space.encoding`; times as
  themselves, categorical choices by name, skips as booleans) with their distributions, plus ``nfe`` when
  the NFE varies; a schedule outside the space (a seed) has no params.
* values: the objectives, raw, with the study's directions (minimise, or maximise for e.g. class_acc);
  a diverged schedule is a FAIL trial. A trial stopped early (the search's screen, or a partial score of
  `s3-mf`) is a PRUNED trial whose value is its intermediate value at step = the noises it was scored on, as
  Optuna's pruners leave one: an estimate, not a completed value. It carries no params (its schedule attribute
  has them): Optuna's plots of params (slice, contour, parallel coordinates, importances) read completed trials
  only, and writing its 25-odd param rows made a trial cost 45 ms on SQLite instead of 6 (`s3-mf` records about
  1000 partial scores in a 96-evaluation search).
* user attributes: trial_number (the search's), schedule_hash, nfe, method, cached, schedule (its JSON).

Recording is idempotent by trial number, so a resumed search adds only the trials the study lacks (the runner
offers it every saved trial again: those a stopped search had not recorded yet land then), and two copies of the
same search running at once add each trial once. A search without a cache (``--no-cache``)
records into Optuna's in-memory storage, i.e. nothing is kept. On SQLite the study's transactions take the
write lock up front (as the cache's do), so Ray workers writing evaluations at the same time queue instead
of failing.

Processes sharing a database take one lock (:func:`interprocess_lock`) around what Optuna does in several
transactions: creating its tables and stamping their alembic version on a new database (checked, then done:
two processes at once both try), and checking that a trial number is missing before adding it. Any database
error becomes one :class:`~autotune.cache.store.CacheError` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from autotune.cache.store import BUSY_TIMEOUT_S, CacheError, one_line, sqlite_connection_settings
from autotune.search.optuna_space import quiet_optuna
from autotune.search.pareto import direction
from autotune.search.trial import Trial
from autotune.space.encoding import ScheduleSpace
from autotune.space.fileformat import loads
from autotune.space.schedule import Schedule



def study_name(search_id: str) -> str:
    """The Optuna study name of a search."""
    return f"autotune-{search_id}"


def _in_memory(url: str | None) -> bool:
    return url is None or url in ("sqlite://", "sqlite:///:memory:")


def storage_for(url: str | None) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage on the cache's SQLAlchemy URL, or in-memory storage (no URL, or in-memory SQLite).

    Creating it on a new database creates Optuna's tables: the caller holds :func:`interprocess_lock`.
    """
    if _in_memory(url):
        return optuna.storages.InMemoryStorage()
    sqlite = url.startswith("sqlite")
    kwargs = {"connect_args": {"timeout": BUSY_TIMEOUT_S}} if sqlite else {"pool_pre_ping": True}
    with quiet_optuna():
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    if sqlite:
        _sqlite_settings(storage.engine)
    return storage


_PG_STUDY_LOCK = int.from_bytes(hashlib.sha256(b"autotune optuna studies").digest()[:8], "big", signed=True)


@contextlib.contextmanager
def interprocess_lock(url: str | None) -> Iterator[None]:
    """Held by one process at a time among those using the database at ``url``.

    SQLite: ``flock`` on ``<database file>.lock`` beside it (a lock inside the database itself would also
    block Optuna's own writes while held). PostgreSQL: a session advisory lock on a connection of its own.
    In-memory storage lives in one process and needs none.
    """
    if _in_memory(url):
        yield
        return
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        import fcntl

        fd = os.open(f"{parsed.database}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(parsed, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_STUDY_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_STUDY_LOCK})
                conn.commit()
    finally:
        engine.dispose()


def _sqlite_settings(engine: Any) -> None:
    """Optuna's SQLite engine set as the cache store sets its own, on the same database file
    (``sqlite_connection_settings``: synchronous=NORMAL, the same 4.8 ms a stopped-early trial on an idle machine, 10
    -> 7 ms with two benchmarks running), and BEGIN IMMEDIATE for every transaction (a deferred one could fail on
    upgrade)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # pragma: no cover - runs on every new connection
        sqlite_connection_settings(dbapi_conn)  # WAL: storage_for keeps in-memory databases off SQLite

    @event.listens_for(engine, "begin")
    def _begin(conn):  # pragma: no cover - runs on every transaction
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed are dropped


def _distribution(space: ScheduleSpace, c: Any) -> BaseDistribution:
    if c.kind == "real":
        return FloatDistribution(float(c.low), float(c.high))
    if c.kind == "int":
        return IntDistribution(int(c.low), int(c.high))
    if c.kind == "bool":
        return CategoricalDistribution((False, True))
    return CategoricalDistribution(space.choices(c.family))


def schedule_params(space: Any, s: Schedule) -> tuple[dict[str, Any], dict[str, BaseDistribution]]:
    """The schedule's coordinates in ``space`` (a ScheduleSpace or an NFERangeSpace) as Optuna params."""
    params: dict[str, Any] = {}
    dists: dict[str, BaseDistribution] = {}
    if not space.contains(s):
        return params, dists
    if not isinstance(space, ScheduleSpace):  # an NFE range: the schedule's own fixed-NFE space, and its nfe
        params["nfe"] = len(s.steps)
        dists["nfe"] = IntDistribution(space.low, space.high)
        space = space.space(len(s.steps))
    for c, x in zip(space.coords, space.encode(s)):
        d = _distribution(space, c)
        dists[c.name] = d
        if c.kind == "real":
            params[c.name] = float(x)
        elif c.kind == "int":
            params[c.name] = int(x)
        else:
            params[c.name] = d.choices[int(x)]
    return params, dists


class StudyRecorder:
    """Adds a search's trials to its Optuna study (created on first use; see the module docstring).

    Args:
        url: the cache's SQLAlchemy URL (``Store.url``), or None for in-memory storage.
        search_id: the search's id (the study is ``autotune-<search_id>``).
        space: the search space (for the params).
        objectives: objective names (the study's values, in order).
        attrs: study user attributes (model, method, NFE, ...), set when the study is created.

    Raises:
        CacheError: one line, when the database cannot be read or written (e.g. a corrupted file).
    """

    def __init__(self, url: str | None, search_id: str, space: Any, objectives: Sequence[str],
                 attrs: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.space = space
        self.objectives = tuple(objectives)
        self.name = study_name(search_id)
        with self._database("opening the study"), interprocess_lock(url), quiet_optuna():
            self.storage = storage_for(url)
            self.study = optuna.create_study(storage=self.storage, study_name=self.name, load_if_exists=True,
                                             directions=[direction(o) for o in self.objectives])
            if list(self.study.user_attrs) == []:
                for k, v in {"objectives": list(self.objectives), **dict(attrs or {})}.items():
                    self.study.set_user_attr(k, v)
        self.recorded: set[int] = set()

    @contextlib.contextmanager
    def _database(self, what: str) -> Iterator[None]:
        """Database errors (Optuna's storage runs on SQLAlchemy) as one CacheError line."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            yield
        except SQLAlchemyError as e:
            where = "in memory" if _in_memory(self.url) else f"in {_display(self.url)}"
            raise CacheError(f"Optuna study {self.name} {where}: {what} failed: {one_line(e)}") from None

    def _refresh(self) -> None:
        """Trial numbers in the study, including those another process (a copy of this search) added.
        The study's storage reads only trials added since the last call."""
        self.recorded |= {t.user_attrs.get("trial_number") for t in self.study.get_trials(deepcopy=False)}

    def record(self, trial: Trial, schedule: Schedule) -> None:
        """Add one search trial unless it is there."""
        number = trial.number
        if number in self.recorded:
            return
        objectives = trial.objectives or {self.objectives[0]: trial.value}
        values = [float(objectives[o]) for o in self.objectives]
        failed = not all(math.isfinite(v) for v in values)
        early = bool(trial.screened) and not failed  # stopped early: its value is an estimate (module doc)
        params, dists = ({}, {}) if early else schedule_params(self.space, schedule)
        attrs = {"trial_number": number, "schedule_hash": trial.hash, "nfe": trial.nfe,
                 "method": trial.method, "cached": trial.cached, "schedule": trial.schedule}
        if failed:
            state: dict[str, Any] = {"state": TrialState.FAIL}
        elif early:
            state = {"state": TrialState.PRUNED, "intermediate_values": {int(trial.screened): values[0]}}
        else:
            state = {"state": TrialState.COMPLETE, "values": values}
        # checked and added under the lock: a copy of this search may be adding the same number right now
        with self._database(f"recording trial {number}"), interprocess_lock(self.url), quiet_optuna():
            self._refresh()
            if number in self.recorded:
                return
            self.study.add_trial(create_trial(params=params, distributions=dists, user_attrs=attrs, **state))
        self.recorded.add(number)

    def record_missing(self, trials: Iterable[Trial]) -> None:
        """Add those of ``trials`` the study lacks (a resumed search's saved trials), reading the study once; only
        their schedules are parsed (from the trial's own JSON, what it scored)."""
        with self._database("reading the study"), quiet_optuna():
            self._refresh()
        for trial in trials:
            if trial.number not in self.recorded:
                self.record(trial, loads(trial.schedule))


def _display(url: str | None) -> str:
    """The URL without its password (as the cache names itself in messages)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
