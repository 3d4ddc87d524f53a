"""The cache conformance suite (tests/test_cache.py) against a real PostgreSQL server.

Runs on the database AUTOTUNE_TEST_POSTGRES_URL names (one this user may create schemas in), or else on a
throwaway server the ``postgres_url`` fixture (tests/conftest.py) starts with `.ci/postgres.sh`; skipped,
with the reason at the end of the run, only when no server can be had. Each cache a test opens lives in a
schema of its own (selected through the connection's search_path), dropped afterwards.
"""

from __future__ import annotations

import uuid

import pytest

from test_cache import CacheConformance

# one pytest-xdist worker runs every test that needs the server: each worker would start (and on a fresh machine
# install) its own, and two apt-get runs at once fail on the package lock
pytestmark = pytest.mark.xdist_group("postgres")


@pytest.fixture(scope="module")
def admin_engine(postgres_url):
    pytest.importorskip("psycopg")
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
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
