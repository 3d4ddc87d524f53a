"""The persistent cache: evaluations, reference trajectories and search state in one SQL database.

One implementation over SQLAlchemy Core serves a local SQLite file (the default) and any SQLAlchemy URL
(PostgreSQL for a store shared by a Ray cluster). Everything is content-addressed: an evaluation is keyed
by (model fingerprint, evaluation-set id, schedule hash, metric version), a reference by (model fingerprint,
evaluation-set id, reference version).

Writes are one transaction each and upserts (``INSERT ... ON CONFLICT``), so several processes may write
at once and a writer killed in the middle of a write leaves either the whole row or nothing. On SQLite
the file runs in WAL mode with a 30 s busy timeout, ``synchronous=NORMAL``, and write transactions take
the write lock up front (``BEGIN IMMEDIATE``) so concurrent writers queue instead of failing.

Values are written by ``cache/codec.py`` (strict JSON text, one ``np.savez`` blob per reference); the tables are
``cache/schema.py``; this module is the store: connections, dialects, reads and writes.

Example:
    >>> store = open_store(":memory:")
    >>> key = EvalKey("model-fp", "set-0", "abc123", "m1")
    >>> store.put_evaluation(key, {"mse": 0.25, "nfe": 5})
    >>> store.get_evaluation(key)
    {'mse': 0.25, 'nfe': 5}
    >>> store.close()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from autotune.cache.codec import dumps, loads, pack_arrays, unpack_arrays
from autotune.cache.schema import SCHEMA_VERSION, TABLES, schema
from autotune.errors import AutotuneError

BUSY_TIMEOUT_S = 30.0  # how long a SQLite connection waits for another's write lock (the store's, Optuna's)
_PG_SCHEMA_LOCK = 0x6175746F74756E65  # "autotune": serialises schema creation across processes
__all__ = ["CacheError", "EvalKey", "SCHEMA_VERSION", "Store", "TABLES", "default_cache_path", "dumps", "loads",
           "open_store"]


def sqlite_connection_settings(dbapi_conn: Any, wal: bool = True) -> None:
    """What every SQLite connection on a cache file gets (the store's and Optuna's, search/optuna_record.py): BEGIN
    left to SQLAlchemy (each engine's "begin" listener takes the write lock as it needs), a busy timeout, WAL (``wal``:
    not for an in-memory database) and synchronous=NORMAL (a commit does not wait for the disk)."""
    dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    if wal:
        cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class CacheError(AutotuneError, RuntimeError):
    """The cache cannot be opened, read or written; the message names the URL or path."""


class CacheTooLarge(CacheError):
    """A value larger than one field of the database holds (``MAX_BLOB_BYTES``): it was not written."""


# the largest value one field holds: SQLite's default SQLITE_MAX_LENGTH (1e9 bytes); PostgreSQL's bytea: 1 GB
MAX_BLOB_BYTES = 1_000_000_000


@dataclass(frozen=True)
class EvalKey:
    """The identity of one evaluation: which model, on which evaluation set, of which schedule, scored how."""

    model_fp: str
    eval_set: str
    schedule_hash: str
    metric_version: str

    def __post_init__(self) -> None:
        for name in ("model_fp", "eval_set", "schedule_hash", "metric_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise CacheError(f"EvalKey.{name} must be a non-empty string, got {value!r}")


# ------------------------------------------------------------------------------------------- locations


def default_cache_path() -> str:
    """``$AUTOTUNE_CACHE`` (a path or URL) or ``${XDG_CACHE_HOME:-~/.cache}/autotune/cache.sqlite``."""
    env = os.environ.get("AUTOTUNE_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "autotune", "cache.sqlite")


def one_line(exc: BaseException) -> str:
    """One line from a driver / SQLAlchemy exception, without SQLAlchemy's background links."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip() or type(orig).__name__
    first = text.splitlines()[0].strip()
    return first.split(" (Background on this error")[0]


def _damage_hint(exc: BaseException, store: "Store") -> str:
    """For an error that says the database file is damaged: how to see what is broken."""
    if "malformed" not in str(getattr(exc, "orig", None) or exc):
        return ""
    return f" (`autotune cache check --cache {store.display}` lists the damage)"


# ----------------------------------------------------------------------------------------------- store


class Store:
    """A cache database. Create it with :func:`open_store`.

    Every method runs on a pooled connection of its own, so one Store may be shared by threads; a forked
    child drops the parent's connections and opens its own, and a Store pickles as its URL, so it can be
    handed to Ray tasks or spawned processes, which reconnect. Several processes may write at once.
    """

    def __init__(self, url: str, display: str, sqlite_path: Path | None) -> None:
        from sqlalchemy import MetaData, create_engine, event
        from sqlalchemy.engine import make_url

        self.url = url
        self.display = display
        self.sqlite_path = sqlite_path
        self._pid = os.getpid()
        try:
            parsed = make_url(url)
            kwargs: dict[str, Any] = {}
            if parsed.get_backend_name() == "sqlite":
                kwargs["connect_args"] = {"timeout": BUSY_TIMEOUT_S}
            else:
                kwargs["pool_pre_ping"] = True
                if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
                    kwargs["connect_args"] = {"connect_timeout": 10}
            engine = create_engine(parsed, **kwargs)
        except Exception as e:  # ArgumentError, NoSuchModuleError, a missing driver (ImportError)
            raise CacheError(f"cannot open cache {display}: {one_line(e)}") from None
        self.backend = engine.dialect.name
        if self.backend == "sqlite":
            @event.listens_for(engine, "connect")
            def _sqlite_connect(dbapi_conn, _record):  # pragma: no cover - exercised through every test
                sqlite_connection_settings(dbapi_conn, wal=sqlite_path is not None)  # BEGIN: _sqlite_begin

            @event.listens_for(engine, "begin")
            def _sqlite_begin(conn):
                # Writers take the write lock at BEGIN, so a busy database makes them wait (busy_timeout)
                # instead of failing when a deferred read transaction tries to upgrade.
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("autotune_write")
                                     else "BEGIN")

        self._engine = engine
        self._write_engine = engine.execution_options(autotune_write=True)
        self._md = schema(MetaData())
        self._t = self._md.tables
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif self.backend == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            engine.dispose()
            raise CacheError(f"cannot open cache {display}: only SQLite and PostgreSQL are supported, "
                             f"not {self.backend!r}")
        self._insert = insert
        self._ensure_schema()

    # ------------------------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"Store({self.display!r})"

    def __reduce__(self):
        return (open_store, (self.url,))

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the connections (the data stays on disk)."""
        self._engine.dispose()

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:  # forked: never reuse the parent's connections
            self._engine.dispose(close=False)
            self._pid = os.getpid()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            yield
        except SQLAlchemyError as e:
            raise CacheError(f"cache {self.display}: {what} failed: {one_line(e)}{_damage_hint(e, self)}") from None

    @contextlib.contextmanager
    def _read(self, what: str):
        self._check_pid()
        with self._errors(what), self._engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def _write(self, what: str):
        """One write transaction: committed as a whole when the block ends, rolled back on any error."""
        self._check_pid()
        with self._errors(what), self._write_engine.begin() as conn:
            yield conn

    def _ensure_schema(self) -> None:
        from sqlalchemy import inspect, select
        from sqlalchemy.exc import SQLAlchemyError

        meta = self._t["meta"]
        version_q = select(meta.c.value).where(meta.c.key == "schema_version")
        try:
            with self._engine.connect() as conn:
                insp = inspect(conn)
                ready = all(insp.has_table(t) for t in ("meta",) + TABLES)
                version = conn.execute(version_q).scalar() if ready else None
            if version is None:
                with self._write_engine.begin() as conn:  # one process creates, the others wait
                    if self.backend == "postgresql":
                        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_SCHEMA_LOCK})")
                    self._md.create_all(conn, checkfirst=True)
                    conn.execute(self._insert(meta).values(key="schema_version", value=str(SCHEMA_VERSION))
                                 .on_conflict_do_nothing(index_elements=["key"]))
                    version = conn.execute(version_q).scalar()
        except SQLAlchemyError as e:
            self._engine.dispose()
            raise CacheError(f"cannot open cache {self.display}: {one_line(e)}") from None
        if int(version) > SCHEMA_VERSION:
            self._engine.dispose()
            raise CacheError(f"cache {self.display} has schema version {version}; this autotune reads up to "
                             f"{SCHEMA_VERSION}: upgrade autotune or use another --cache")

    def _upsert(self, table: str, values: dict, keys: list[str], overwrite: bool):
        stmt = self._insert(self._t[table]).values(**values)
        if overwrite:
            return stmt.on_conflict_do_update(index_elements=keys,
                                              set_={k: stmt.excluded[k] for k in values if k not in keys})
        return stmt.on_conflict_do_nothing(index_elements=keys)

    # --------------------------------------------------------------------------------- evaluations

    def _eval_values(self, key: EvalKey, metrics: Mapping[str, Any], schedule_json: str | None) -> dict:
        if not isinstance(key, EvalKey):
            raise CacheError(f"an evaluation key must be an EvalKey, got {type(key).__name__}")
        if not isinstance(metrics, Mapping):
            raise CacheError(f"metrics must be a dict, got {type(metrics).__name__}")
        if schedule_json is not None and not isinstance(schedule_json, str):
            raise CacheError(f"schedule_json must be JSON text or None, got {type(schedule_json).__name__}")
        try:
            text = dumps(dict(metrics))
        except TypeError as e:
            raise CacheError(f"metrics for {key.schedule_hash}: {e}") from None
        return {"model_fp": key.model_fp, "eval_set": key.eval_set, "schedule_hash": key.schedule_hash,
                "metric_version": key.metric_version, "metrics": text, "schedule": schedule_json,
                "created_at": time.time()}

    _EVAL_KEYS = ["model_fp", "eval_set", "schedule_hash", "metric_version"]

    def put_evaluation(self, key: EvalKey, metrics: Mapping[str, Any], schedule_json: str | None = None,
                       overwrite: bool = True) -> None:
        """Store one evaluation (one transaction). overwrite=False keeps an existing row untouched."""
        values = self._eval_values(key, metrics, schedule_json)
        with self._write("writing an evaluation") as conn:
            conn.execute(self._upsert("evaluations", values, self._EVAL_KEYS, overwrite))

    def put_evaluations(self, items: Iterable[tuple[EvalKey, Mapping[str, Any], str | None]],
                        overwrite: bool = True) -> int:
        """Store many evaluations in one transaction (all or none); returns how many were written."""
        n = 0
        with self._write("writing evaluations") as conn:
            for key, metrics, schedule_json in items:
                conn.execute(self._upsert("evaluations", self._eval_values(key, metrics, schedule_json),
                                          self._EVAL_KEYS, overwrite))
                n += 1
        return n

    def _eval_where(self, key: EvalKey):
        t = self._t["evaluations"]
        return ((t.c.model_fp == key.model_fp) & (t.c.eval_set == key.eval_set)
                & (t.c.schedule_hash == key.schedule_hash) & (t.c.metric_version == key.metric_version))

    def get_evaluation(self, key: EvalKey) -> dict | None:
        """The metrics stored for key, or None."""
        from sqlalchemy import select

        t = self._t["evaluations"]
        with self._read("reading an evaluation") as conn:
            text = conn.execute(select(t.c.metrics).where(self._eval_where(key))).scalar()
        return None if text is None else loads(text)

    def get_evaluations(self, keys: Iterable[EvalKey]) -> dict[EvalKey, dict]:
        """The metrics of those keys that are stored (one read transaction)."""
        from sqlalchemy import select

        t = self._t["evaluations"]
        out: dict[EvalKey, dict] = {}
        with self._read("reading evaluations") as conn:
            for key in keys:
                text = conn.execute(select(t.c.metrics).where(self._eval_where(key))).scalar()
                if text is not None:
                    out[key] = loads(text)
        return out

    def iter_evaluations(self, model_fp: str | None = None, eval_set: str | None = None,
                         metric_version: str | None = None) -> Iterator[dict]:
        """Every stored evaluation (optionally filtered) as a dict: the key fields, ``metrics`` (a dict),
        ``schedule`` (JSON text or None) and ``created_at`` (Unix seconds)."""
        from sqlalchemy import select

        t = self._t["evaluations"]
        q = select(t).order_by(*[t.c[k] for k in self._EVAL_KEYS])
        for name, value in (("model_fp", model_fp), ("eval_set", eval_set), ("metric_version", metric_version)):
            if value is not None:
                q = q.where(t.c[name] == value)
        with self._read("listing evaluations") as conn:
            for row in conn.execution_options(stream_results=True, yield_per=500).execute(q):
                d = dict(row._mapping)
                d["metrics"] = loads(d["metrics"])
                yield d

    # ---------------------------------------------------------------------------------- references

    def put_reference(self, model_fp: str, eval_set: str, ref_version: str, arrays: Mapping[str, Any],
                      meta: Mapping[str, Any] | None = None, overwrite: bool = True) -> None:
        """Store a reference trajectory: named arrays (one ``np.savez`` blob) and JSON-able metadata."""
        for name, value in (("model_fp", model_fp), ("eval_set", eval_set), ("ref_version", ref_version)):
            if not isinstance(value, str) or not value:
                raise CacheError(f"put_reference: {name} must be a non-empty string, got {value!r}")
        try:
            blob = pack_arrays(arrays)
            meta_text = dumps(dict(meta or {}))
        except (TypeError, ValueError) as e:
            raise CacheError(f"reference {model_fp}/{eval_set}/{ref_version}: {e}") from None
        if len(blob) > MAX_BLOB_BYTES:  # refused up front: the database would fail on it after the work was done
            raise CacheTooLarge(f"cache {self.display}: reference {ref_version} is {len(blob) / 1e6:.0f} MB, more "
                                f"than one field holds ({MAX_BLOB_BYTES / 1e6:.0f} MB); not stored")
        values = {"model_fp": model_fp, "eval_set": eval_set, "ref_version": ref_version, "meta": meta_text,
                  "arrays": blob, "nbytes": len(blob), "created_at": time.time()}
        with self._write("writing a reference") as conn:
            conn.execute(self._upsert("references", values, ["model_fp", "eval_set", "ref_version"], overwrite))

    def get_reference(self, model_fp: str, eval_set: str, ref_version: str
                      ) -> tuple[dict[str, np.ndarray], dict] | None:
        """(arrays, meta) of a stored reference, or None."""
        from sqlalchemy import select

        t = self._t["references"]
        q = select(t.c.arrays, t.c.meta).where((t.c.model_fp == model_fp) & (t.c.eval_set == eval_set)
                                               & (t.c.ref_version == ref_version))
        with self._read("reading a reference") as conn:
            row = conn.execute(q).first()
        if row is None:
            return None
        return unpack_arrays(bytes(row.arrays)), loads(row.meta)

    # ------------------------------------------------------------------------------ search state

    def _put_json(self, table: str, key_column: str, key: str, column: str, value: Mapping[str, Any],
                  what: str) -> None:
        """Store (replace) one JSON document under its key in a keyed table (search states, model memos)."""
        try:
            text = dumps(dict(value))
        except TypeError as e:
            raise CacheError(f"{what} {key}: {e}") from None
        values = {key_column: str(key), column: text, "updated_at": time.time()}
        with self._write(f"writing a {what}") as conn:
            conn.execute(self._upsert(table, values, [key_column], True))

    def _get_json(self, table: str, key_column: str, key: str, column: str, what: str) -> dict | None:
        from sqlalchemy import select

        t = self._t[table]
        with self._read(f"reading a {what}") as conn:
            text = conn.execute(select(t.c[column]).where(t.c[key_column] == str(key))).scalar()
        return None if text is None else loads(text)

    def put_search_state(self, search_id: str, state: Mapping[str, Any]) -> None:
        """Store (replace) a search's resumable state."""
        self._put_json("search_states", "search_id", search_id, "state", state, "search state")

    def get_search_state(self, search_id: str) -> dict | None:
        return self._get_json("search_states", "search_id", search_id, "state", "search state")

    def put_model_memo(self, memo_key: str, memo: Mapping[str, Any]) -> None:
        """Store (replace) what a MODEL argument loads as (its fingerprint, sample shape, classes), under
        ``evaluate.ids.model_memo_key`` of the argument (which changes with the files behind it)."""
        self._put_json("model_memos", "memo_key", memo_key, "memo", memo, "model memo")

    def get_model_memo(self, memo_key: str) -> dict | None:
        return self._get_json("model_memos", "memo_key", memo_key, "memo", "model memo")

    def add_trial(self, search_id: str, trial_number: int, schedule_hash: str | None,
                  metrics: Mapping[str, Any]) -> None:
        """Record (or replace) trial trial_number of a search."""
        try:
            text = dumps(dict(metrics))
        except TypeError as e:
            raise CacheError(f"trial {search_id}/{trial_number}: {e}") from None
        values = {"search_id": str(search_id), "trial_number": int(trial_number), "schedule_hash": schedule_hash,
                  "metrics": text, "created_at": time.time()}
        with self._write("writing a trial") as conn:
            conn.execute(self._upsert("search_trials", values, ["search_id", "trial_number"], True))

    def delete_trials(self, search_id: str, from_number: int = 0) -> int:
        """Delete a search's trials numbered ``from_number`` and up (a resumed search drops the trials of a
        batch its saved state does not cover); returns rows deleted."""
        from sqlalchemy import delete

        t = self._t["search_trials"]
        with self._write("deleting trials") as conn:
            return conn.execute(delete(t).where(t.c.search_id == str(search_id))
                                .where(t.c.trial_number >= int(from_number))).rowcount

    def trials(self, search_id: str) -> list[dict]:
        """A search's trials in trial order: dicts with trial_number, schedule_hash, metrics."""
        from sqlalchemy import select

        t = self._t["search_trials"]
        q = (select(t.c.trial_number, t.c.schedule_hash, t.c.metrics)
             .where(t.c.search_id == str(search_id)).order_by(t.c.trial_number))
        with self._read("reading trials") as conn:
            rows = conn.execute(q).all()
        return [{"trial_number": r.trial_number, "schedule_hash": r.schedule_hash, "metrics": loads(r.metrics)}
                for r in rows]

    # ------------------------------------------------------------------------------ maintenance

    def stats(self) -> dict[str, Any]:
        """``{"cache": where, "backend": ..., "schema_version": ..., "rows": {table: count},
        "size_bytes": on-disk size (SQLite: file + WAL; PostgreSQL: the tables with indexes and TOAST)}``."""
        from sqlalchemy import func, select, text

        rows: dict[str, int] = {}
        size: int | None = None
        with self._read("reading statistics") as conn:
            for name in TABLES:
                rows[name] = int(conn.execute(select(func.count()).select_from(self._t[name])).scalar())
            if self.backend == "postgresql":
                size = 0
                for name in ("meta",) + TABLES:
                    size += int(conn.execute(
                        text("SELECT COALESCE(pg_total_relation_size(to_regclass(:n)), 0)"),
                        {"n": f'"{name}"'}).scalar())
        if self.sqlite_path is not None:
            size = sum(p.stat().st_size for p in (self.sqlite_path, Path(f"{self.sqlite_path}-wal"))
                       if p.exists())
        return {"cache": self.display, "backend": self.backend, "schema_version": SCHEMA_VERSION,
                "rows": rows, "size_bytes": size}

    def check(self, quick: bool = False) -> list[str]:
        """What is broken in the database, one line each (at most 100); empty when nothing is.

        SQLite: ``PRAGMA integrity_check`` (every page, record, index and constraint), or with ``quick``
        ``PRAGMA quick_check`` (pages and records, indexes not cross-checked; faster on a large file).
        PostgreSQL: every table read through by sequential scan, so a damaged heap page fails the read (the
        server's ``amcheck`` extension checks indexes, which this does not).
        """
        from sqlalchemy import text
        from sqlalchemy.exc import DBAPIError

        problems: list[str] = []
        self._check_pid()
        try:
            with self._engine.connect() as conn:
                if self.backend == "sqlite":
                    pragma = "quick_check" if quick else "integrity_check"
                    for (row,) in conn.exec_driver_sql(f"PRAGMA {pragma}(100)"):  # may fail part-way: keep each
                        problems += [line for line in str(row).splitlines()
                                     if line != "ok" and not line.startswith("*** in database")]
                else:
                    for setting in ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan"):
                        conn.exec_driver_sql(f"SET LOCAL {setting} = off")
                    for name in ("meta",) + TABLES:
                        conn.execute(text(f'SELECT count(*) FROM "{name}"')).scalar()
        except DBAPIError as e:  # e.g. "database disk image is malformed": the check itself hit the damage
            problems.append(one_line(e))
        return problems[:100]

    def clear(self, table: str | None = None) -> dict[str, int]:
        """Delete every row of one table (or of all of them) in one transaction; returns rows deleted."""
        from sqlalchemy import delete

        names = TABLES if table is None else (table,)
        for name in names:
            if name not in TABLES:
                raise CacheError(f"cache {self.display}: no table {name!r} (one of {', '.join(TABLES)})")
        out = {}
        with self._write("clearing") as conn:
            for name in names:
                out[name] = conn.execute(delete(self._t[name])).rowcount
        if self.sqlite_path is not None and table is None:
            with contextlib.suppress(Exception), self._engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return out

    def export(self, path: str | os.PathLike) -> dict[str, int]:
        """Write the cache out as plain files; returns rows written per table.

        ``*.jsonl``: the evaluations only, one JSON object a line (key fields, ``metrics``, ``schedule``
        as parsed JSON or null, ``created_at``). Any other path: a directory holding ``evaluations.jsonl``,
        ``references.jsonl`` (key, meta, and ``arrays``: a ``.npz`` file under ``references/``),
        ``search_states.jsonl``, ``search_trials.jsonl`` and ``model_memos.jsonl``. Non-finite floats are written as in the store.
        """
        from sqlalchemy import select

        out = Path(path)
        counts: dict[str, int] = {}
        try:
            if out.suffix == ".jsonl":
                out.parent.mkdir(parents=True, exist_ok=True)
                counts["evaluations"] = self._export_evaluations(out)
                return counts
            out.mkdir(parents=True, exist_ok=True)
            counts["evaluations"] = self._export_evaluations(out / "evaluations.jsonl")
            (out / "references").mkdir(exist_ok=True)
            t = self._t["references"]
            n = 0
            with self._read("exporting references") as conn, open(out / "references.jsonl", "w") as f:
                for row in conn.execution_options(stream_results=True, yield_per=8).execute(
                        select(t).order_by(t.c.model_fp, t.c.eval_set, t.c.ref_version)):
                    ident = "\x00".join((row.model_fp, row.eval_set, row.ref_version))
                    name = f"references/{hashlib.sha256(ident.encode()).hexdigest()[:24]}.npz"
                    (out / name).write_bytes(bytes(row.arrays))
                    f.write(dumps({"model_fp": row.model_fp, "eval_set": row.eval_set,
                                   "ref_version": row.ref_version, "meta": loads(row.meta), "arrays": name,
                                   "created_at": row.created_at}) + "\n")
                    n += 1
            counts["references"] = n
            for table, order, json_columns in (("search_states", ("search_id",), ("state",)),
                                               ("search_trials", ("search_id", "trial_number"), ("metrics",)),
                                               ("model_memos", ("memo_key",), ("memo",))):
                counts[table] = self._export_rows(out / f"{table}.jsonl", table, order, json_columns)
        except OSError as e:
            raise CacheError(f"cannot export cache {self.display} to {out}: {e.strerror or e}") from None
        return counts

    def _export_rows(self, file: Path, table: str, order: tuple[str, ...], json_columns: tuple[str, ...]) -> int:
        """One JSON object a line per row of ``table`` (its JSON text columns parsed), in ``order``."""
        from sqlalchemy import select

        t = self._t[table]
        with self._read(f"exporting {table}") as conn, open(file, "w") as f:
            rows = conn.execute(select(t).order_by(*(t.c[c] for c in order))).all()
            for row in rows:
                f.write(dumps({c: loads(v) if c in json_columns else v for c, v in row._mapping.items()}) + "\n")
        return len(rows)

    def _export_evaluations(self, file: Path) -> int:
        n = 0
        with open(file, "w") as f:
            for d in self.iter_evaluations():
                sched = d["schedule"]
                if sched is not None:
                    with contextlib.suppress(ValueError):
                        sched = json.loads(sched)
                d["schedule"] = sched
                f.write(dumps(d) + "\n")
                n += 1
        return n


# ---------------------------------------------------------------------------------------------- open


def open_store(url_or_path: str | os.PathLike | None = None, create: bool = True) -> Store:
    """Open (creating if needed) a cache.

    Args:
        url_or_path: None for the default (:func:`default_cache_path`); a filesystem path for a SQLite
            file (its directory is created); ``":memory:"`` for a private in-memory SQLite database; or a
            SQLAlchemy URL (anything containing ``://``), e.g. ``postgresql://user@host/db`` for a store
            shared by a cluster (``postgresql://`` uses psycopg 3 when psycopg2 is not installed).
        create: False to refuse a SQLite file that does not exist yet (for commands that only look).

    Raises:
        CacheError: one line naming the URL or path (bad URL, missing driver, unreachable server, a file
            that is not a database, a newer schema).
    """
    target = default_cache_path() if url_or_path is None else os.fspath(url_or_path)
    if "://" in target:
        from sqlalchemy.engine import make_url

        try:
            url = make_url(target)
        except Exception as e:
            raise CacheError(f"cannot open cache {target}: {one_line(e)}") from None
        display = url.render_as_string(hide_password=True)
        if url.drivername == "postgresql":  # the bare name means psycopg2; fall back to psycopg 3
            import importlib.util

            if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
                url = url.set(drivername="postgresql+psycopg")
        sqlite_path = None
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            sqlite_path = Path(url.database).expanduser().absolute()
            if not create and not sqlite_path.exists():
                raise CacheError(f"no cache at {display}")
            with contextlib.suppress(OSError):
                sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        return Store(url.render_as_string(hide_password=False), display, sqlite_path)
    if target == ":memory:":
        return Store("sqlite://", ":memory:", None)
    path = Path(target).expanduser().absolute()
    if not create and not path.exists():
        raise CacheError(f"no cache at {path}")
    if path.is_dir():
        raise CacheError(f"cannot open cache {path}: is a directory (name a file, e.g. {path / 'cache.sqlite'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot open cache {path}: cannot create {path.parent}: {e.strerror or e}") from None
    return Store(f"sqlite:///{path}", str(path), path)
