"""The cache conformance suite (tests/test_cache.py) against a real PostgreSQL server.

Runs when AUTOTUNE_TEST_POSTGRES_URL names a database this user may create schemas in (`.ci/postgres.sh`
starts a throwaway server and sets it); skipped otherwise. Each cache a test opens lives in a schema of its
own (selected through the connection's search_path), dropped afterwards.
"""

from __future__ import annotations

import os
import uuid

import pytest

from test_cache import CacheConformance

URL = os.environ.get("AUTOTUNE_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="AUTOTUNE_TEST_POSTGRES_URL is not set (.ci/postgres.sh sets it)")


@pytest.fixture(scope="module")
def admin_engine():
    pytest.importorskip("psycopg")
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    url = make_url(URL)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


class TestPostgresCache(CacheConformance):
    @pytest.fixture
    def new_url(self, admin_engine):
        schemas: list[str] = []

        def make() -> str:
            name = f"autotune_test_{uuid.uuid4().hex[:12]}"
            with admin_engine.connect() as conn:
                conn.exec_driver_sql(f"CREATE SCHEMA {name}")
            schemas.append(name)
            return admin_engine.url.update_query_dict({"options": f"-csearch_path={name}"}) \
                .render_as_string(hide_password=False)

        yield make
        with admin_engine.connect() as conn:
            conn.exec_driver_sql("SET lock_timeout = '10s'")
            for name in schemas:
                conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")
