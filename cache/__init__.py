"""Persistent, content-addressed store of reference trajectories, evaluations and search state.

SQLite by default (``$AUTOTUNE_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/autotune/cache.sqlite``), or any
SQLAlchemy URL (PostgreSQL) for a store shared by a cluster. See :mod:`autotune.cache.store`.
"""

from autotune.cache.store import SCHEMA_VERSION, TABLES, CacheError, EvalKey, Store, default_cache_path, open_store

__all__ = ["SCHEMA_VERSION", "TABLES", "CacheError", "EvalKey", "Store", "default_cache_path", "open_store"]
