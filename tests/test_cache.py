"""The cache: a conformance suite run on every backend (SQLite here, PostgreSQL in test_cache_postgres.py),
plus what only SQLite has (default location, WAL, integrity after kill -9).

Subclasses of ``CacheConformance`` provide a ``new_url`` fixture: a callable returning the URL or path of
a fresh, empty cache each time it is called.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from autotune.cache import TABLES, CacheError, EvalKey, Store, open_store
from autotune.cache.store import dumps, loads
from autotune.cache_cli import cache_app

WRITERS, ROWS_PER_WRITER = 4, 1000

# ------------------------------------------------------------------------------ helpers (also run in children)


def _concurrent_writer(url: str, wid: int, n: int, barrier) -> None:
    barrier.wait(60)  # all four open (and race to create the schema) at once
    with open_store(url) as store:
        for i in range(n):
            store.put_evaluation(EvalKey("model", "set", f"w{wid}-{i}", "v1"), {"w": wid, "i": i, "x": i / 7},
                                 f'{{"i": {i}}}')


def _expected_arrays(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {"x": rng.standard_normal((64, 1024)), "i": np.array(i), "mask": rng.random(100) > 0.5}


def _expected_metrics(i: int) -> dict:
    return {"i": i, "mse": 1.0 / (i + 1), "diverged": float("nan"), "max": float("inf"), "per_step": [i, i / 3]}


_WRITER = r"""
import sys, time
sys.path.insert(0, sys.argv[4])
from test_cache import _expected_arrays, _expected_metrics
from autotune.cache import EvalKey, open_store

url, start, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store = open_store(url)
if mode == "loop":  # each row its own transaction; report i once both rows of i are committed
    i = start
    while True:
        store.put_reference("model", f"set{i}", "ref1", _expected_arrays(i), {"i": i})
        store.put_evaluation(EvalKey("model", f"set{i}", f"h{i}", "m1"), _expected_metrics(i), f'{{"i": {i}}}')
        print(i, flush=True)
        i += 1
else:  # one transaction of many rows, killed while it is open
    def rows():
        for i in range(start, start + 100):
            yield EvalKey("model", f"set{i}", f"h{i}", "m1"), _expected_metrics(i), None
            if i == start + 50:
                print("inside", flush=True)
                time.sleep(120)
    store.put_evaluations(rows())
    print("committed", flush=True)
"""


def _spawn_writer(url: str, start: int, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, url, str(start), mode, str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True)


def _same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN and tells 0.0 from -0.0."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _cli():
    app = typer.Typer()
    app.add_typer(cache_app, name="cache")

    @app.callback()
    def _root() -> None:  # keeps `cache` a sub-command even though it is the only one
        pass

    return app


runner = CliRunner()

# --------------------------------------------------------------------------------------- conformance suite


class CacheConformance:
    """Behaviour every backend must have. Subclasses provide the ``new_url`` fixture."""

    @pytest.fixture
    def store(self, new_url):
        with open_store(new_url()) as s:
            yield s

    def test_evaluation_round_trip_is_exact(self, store):
        key = EvalKey("fp0123", "set-a", "sched01", "m1")
        assert store.get_evaluation(key) is None
        rng = np.random.default_rng(0)
        metrics = {
            "mse": 0.1, "tiny": 5e-324, "neg_zero": -0.0, "big": 1.7976931348623157e308,
            "random": [float(v) for v in rng.standard_normal(50)], "nan": float("nan"),
            "inf": float("inf"), "-inf": float("-inf"), "nfe": 5, "ok": True, "none": None, "name": "NaN",
            "nested": {"a": [1, 2.5, {"b": float("nan")}]}, "f32": np.float32(0.1), "i64": np.int64(7),
            "arr": np.arange(3.0), "tag_lookalike": {"$float": "x", "other": 1},
        }
        sched = '{"kind": "autotune.schedule", "nfe": 5}'
        store.put_evaluation(key, metrics, sched)
        got = store.get_evaluation(key)
        expected = dict(metrics, f32=float(np.float32(0.1)), i64=7, arr=[0.0, 1.0, 2.0])
        assert _same(got, expected), got
        (row,) = list(store.iter_evaluations())
        assert row["schedule"] == sched and _same(row["metrics"], expected)
        assert {k: row[k] for k in ("model_fp", "eval_set", "schedule_hash", "metric_version")} == vars(key)
        both = store.get_evaluations([key, EvalKey("fp0123", "set-a", "other", "m1")])
        assert list(both) == [key] and _same(both[key], expected)

    def test_upsert_semantics(self, store):
        key = EvalKey("fp", "set", "h", "m1")
        store.put_evaluation(key, {"mse": 1.0})
        store.put_evaluation(key, {"mse": 2.0})  # overwrite (the default): latest wins
        assert store.get_evaluation(key) == {"mse": 2.0}
        store.put_evaluation(key, {"mse": 3.0}, overwrite=False)  # keep what is there
        assert store.get_evaluation(key) == {"mse": 2.0}
        for other in (EvalKey("fp2", "set", "h", "m1"), EvalKey("fp", "set2", "h", "m1"),
                      EvalKey("fp", "set", "h2", "m1"), EvalKey("fp", "set", "h", "m2")):
            store.put_evaluation(other, {"mse": 9.0})
            assert store.get_evaluation(other) == {"mse": 9.0}
        assert store.get_evaluation(key) == {"mse": 2.0}
        assert store.stats()["rows"]["evaluations"] == 5

    def test_batch_is_all_or_nothing(self, store):
        good = [(EvalKey("fp", "set", f"h{i}", "m1"), {"i": i}, None) for i in range(5)]
        bad = good[:3] + [(EvalKey("fp", "set", "bad", "m1"), {"x": object()}, None)] + good[3:]
        with pytest.raises(CacheError, match="bad"):
            store.put_evaluations(bad)
        assert store.stats()["rows"]["evaluations"] == 0
        assert store.put_evaluations(good) == 5
        assert store.get_evaluations(k for k, _, _ in good) == {k: m for k, m, _ in good}

    def test_reference_round_trip(self, store):
        assert store.get_reference("fp", "set", "ref1") is None
        arrays = {"times": np.linspace(1, 0, 11), "states": np.random.default_rng(1).standard_normal((11, 4, 3, 2))
                  .astype(np.float32), "ids": np.arange(4, dtype=np.int64), "flag": np.array(True),
                  "empty": np.zeros((0, 3))}
        store.put_reference("fp", "set", "ref1", arrays, {"check_mse": 1e-9, "nan": float("nan")})
        got, meta = store.get_reference("fp", "set", "ref1")
        assert got.keys() == arrays.keys()
        for k in arrays:
            assert got[k].dtype == arrays[k].dtype and got[k].shape == arrays[k].shape
            np.testing.assert_array_equal(got[k], arrays[k])
        assert meta["check_mse"] == 1e-9 and math.isnan(meta["nan"])
        store.put_reference("fp", "set", "ref1", {"times": np.zeros(2)}, {})
        assert list(store.get_reference("fp", "set", "ref1")[0]) == ["times"]
        store.put_reference("fp", "set", "ref1", {"times": np.ones(2)}, {}, overwrite=False)
        assert store.get_reference("fp", "set", "ref1")[0]["times"].tolist() == [0.0, 0.0]
        assert store.get_reference("fp", "set", "ref2") is None

    def test_search_state_and_trials(self, store):
        assert store.get_search_state("s1") is None and store.trials("s1") == []
        store.put_search_state("s1", {"generation": 3, "population": [[0.1, 0.2]], "best": float("inf")})
        store.put_search_state("s1", {"generation": 4})
        assert store.get_search_state("s1") == {"generation": 4}
        for n in (2, 0, 1):
            store.add_trial("s1", n, f"h{n}", {"mse": n / 10})
        store.add_trial("s1", 1, "h1b", {"mse": float("nan")})
        store.add_trial("s2", 0, None, {"mse": 1.0})
        trials = store.trials("s1")
        assert [t["trial_number"] for t in trials] == [0, 1, 2]
        assert trials[1]["schedule_hash"] == "h1b" and math.isnan(trials[1]["metrics"]["mse"])
        assert store.trials("s2") == [{"trial_number": 0, "schedule_hash": None, "metrics": {"mse": 1.0}}]

    def test_stats_clear_export(self, store, tmp_path):
        for i in range(3):
            store.put_evaluation(EvalKey("fp", "set", f"h{i}", "m1"), {"i": i, "bad": float("nan")},
                                 json.dumps({"nfe": i}) if i else None)
        store.put_reference("fp", "set", "ref1", {"x": np.arange(4.0)}, {"a": 1})
        store.put_search_state("s", {"g": 1})
        store.add_trial("s", 0, "h0", {"i": 0})
        store.put_model_memo("memo-key", {"fingerprint": "fp", "sample_shape": [2], "num_classes": None})
        assert store.get_model_memo("memo-key")["sample_shape"] == [2] and store.get_model_memo("other") is None
        st = store.stats()
        assert st["rows"] == {"evaluations": 3, "references": 1, "search_states": 1, "search_trials": 1,
                              "model_memos": 1}
        assert st["backend"] == store.backend and st["size_bytes"] > 0

        assert store.export(tmp_path / "evals.jsonl") == {"evaluations": 3}
        lines = [loads(line) for line in (tmp_path / "evals.jsonl").read_text().splitlines()]
        assert [d["schedule_hash"] for d in lines] == ["h0", "h1", "h2"]
        assert lines[0]["schedule"] is None and lines[2]["schedule"] == {"nfe": 2}
        assert all(math.isnan(d["metrics"]["bad"]) for d in lines)
        json.loads((tmp_path / "evals.jsonl").read_text().splitlines()[0])  # strict JSON: no bare NaN

        counts = store.export(tmp_path / "dump")
        assert counts == {"evaluations": 3, "references": 1, "search_states": 1, "search_trials": 1, "model_memos": 1}
        (ref,) = [loads(line) for line in (tmp_path / "dump" / "references.jsonl").read_text().splitlines()]
        with np.load(tmp_path / "dump" / ref["arrays"]) as z:
            assert z["x"].tolist() == [0.0, 1.0, 2.0, 3.0]

        assert store.clear("search_trials") == {"search_trials": 1}
        assert store.stats()["rows"]["evaluations"] == 3
        with pytest.raises(CacheError, match="no table"):
            store.clear("meta")
        assert store.clear() == {"evaluations": 3, "references": 1, "search_states": 1, "search_trials": 0,
                                 "model_memos": 1}
        assert set(store.stats()["rows"].values()) == {0}
        store.put_evaluation(EvalKey("fp", "set", "h", "m1"), {"after": "clear"})  # still usable
        assert store.get_evaluation(EvalKey("fp", "set", "h", "m1")) == {"after": "clear"}

    def test_reopen_and_pickle(self, new_url):
        url = new_url()
        with open_store(url) as s:
            s.put_evaluation(EvalKey("fp", "set", "h", "m1"), {"mse": 0.5})
            clone = pickle.loads(pickle.dumps(s))  # what a Ray task receives
        assert isinstance(clone, Store) and clone.get_evaluation(EvalKey("fp", "set", "h", "m1")) == {"mse": 0.5}
        clone.close()
        with open_store(url) as again:
            assert again.get_evaluation(EvalKey("fp", "set", "h", "m1")) == {"mse": 0.5}
            assert again.stats()["schema_version"] == 1

    def test_invalid_input_is_a_cache_error(self, store):
        with pytest.raises(CacheError, match="schedule_hash"):
            EvalKey("fp", "set", "", "m1")
        with pytest.raises(CacheError, match="dict"):
            store.put_evaluation(EvalKey("fp", "set", "h", "m1"), [1, 2])
        with pytest.raises(CacheError, match="object"):
            store.put_evaluation(EvalKey("fp", "set", "h", "m1"), {"x": object()})
        with pytest.raises(CacheError, match="EvalKey"):
            store.put_evaluation(("fp", "set", "h", "m1"), {})
        with pytest.raises(CacheError, match="ref_version"):
            store.put_reference("fp", "set", "", {"x": np.zeros(1)})
        assert store.stats()["rows"]["evaluations"] == 0

    def test_concurrent_writers_lose_nothing(self, new_url):
        """4 processes write 1,000 evaluations each, one transaction per row, into one fresh cache."""
        url = new_url()
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(WRITERS)
        procs = [ctx.Process(target=_concurrent_writer, args=(url, w, ROWS_PER_WRITER, barrier))
                 for w in range(WRITERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(180)
        assert [p.exitcode for p in procs] == [0] * WRITERS
        with open_store(url) as store:
            assert store.stats()["rows"]["evaluations"] == WRITERS * ROWS_PER_WRITER
            rows = {r["schedule_hash"]: r for r in store.iter_evaluations()}
        assert len(rows) == WRITERS * ROWS_PER_WRITER
        for w in range(WRITERS):
            for i in range(ROWS_PER_WRITER):
                r = rows[f"w{w}-{i}"]
                assert r["metrics"] == {"w": w, "i": i, "x": i / 7} and r["schedule"] == f'{{"i": {i}}}'

    def test_kill_9_mid_write_leaves_only_whole_rows(self, new_url):
        """A writer killed with SIGKILL: every row it reported committed is intact, nothing is half there,
        an open transaction leaves no trace, and the cache takes writes afterwards."""
        url = new_url()
        open_store(url).close()  # schema first, so the writers spend their time writing rows
        reported: set[int] = set()
        start = 0
        for round_ in range(3):  # killed at a different moment each round, mostly inside a 0.5 MB write
            proc = _spawn_writer(url, start, "loop")
            target = start + 8 + 3 * round_
            for line in proc.stdout:
                reported.add(int(line))
                if int(line) >= target:
                    time.sleep(0.002 * round_)
                    break
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            assert proc.returncode == -signal.SIGKILL  # it was still writing, not finished
            start = max(reported) + 1
        proc = _spawn_writer(url, 1000, "batch")  # killed while its transaction is open
        assert proc.stdout.readline().strip() == "inside"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()

        with open_store(url) as store:
            for i in reported:
                assert store.get_evaluation(EvalKey("model", f"set{i}", f"h{i}", "m1")) is not None, i
                assert store.get_reference("model", f"set{i}", "ref1") is not None, i
            evals = list(store.iter_evaluations())
            for r in evals:  # every row present (reported or not) is whole
                i = int(r["schedule_hash"][1:])
                assert i < 1000, "a row of the killed transaction is visible"
                assert _same(r["metrics"], _expected_metrics(i)) and r["schedule"] == f'{{"i": {i}}}'
            refs = store.stats()["rows"]["references"]
            assert len(evals) >= len(reported) and refs >= len(reported)
            for i in range(max(reported) + 2):
                got = store.get_reference("model", f"set{i}", "ref1")
                if got is not None:
                    arrays, meta = got
                    assert meta == {"i": i}
                    for k, v in _expected_arrays(i).items():
                        np.testing.assert_array_equal(arrays[k], v)
            store.put_evaluation(EvalKey("model", "after", "h", "m1"), {"ok": 1})
            assert store.get_evaluation(EvalKey("model", "after", "h", "m1")) == {"ok": 1}
            if store.sqlite_path is not None:
                with store._engine.connect() as conn:
                    assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"

    def test_cli_stats_clear_export(self, new_url, tmp_path):
        url = new_url()
        with open_store(url) as store:
            for i in range(3):
                store.put_evaluation(EvalKey("fp", "set", f"h{i}", "m1"), {"i": i})
            store.put_reference("fp", "set", "ref1", {"x": np.zeros(3)})
        app = _cli()
        r = runner.invoke(app, ["cache", "stats", "--cache", url])
        assert r.exit_code == 0, r.output
        assert "evaluations" in r.stdout and "search_trials" in r.stdout and "size on disk" in r.stdout

        r = runner.invoke(app, ["cache", "export", str(tmp_path / "e.jsonl"), "--cache", url])
        assert r.exit_code == 0, r.output
        assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 3
        r = runner.invoke(app, ["cache", "export", str(tmp_path / "all"), "--cache", url])
        assert r.exit_code == 0 and (tmp_path / "all" / "references.jsonl").exists(), r.output

        r = runner.invoke(app, ["cache", "clear", "--cache", url], input="n\n")
        assert r.exit_code == 1
        r = runner.invoke(app, ["cache", "clear", "--cache", url, "--table", "references", "--yes"])
        assert r.exit_code == 0 and "references: 1 deleted" in r.stdout, r.output
        r = runner.invoke(app, ["cache", "clear", "--cache", url], input="y\n")
        assert r.exit_code == 0 and "evaluations: 3 deleted" in r.stdout, r.output
        with open_store(url) as store:
            assert set(store.stats()["rows"].values()) == {0}

        r = runner.invoke(app, ["cache", "clear", "--cache", url, "--table", "nope", "--yes"])
        assert r.exit_code == 2 and r.stderr.strip().startswith("error:") and "nope" in r.stderr


class TestSqliteCache(CacheConformance):
    @pytest.fixture
    def new_url(self, tmp_path):
        n = iter(range(1000))
        return lambda: str(tmp_path / f"cache{next(n)}" / "cache.sqlite")


# ----------------------------------------------------------------------------------------- SQLite only


def test_default_location(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with open_store() as s:
        assert s.sqlite_path == tmp_path / "xdg" / "autotune" / "cache.sqlite"
    assert (tmp_path / "xdg" / "autotune" / "cache.sqlite").exists()
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "env.sqlite"))
    with open_store() as s:
        assert s.sqlite_path == tmp_path / "env.sqlite"
    monkeypatch.setenv("AUTOTUNE_CACHE", f"sqlite:///{tmp_path / 'url.sqlite'}")
    with open_store() as s:
        assert s.sqlite_path == tmp_path / "url.sqlite"


def test_sqlite_runs_in_wal_mode(tmp_path):
    with open_store(tmp_path / "c.sqlite") as s:
        s.put_evaluation(EvalKey("fp", "set", "h", "m1"), {"x": 1})
        with s._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


def _forked_child(store: Store) -> None:
    store.put_evaluation(EvalKey("fp", "set", "child", "m1"), {"pid": os.getpid()})


def test_store_survives_fork_and_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with open_store(tmp_path / "c.sqlite") as s:
        s.put_evaluation(EvalKey("fp", "set", "parent", "m1"), {"x": 1})  # the parent holds a pooled connection
        p = mp.get_context("fork").Process(target=_forked_child, args=(s,))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: s.put_evaluation(EvalKey("fp", "set", f"t{i}", "m1"), {"i": i}), range(40)))
        assert s.get_evaluation(EvalKey("fp", "set", "child", "m1"))["pid"] == p.pid
        assert s.stats()["rows"]["evaluations"] == 42


def test_in_memory_store():
    with open_store(":memory:") as s:
        s.put_evaluation(EvalKey("fp", "set", "h", "m1"), {"x": 1})
        assert s.get_evaluation(EvalKey("fp", "set", "h", "m1")) == {"x": 1}


@pytest.mark.parametrize("target, needle", [
    ("nosuchdialect://host/db", "nosuchdialect://host/db"),
    ("postgresql+psycopg://someone:secret@127.0.0.1:1/db", "someone:***@127.0.0.1:1/db"),
])
def test_bad_url_or_unreachable_server_is_one_line(target, needle):
    if "psycopg" in target:
        pytest.importorskip("psycopg")
    with pytest.raises(CacheError) as e:
        open_store(target)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and "secret" not in msg, msg


def test_not_a_database_or_a_directory(tmp_path):
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(CacheError, match="junk.sqlite.*not a database"):
        open_store(tmp_path / "junk.sqlite")
    with pytest.raises(CacheError, match="is a directory"):
        open_store(tmp_path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "c.sqlite"
    open_store(path).close()
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(CacheError, match="schema version 99"):
        open_store(path)


def test_json_text_is_strict_and_tagged():
    text = dumps({"a": float("nan"), "b": [float("inf"), -float("inf")], "c": 0.1})
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    back = loads(text)
    assert math.isnan(back["a"]) and back["b"] == [float("inf"), -float("inf")] and back["c"] == 0.1


def test_plain_json_and_tagged_values_are_written_alike():
    """dumps hands plain JSON data to json's encoder alone and the rest to _encode first: both write the same text
    (keys included: True as "true" either way), so which path a value took never shows in the cache."""
    from autotune.cache import codec

    def slow(obj):
        return json.dumps(codec._encode(obj), allow_nan=False, separators=(",", ":"))

    plain = [{"a": [1, 2.5, None, True, "x"], 3: (0.1, -0.0), 1.5: {"n": 10 ** 20}, True: 1, None: [], False: {}},
             [[{"t": 0.123456789012345678}]], "s", 7, 1e-300]
    for obj in plain:
        assert codec.dumps(obj) == slow(obj)
    assert codec.dumps({True: 1, None: 2, 4: 3}) == '{"true":1,"null":2,"4":3}'
    tagged = {True: float("nan"), None: np.float32(0.5), 4: np.int64(3), "a": np.arange(2), "i": float("-inf")}
    assert codec.dumps(tagged) == slow(tagged) == ('{"true":{"$float":"nan"},"null":0.5,"4":3,"a":[0,1],'
                                                    '"i":{"$float":"-inf"}}')
    assert loads(codec.dumps(tagged))["null"] == 0.5


def test_cli_bad_cache_is_one_line_error():
    r = runner.invoke(_cli(), ["cache", "stats", "--cache", "nosuchdialect://x/y"])
    assert r.exit_code == 2, r.output
    text = r.stderr.strip()
    assert text.startswith("error:") and "\n" not in text and "nosuchdialect://x/y" in text, text
    assert "Traceback" not in r.output


def test_tables_constant():
    assert TABLES == ("evaluations", "references", "search_states", "search_trials", "model_memos")


def test_a_cache_from_before_the_memo_table_gains_it_on_open(tmp_path):
    """Caches written before model memos had their own table: opening one adds the table, keeps every row."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    with open_store(str(path)) as store:
        store.put_search_state("s", {"g": 1})
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE model_memos")
    with open_store(str(path)) as store:
        assert store.get_search_state("s") == {"g": 1} and store.get_model_memo("k") is None
        store.put_model_memo("k", {"fingerprint": "fp"})
        assert store.stats()["rows"]["model_memos"] == 1


def test_a_reference_too_large_for_one_field_is_refused_up_front_and_the_run_keeps_it(tmp_path, monkeypatch, gmm):
    """1024 dense 32x32 RGB trajectories outgrew SQLite's field (a search of 33 minutes died writing its report
    reference): the store refuses a value over MAX_BLOB_BYTES before writing, and the evaluator keeps the reference
    in memory with a warning, so the run goes on."""
    from autotune.cache import store as store_module
    from autotune.evaluate.evaluator import Evaluator
    from autotune.sampling.named import build

    store = open_store(str(tmp_path / "c.db"))
    monkeypatch.setattr(store_module, "MAX_BLOB_BYTES", 1000)
    with pytest.raises(store_module.CacheTooLarge, match="more than one field holds"):
        store.put_reference("fp", "set", "v1", {"states": np.zeros((10, 100))}, {})
    assert store.get_reference("fp", "set", "v1") is None
    ev = Evaluator(gmm, "search", size=16, store=store, ref_steps=20)
    with pytest.warns(RuntimeWarning, match="kept in this process's memory only"):
        ref = ev.reference()
    assert ev.reference() is ref  # held in memory: not solved again
    assert math.isfinite(ev.evaluate(build("unipc-bh2-o2", gmm.noise, 5))["mse_ref"])
