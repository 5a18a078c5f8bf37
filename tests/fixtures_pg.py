"""Database fixtures (a pytest plugin, loaded from the root conftest.py).

`pg_url`: a PostgreSQL store URL with a fresh schema per test
(`...?schema=t_<hex>`), dropped afterwards. The server comes from
`WEFT_TEST_DATABASE_URL` (default postgresql://postgres@127.0.0.1:5432/test).
Unreachable server: the test is skipped locally, but fails when CI=true.

`sqlite_url`: a SQLite store URL for a file in the test's tmp_path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.sql import SQL, Identifier

DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _server_url() -> str:
    """The server URL without a query (libpq does not know `schema=`)."""
    parts = urlsplit(os.environ.get("WEFT_TEST_DATABASE_URL") or DEFAULT_TEST_DATABASE_URL)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not reachable ({reason}); set WEFT_TEST_DATABASE_URL")


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """The reachable server's URL (checked once per session); skips/fails otherwise."""
    url = _server_url()
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        _unavailable(f"{url}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    return url


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A store URL with a fresh, unique schema; the schema is dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex}"
    yield f"{pg_server_url}?schema={schema}"
    with psycopg.connect(pg_server_url, connect_timeout=3, autocommit=True) as conn:
        conn.execute(SQL("DROP SCHEMA IF EXISTS {0} CASCADE").format(Identifier(schema)))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite store URL for a (not yet existing) file in tmp_path."""
    return f"sqlite:///{tmp_path / 'weft.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test on both backends: a SQLite file, then a fresh PostgreSQL schema."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
