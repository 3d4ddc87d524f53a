"""The cache's tables (SQLAlchemy Core): one per kind of record, created on first open, added to older caches."""

from __future__ import annotations

SCHEMA_VERSION = 1
TABLES = ("evaluations", "references", "search_states", "search_trials", "model_memos")


def schema(metadata):
    from sqlalchemy import BigInteger, Column, Float, Integer, LargeBinary, Table, Text

    Table("meta", metadata, Column("key", Text, primary_key=True), Column("value", Text, nullable=False))
    Table(
        "evaluations", metadata,
        Column("model_fp", Text, primary_key=True), Column("eval_set", Text, primary_key=True),
        Column("schedule_hash", Text, primary_key=True), Column("metric_version", Text, primary_key=True),
        Column("metrics", Text, nullable=False), Column("schedule", Text, nullable=True),
        Column("created_at", Float, nullable=False),
    )
    Table(
        "references", metadata,
        Column("model_fp", Text, primary_key=True), Column("eval_set", Text, primary_key=True),
        Column("ref_version", Text, primary_key=True),
        Column("meta", Text, nullable=False), Column("arrays", LargeBinary, nullable=False),
        Column("nbytes", BigInteger, nullable=False), Column("created_at", Float, nullable=False),
    )
    Table(
        "search_states", metadata,
        Column("search_id", Text, primary_key=True), Column("state", Text, nullable=False),
        Column("updated_at", Float, nullable=False),
    )
    Table(  # what a MODEL argument loads as (fingerprint, sample shape): lets `autotune eval` answer from the cache
        "model_memos", metadata,
        Column("memo_key", Text, primary_key=True), Column("memo", Text, nullable=False),
        Column("updated_at", Float, nullable=False),
    )
    Table(
        "search_trials", metadata,
        Column("search_id", Text, primary_key=True), Column("trial_number", Integer, primary_key=True,
                                                            autoincrement=False),
        Column("schedule_hash", Text, nullable=True), Column("metrics", Text, nullable=False),
        Column("created_at", Float, nullable=False),
    )
    return metadata
