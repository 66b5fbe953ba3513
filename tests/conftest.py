"""Shared fixtures: real databases migrated by Alembic, an app client, API keys of two tenants.

API tests run on SQLite and, when PHITUNE_TEST_DATABASE_URL is set, on that PostgreSQL server too (in CI,
CI=true, a missing server is an error rather than a skip).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

import migrations
from app.auth import create_api_key
from app.config import Settings
from app.db import get_engine, session_scope
from app.main import create_app

IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get("PHITUNE_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("PHITUNE_TEST_REDIS_URL")

if IN_CI and not (POSTGRES_URL and REDIS_URL):
    raise RuntimeError("CI=true needs PHITUNE_TEST_DATABASE_URL and PHITUNE_TEST_REDIS_URL (see .ci/run)")


def _database_backends() -> list[str]:
    return ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """An empty database on the PHITUNE_TEST_DATABASE_URL server, dropped afterwards."""
    assert POSTGRES_URL, "PHITUNE_TEST_DATABASE_URL is not set"
    server = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    name = f"phitune_test_{secrets.token_hex(4)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgresql_database() -> Iterator[str]:
    """A fresh PostgreSQL database migrated by Alembic for this test session."""
    with fresh_postgres_database() as url:
        migrations.upgrade(url)
        yield url


@pytest.fixture(scope="session")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'phitune.db'}"
    migrations.upgrade(url)
    return url


@pytest.fixture(params=_database_backends())
def database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_database")


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url="memory://",
        worker_token="test-worker-token",
        serving_token="test-serving-token",
        inference_url="http://127.0.0.1:9",  # nothing listens there: chat tests that pass validation get 503
        max_upload_bytes=1024 * 1024,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def make_key(database_url: str, tenant: str | None = None) -> str:
    with session_scope(database_url) as session:
        return create_api_key(session, tenant or f"tenant-{secrets.token_hex(4)}")


@pytest.fixture
def auth(database_url: str) -> dict[str, str]:
    """Authorization header of a fresh tenant."""
    return {"Authorization": f"Bearer {make_key(database_url)}"}


@pytest.fixture
def other_auth(database_url: str) -> dict[str, str]:
    """Authorization header of a second, unrelated tenant."""
    return {"Authorization": f"Bearer {make_key(database_url)}"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Phi-3, made once per test session (imports torch only when a test asks for it)."""
    from worker.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-phi3")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from worker.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def phi3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """microsoft/Phi-3-mini-4k-instruct's tokenizer files, rebuilt offline from tests/fixtures/phi3."""
    from tests.phi3_tokenizer import write_phi3_tokenizer

    return write_phi3_tokenizer(tmp_path_factory.mktemp("models") / "phi3-tokenizer")
