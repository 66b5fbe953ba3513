"""The API key cache: a valid key is trusted for `api_key_cache_seconds`, and a revoked key stops working
once that time has passed (at once with 0)."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.auth import KeyCache, KeyOwner, hash_token
from app.config import Settings
from app.db import session_scope
from app.errors import Unauthorized
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


def test_requests_that_miss_the_cache_together_share_one_database_lookup() -> None:
    """When a polled key's entry lapses, the 64 pollers asking at that moment make one lookup, not 64; a
    failed lookup fails them all (and is not cached); a waiter cancelled by its client cancels no one else."""
    cache = KeyCache(60)
    tenant = Tenant(seq=1, id="tenant-1", name="one", created_at=0)
    lookups = 0

    async def look_up(fails: bool = False) -> KeyOwner:
        nonlocal lookups
        lookups += 1
        await asyncio.sleep(0.05)
        if fails:
            raise Unauthorized("Invalid API key: unknown, revoked or expired.")
        return KeyOwner(tenant, "key-1", None)

    async def scenario() -> None:
        nonlocal lookups
        answers = await asyncio.gather(*(cache.tenant("Bearer pt-a", look_up) for _ in range(64)))
        assert lookups == 1 and {answer.id for answer in answers} == {"tenant-1"}
        assert cache.get("Bearer pt-a") is not None  # and now cached

        lookups = 0
        refused = await asyncio.gather(
            *(cache.tenant("Bearer pt-b", lambda: look_up(fails=True)) for _ in range(8)),
            return_exceptions=True,
        )
        assert lookups == 1 and all(isinstance(answer, Unauthorized) for answer in refused)
        assert cache.get("Bearer pt-b") is None

        lookups = 0
        first = asyncio.ensure_future(cache.tenant("Bearer pt-c", look_up))
        second = asyncio.ensure_future(cache.tenant("Bearer pt-c", look_up))
        await asyncio.sleep(0.01)
        first.cancel()
        assert (await second).id == "tenant-1" and lookups == 1

    asyncio.run(scenario())


def test_with_the_cache_off_every_request_looks_its_key_up() -> None:
    cache = KeyCache(0)
    tenant = Tenant(seq=1, id="tenant-1", name="one", created_at=0)
    lookups = 0

    async def look_up() -> KeyOwner:
        nonlocal lookups
        lookups += 1
        await asyncio.sleep(0.01)
        return KeyOwner(tenant)

    async def scenario() -> None:
        await asyncio.gather(*(cache.tenant("Bearer pt-a", look_up) for _ in range(4)))

    asyncio.run(scenario())
    assert lookups == 4


def test_a_polled_entry_is_renewed_before_it_lapses_and_dropped_once_its_key_is_revoked() -> None:
    """In the last quarter of its time an entry answers at once and one lookup renews it meanwhile: pollers
    never wait at its deadline. A renewal that finds the key revoked drops the entry."""
    cache = KeyCache(2.0)
    tenant = Tenant(seq=1, id="tenant-1", name="one", created_at=0)
    revoked = False
    lookups = finished = 0

    async def look_up() -> KeyOwner:
        nonlocal lookups, finished
        lookups += 1
        await asyncio.sleep(0.05)
        finished += 1
        if revoked:
            raise Unauthorized("Invalid API key: unknown, revoked or expired.")
        return KeyOwner(tenant, "key-1", None)

    async def scenario() -> None:
        nonlocal revoked
        await cache.tenant("Bearer pt-a", look_up)
        assert lookups == 1
        await asyncio.sleep(1.7)  # into the last quarter
        assert (await cache.tenant("Bearer pt-a", look_up)).id == "tenant-1"
        assert finished == 1  # answered before any new lookup ended
        await asyncio.sleep(0.5)  # past the first deadline: the renewed entry answers
        assert lookups == finished == 2 and cache.get("Bearer pt-a") is not None

        revoked = True
        await asyncio.sleep(1.3)
        await cache.tenant("Bearer pt-a", look_up)  # cached still; its renewal finds the key revoked
        await asyncio.sleep(0.2)
        assert lookups == 3 and cache.get("Bearer pt-a") is None

    asyncio.run(scenario())


def test_a_request_after_a_revocation_does_not_join_a_lookup_that_began_before_it() -> None:
    """Request 1 misses and its read finds the key valid; the key is revoked (evict, as the admin API does
    after its commit); request 2 arrives while that read is still in flight: it reads again and is refused."""
    cache = KeyCache(60)
    tenant = Tenant(seq=1, id="tenant-1", name="one", created_at=0)
    revoked = False

    async def look_up() -> KeyOwner:
        valid = not revoked  # what the database says when the read runs
        await asyncio.sleep(0.05)
        if not valid:
            raise Unauthorized("Invalid API key: unknown, revoked or expired.")
        return KeyOwner(tenant, "key-1", None)

    async def scenario() -> None:
        nonlocal revoked
        first = asyncio.ensure_future(cache.tenant("Bearer pt-a", look_up))
        await asyncio.sleep(0.01)  # its read has run: the key was valid then
        revoked = True
        cache.evict("key-1")
        with pytest.raises(Unauthorized):
            await cache.tenant("Bearer pt-a", look_up)
        assert (await first).id == "tenant-1"  # it arrived before the revocation
        assert cache.get("Bearer pt-a") is None  # and its answer is not cached

    asyncio.run(scenario())
