"""Fixtures: real SQLite files and a real PostgreSQL database of this run's own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from storage.engine import make_engine
from storage.schema import upgrade_to_head
from storage.sql_ledger import SqlLedger

POSTGRES_ENV = "PACRECON_TEST_DATABASE_URL"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log() -> Iterator[None]:
    """At the end of the session, every captured log of every process the suite started
    (killed ones too) is scanned for the secrets that process was configured with."""
    from tests.daemon import STARTED

    yield
    failures = []
    for service in STARTED:
        try:
            service.check_log()
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


@contextmanager
def postgres_database(admin_url: str, prefix: str = "pacrecon_test") -> Iterator[str]:
    """A database of its own on `admin_url`'s server, migrated to head; dropped at the end."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database created for this test run on the server PACRECON_TEST_DATABASE_URL
    names, migrated to head, and dropped at the end."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        pytest.skip(f"{POSTGRES_ENV} is not set: no PostgreSQL server to test against")
    with postgres_database(admin_url) as url:
        yield url


def empty_postgres(url: str) -> None:
    import storage.models  # noqa: F401  (every table on the metadata)
    from sqlmodel import SQLModel

    # lag_bucket is reference data the migration wrote, not ledger contents
    tables = ", ".join(table.name for table in SQLModel.metadata.sorted_tables if table.name != "lag_bucket")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


def migrated_sqlite_url(path: Path) -> str:
    """A new SQLite ledger file at `path`, migrated to head."""
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    return url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated, empty ledger database: a new SQLite file, or the run's PostgreSQL database emptied."""
    if request.param == "sqlite":
        return migrated_sqlite_url(tmp_path_factory.mktemp("ledger") / "pacrecon.db")
    url = request.getfixturevalue("postgres_url")
    empty_postgres(url)
    return url


@pytest.fixture
def ledger(database_url: str) -> Iterator[SqlLedger]:
    opened = SqlLedger.from_url(database_url)
    try:
        yield opened
    finally:
        opened.close()
