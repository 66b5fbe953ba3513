"""API keys with a lifecycle: the admin API over real HTTP, the `phitune keys` commands as a user runs them,
revocation and expiry answered 401 on the next request (through the key cache), and the admin key and
tenants' keys kept apart."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import text

import migrations
from app.auth import KeyCache, hash_token, issue_key
from app.config import Settings
from app.db import get_engine, session_scope
from app.main import create_app
from app.models import Tenant
from phitune.launch import REPO, phitune_command
from tests.conftest import POSTGRES_URL, fresh_postgres_database, make_key

ADMIN_KEY = "admin-" + "k" * 40
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def admin_settings(settings: Settings) -> Settings:
    # A long key cache: a revoked key must be refused at once anyway (evicted), not when the cache expires.
    return settings.model_copy(update={"admin_key": SecretStr(ADMIN_KEY), "api_key_cache_seconds": 60.0})


@pytest.fixture
def admin(admin_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(admin_settings)) as test_client:
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def create(client: TestClient, tenant: str, **fields) -> dict:
    response = client.post("/v1/admin/keys", json={"tenant": tenant, **fields}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def unique(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


# The admin API


def test_a_key_made_by_the_admin_api_is_shown_once_and_works(admin: TestClient) -> None:
    tenant = unique("acme")
    made = create(admin, tenant)
    key = made["key"]
    assert key.startswith("pt-") and len(key) >= 3 + 43  # 32 random bytes, base64url
    assert made["id"].startswith("key-") and made["prefix"] == key[:10]
    assert made["tenant"] == tenant and made["expires_at"] is None and made["revoked_at"] is None
    assert admin.get("/v1/files", headers=bearer(key)).status_code == 200

    listed = admin.get("/v1/admin/keys", params={"tenant": tenant}, headers=ADMIN).json()
    assert [item["id"] for item in listed["data"]] == [made["id"]]
    assert "key" not in listed["data"][0] and key not in json.dumps(listed)
    retrieved = admin.get(f"/v1/admin/keys/{made['id']}", headers=ADMIN).json()
    assert retrieved == {name: value for name, value in made.items() if name != "key"}
    tenants = admin.get("/v1/admin/tenants", params={"limit": 100}, headers=ADMIN).json()
    assert {"id": made["tenant_id"], "object": "tenant", "name": tenant} in [
        {name: t[name] for name in ("id", "object", "name")} for t in tenants["data"]
    ]

    # Only the hash is stored.
    with session_scope(admin.app.state.settings.resolved_database_url) as session:
        stored = session.execute(
            text("SELECT key_hash, prefix FROM api_keys WHERE id = :id"), {"id": made["id"]}
        ).one()
    assert tuple(stored) == (hash_token(key), key[:10])


def test_a_key_revoked_through_the_admin_api_is_refused_on_the_next_request(admin: TestClient) -> None:
    made = create(admin, unique("acme"))
    headers = bearer(made["key"])
    assert admin.get("/v1/fine_tuning/jobs", headers=headers).status_code == 200  # now in the key cache
    revoked = admin.post(f"/v1/admin/keys/{made['id']}/revoke", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    error = assert_error(admin.get("/v1/fine_tuning/jobs", headers=headers), 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    # Revoking again changes nothing; the tenant's other keys still work.
    again = admin.post(f"/v1/admin/keys/{made['id']}/revoke", headers=ADMIN).json()
    assert again["revoked_at"] == revoked.json()["revoked_at"]
    other = create(admin, made["tenant"])
    assert admin.get("/v1/fine_tuning/jobs", headers=bearer(other["key"])).status_code == 200
    listed = admin.get("/v1/admin/keys", params={"tenant": made["tenant"]}, headers=ADMIN).json()
    assert [(k["id"], k["revoked_at"] is not None) for k in listed["data"]] == [
        (other["id"], False),
        (made["id"], True),
    ]


def test_an_expired_key_is_refused_even_while_cached(admin: TestClient) -> None:
    made = create(admin, unique("acme"), expires_in=2)
    headers = bearer(made["key"])
    assert admin.get("/v1/files", headers=headers).status_code == 200  # cached for 60 s, expires before
    time.sleep(max(0.0, made["expires_at"] - time.time()) + 0.05)
    assert_error(admin.get("/v1/files", headers=headers), 401, code="invalid_api_key")
    assert admin.get(f"/v1/admin/keys/{made['id']}", headers=ADMIN).json()["revoked_at"] is None


def test_the_key_cache_forgets_a_revoked_key_and_a_lookup_that_raced_its_revocation() -> None:
    cache = KeyCache(60)
    tenant = Tenant(seq=1, id="tenant-1", name="one", created_at=0)
    cache.put("Bearer pt-a", tenant, key_id="key-a", generation=cache.generation)
    cache.put("Bearer pt-b", tenant, key_id="key-b", generation=cache.generation)
    before_revocation = cache.generation
    cache.evict("key-a")
    assert cache.get("Bearer pt-a") is None and cache.get("Bearer pt-b") is not None
    # A lookup that read the key before its revocation committed, and ends after the eviction.
    cache.put("Bearer pt-a", tenant, key_id="key-a", generation=before_revocation)
    assert cache.get("Bearer pt-a") is None
    cache.put("Bearer pt-c", tenant, key_id="key-c", expires_at=int(time.time()) - 1)
    assert cache.get("Bearer pt-c") is None


def test_a_key_past_its_expiry_in_the_database_is_refused(client: TestClient, database_url: str) -> None:
    with session_scope(database_url) as session:
        _, expired = issue_key(session, unique("acme"), expires_at=int(time.time()) - 1)
        _, valid = issue_key(session, unique("acme"), expires_at=int(time.time()) + 3600)
    assert_error(client.get("/v1/files", headers=bearer(expired)), 401, code="invalid_api_key")
    assert client.get("/v1/files", headers=bearer(valid)).status_code == 200


def test_the_admin_key_and_tenant_keys_are_kept_apart(admin: TestClient, database_url: str) -> None:
    tenant_key = bearer(make_key(database_url))
    for path in ("/v1/admin/keys", "/v1/admin/tenants", "/v1/admin/keys/key-1"):
        assert_error(admin.get(path, headers=tenant_key), 401, code="invalid_admin_key")
        assert_error(admin.get(path), 401, code="missing_api_key")
        assert_error(admin.get(path, headers=bearer(ADMIN_KEY + "x")), 401, code="invalid_admin_key")
    assert_error(admin.post("/v1/admin/keys", json={"tenant": "x"}, headers=tenant_key), 401)
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models"):
        assert_error(admin.get(path, headers=ADMIN), 401, code="invalid_api_key")
        assert admin.get(path, headers=tenant_key).status_code == 200


def test_without_an_admin_key_the_admin_api_is_off(client: TestClient, auth: dict[str, str]) -> None:
    assert client.app.state.settings.admin_key is None
    for headers in ({}, auth, ADMIN):
        assert_error(client.get("/v1/admin/keys", headers=headers), 401, code="admin_api_disabled")
        response = client.post("/v1/admin/keys", json={"tenant": "x"}, headers=headers)
        assert_error(response, 401, code="admin_api_disabled")


def test_an_admin_key_shorter_than_32_characters_is_refused_without_being_shown() -> None:
    with pytest.raises(ValueError, match="admin_key") as refused:
        Settings(admin_key="short-secret-1234")
    assert "short-secret-1234" not in str(refused.value)


def count_rows(database_url: str) -> tuple[int, int]:
    with get_engine(database_url).connect() as connection:
        return (
            connection.execute(text("SELECT count(*) FROM tenants")).scalar_one(),
            connection.execute(text("SELECT count(*) FROM api_keys")).scalar_one(),
        )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tenant": ""}, "tenant"),
        ({"tenant": " padded"}, "tenant"),
        ({"tenant": "nul\x00byte"}, "tenant"),
        ({"tenant": "surrogate\ud800"}, "tenant"),
        ({"tenant": "t" * 201}, "tenant"),
        ({"tenant": 7}, "tenant"),
        ({}, "tenant"),
        ({"tenant": "ok", "expires_at": 1}, "expires_at"),
        ({"tenant": "ok", "expires_at": 2**31}, "expires_at"),
        ({"tenant": "ok", "expires_at": 10**30}, "expires_at"),
        ({"tenant": "ok", "expires_at": "soon"}, "expires_at"),
        ({"tenant": "ok", "expires_in": 0}, "expires_in"),
        ({"tenant": "ok", "expires_in": -5}, "expires_in"),
        ({"tenant": "ok", "expires_in": 2**31 - 1}, "expires_in"),  # past 2038
        ({"tenant": "ok", "expires_in": 60, "expires_at": 2**31 - 1}, "expires_in"),
        ({"tenant": "ok", "role": "admin"}, "role"),
    ],
)
def test_bad_key_requests_are_400_naming_the_field_and_leave_no_row(
    admin: TestClient, database_url: str, body: dict, param: str
) -> None:
    before = count_rows(database_url)
    content = json.dumps(body).encode()  # a lone surrogate escaped, as a client would send it
    response = admin.post(
        "/v1/admin/keys", content=content, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert_error(response, 400, param=param)
    assert count_rows(database_url) == before


def test_admin_lists_page_and_refuse_bad_parameters(admin: TestClient) -> None:
    tenant = unique("paged")
    made = [create(admin, tenant)["id"] for _ in range(3)]
    first = admin.get("/v1/admin/keys", params={"tenant": tenant, "limit": 2}, headers=ADMIN).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [k["id"] for k in first["data"]] == made[::-1][:2] and first["last_id"] == made[1]
    rest = admin.get(
        "/v1/admin/keys", params={"tenant": tenant, "after": first["last_id"]}, headers=ADMIN
    ).json()
    assert [k["id"] for k in rest["data"]] == [made[0]] and rest["has_more"] is False
    assert admin.get("/v1/admin/keys", params={"tenant": unique("none")}, headers=ADMIN).json()["data"] == []

    for params, param in (
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"after": "key-missing"}, "after"),
        ({"after": "k" * 65}, "after"),
        ({"tenant": "t" * 201}, "tenant"),
    ):
        assert_error(admin.get("/v1/admin/keys", params=params, headers=ADMIN), 400, param=param)
    assert_error(admin.get("/v1/admin/tenants", params={"limit": 101}, headers=ADMIN), 400, param="limit")
    assert_error(admin.get("/v1/admin/tenants", params={"after": "tenant-x"}, headers=ADMIN), 400)
    missing = admin.get("/v1/admin/keys/key-missing", headers=ADMIN)
    assert_error(missing, 404, code="key_not_found", param="key_id")
    missing = admin.post("/v1/admin/keys/key-missing/revoke", headers=ADMIN)
    assert_error(missing, 404, code="key_not_found", param="key_id")


def test_the_admin_routes_declare_their_responses(admin: TestClient) -> None:
    paths = admin.get("/openapi.json").json()["paths"]
    revoke = paths["/v1/admin/keys/{key_id}/revoke"]["post"]["responses"]
    assert {"200", "401", "404"} <= set(revoke)
    created = paths["/v1/admin/keys"]["post"]["responses"]
    assert {"200", "400", "401"} <= set(created)
    limit = next(p for p in paths["/v1/admin/keys"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 100


# Keys made before revision 0006 get an id, and keep working


@pytest.fixture(params=["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


def test_the_migration_gives_existing_keys_an_id(empty_database_url: str, tmp_path: Path) -> None:
    migrations.upgrade(empty_database_url, "0005")
    with get_engine(empty_database_url).begin() as connection:
        connection.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('tenant-old', 'old', 1)"))
        for n in (1, 2):
            connection.execute(
                text(
                    "INSERT INTO api_keys (tenant_id, key_hash, prefix, created_at) "
                    "VALUES ('tenant-old', :hash, 'pt-old', 1)"
                ),
                {"hash": hash_token(f"pt-old-{n}")},
            )
    migrations.upgrade(empty_database_url)
    with get_engine(empty_database_url).connect() as connection:
        rows = connection.execute(text("SELECT id, expires_at FROM api_keys")).all()
    assert len({row.id for row in rows}) == 2 and all(row.id.startswith("key-") for row in rows)
    assert all(row.expires_at is None for row in rows)
    app = create_app(Settings(data_dir=tmp_path, database_url=empty_database_url, broker_url="memory://"))
    with TestClient(app) as client:
        assert client.get("/v1/files", headers=bearer("pt-old-1")).status_code == 200


# The `phitune keys` commands


def phitune(database_url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")} | {
        "PHITUNE_DATA_DIR": str(data_dir),
        "PHITUNE_DATABASE_URL": database_url,
    }
    return subprocess.run(
        phitune_command(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_the_keys_commands_create_list_and_revoke(settings: Settings, tmp_path: Path) -> None:
    url = settings.resolved_database_url
    tenant = unique("cli")
    created = phitune(url, tmp_path, "keys", "create", "--tenant", tenant, "--expires-in", "30d")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("pt-") and len(key) >= 46
    forever = phitune(url, tmp_path, "keys", "create", "--tenant", tenant, "--expires-at", "2037-01-31T12:00")
    assert forever.returncode == 0, forever.stderr

    listed = phitune(url, tmp_path, "keys", "list", "--tenant", tenant, "--json")
    assert listed.returncode == 0, listed.stderr
    keys = json.loads(listed.stdout)
    assert [k["prefix"] for k in keys][0] == key[:10] and len(keys) == 2
    assert abs(keys[0]["expires_at"] - (keys[0]["created_at"] + 30 * 86400)) <= 1
    assert keys[1]["expires_at"] == datetime(2037, 1, 31, 12, tzinfo=UTC).timestamp()  # no offset: UTC
    assert key not in listed.stdout and all(k["revoked_at"] is None for k in keys)
    table = phitune(url, tmp_path, "keys", "list")
    assert table.returncode == 0 and keys[0]["id"] in table.stdout and key not in table.stdout

    app = create_app(settings.model_copy(update={"api_key_cache_seconds": 0.0}))
    with TestClient(app) as client:
        assert client.get("/v1/files", headers=bearer(key)).status_code == 200
        revoked = phitune(url, tmp_path, "keys", "revoke", keys[0]["id"])
        assert revoked.returncode == 0 and "Revoked" in revoked.stdout, revoked.stderr
        assert_error(client.get("/v1/files", headers=bearer(key)), 401)
    again = phitune(url, tmp_path, "keys", "revoke", keys[0]["id"])
    assert again.returncode == 0 and "already revoked" in again.stdout
    after = json.loads(phitune(url, tmp_path, "keys", "list", "--tenant", tenant, "--json").stdout)
    assert after[0]["revoked_at"] is not None and after[1]["revoked_at"] is None


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (("revoke", "key-missing"), 1, "No API key with id 'key-missing'"),
        (("create", "--tenant", "t", "--expires-in", "3y"), 2, "expected a positive number and a unit"),
        (("create", "--tenant", "t", "--expires-at", "yesterday"), 2, "expected an ISO 8601 time"),
        (("create", "--tenant", "t", "--expires-at", "2020-01-01"), 1, "must be in the future"),
        (("create", "--tenant", "t", "--expires-in", "1d", "--expires-at", "2030-01-01"), 2, "not both"),
        (("create", "--tenant", " t"), 1, "printable characters"),
    ],
)
def test_the_keys_commands_refuse_bad_input_saying_why(
    settings: Settings, tmp_path: Path, args: tuple[str, ...], status: int, says: str
) -> None:
    before = count_rows(settings.resolved_database_url)
    refused = phitune(settings.resolved_database_url, tmp_path, "keys", *args)
    assert refused.returncode == status and says in refused.stderr, refused.stderr
    assert count_rows(settings.resolved_database_url) == before
