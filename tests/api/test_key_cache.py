"""The API key cache: a valid key is trusted for `api_key_cache_seconds`, and a revoked key stops working
once that time has passed (at once with 0)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.auth import KeyCache, hash_token
from app.config import Settings
from app.db import session_scope
from app.main import create_app
from app.models import ApiKey, Tenant
from tests.conftest import make_key


def revoke(database_url: str, key: str) -> None:
    with session_scope(database_url) as session:
        session.execute(update(ApiKey).where(ApiKey.key_hash == hash_token(key)).values(revoked_at=1))


@pytest.mark.parametrize("seconds", [0.0, 0.3])
def test_a_revoked_key_stops_working_once_the_cache_expires(settings: Settings, seconds: float) -> None:
    key = make_key(settings.resolved_database_url)
    headers = {"Authorization": f"Bearer {key}"}
    app = create_app(settings.model_copy(update={"api_key_cache_seconds": seconds}))
    with TestClient(app) as client:
        assert client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 200
        revoke(settings.resolved_database_url, key)
        if seconds:
            assert client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 200  # still cached
            time.sleep(seconds)
        response = client.get("/v1/fine_tuning/jobs", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_only_valid_keys_are_cached_and_headers_are_still_checked() -> None:
    cache = KeyCache(60)
    tenant = Tenant(seq=1, id="tenant-1", name="one", created_at=0)
    assert cache.get("Bearer pt-unknown") is None
    cache.put("Bearer pt-known", tenant)
    cached = cache.get("Bearer  pt-known ")
    assert cached is not None and cached.id == "tenant-1" and cached is not tenant
    for malformed in (None, "", "Basic pt-known", "Bearer "):
        with pytest.raises(Exception, match="API key|Authorization"):
            cache.get(malformed)
