"""API keys: made by the CLI or the admin API, stored hashed, checked on every /v1 request; the admin key.

A key is `pt-` and 43 characters of `secrets.token_urlsafe(32)` (256 random bits). Only its SHA-256 and its
first 10 characters (`prefix`, to tell keys apart in lists) are stored; the key itself is shown once, when it
is made, and never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Unauthorized
from app.models import ApiKey, Tenant
from app.repositories import tenants

KEY_PREFIX = "pt-"
SHOWN_PREFIX_CHARS = 10  # `pt-` and 7 random characters


def hash_token(token: str) -> str:
    """Keys and attempt tokens are 256-bit random, so a plain SHA-256 is a safe way to store them (no salt
    or slow hash is needed: there is no dictionary of likely keys to try)."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue_key(session: Session, tenant_name: str, *, expires_at: int | None = None) -> tuple[ApiKey, str]:
    """A new key for `tenant_name` (created if missing): its row, and the key, which only this call sees."""
    tenant = tenants.tenant_named(session, tenant_name) or tenants.add_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = tenants.add_key(session, tenant, hash_token(key), key[:SHOWN_PREFIX_CHARS], expires_at=expires_at)
    return row, key


def create_api_key(session: Session, tenant_name: str) -> str:
    """A new key, without expiry, for `tenant_name` (created if missing). Only the hash is stored."""
    return issue_key(session, tenant_name)[1]


def bearer_key(authorization: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header, or 401."""
    if not authorization:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
    return key.strip()


@dataclass(frozen=True)
class KeyOwner:
    """What a valid key stands for: its tenant, and the key's id and expiry (for the cache)."""

    tenant: Tenant
    key_id: str | None = None
    expires_at: int | None = None


def owner_of_key(session: Session, authorization: str | None) -> KeyOwner:
    """The tenant owning the bearer key in an Authorization header, or 401 when the key is unknown, revoked or
    expired.

    The key is found by its SHA-256 in an index, which is not a constant-time comparison, and need not be:
    what the lookup's timing could reveal is how the hash of the presented key compares with stored hashes,
    and no one can choose a key whose hash comes closer to another's, so it tells nothing about a valid key.
    """
    found = tenants.tenant_of_key(session, hash_token(bearer_key(authorization)), int(time.time()))
    if found is None:
        raise Unauthorized("Invalid API key: unknown, revoked or expired.")
    tenant, key_id, expires_at = found
    return KeyOwner(tenant, key_id, expires_at)


def tenant_for_key(session: Session, authorization: str | None) -> Tenant:
    """The tenant owning the bearer key in an Authorization header, or 401."""
    return owner_of_key(session, authorization).tenant


def check_admin_key(settings: Settings, authorization: str | None) -> None:
    """401 unless the header carries the configured admin key (compared in constant time); always 401 while
    no admin key is configured: the admin API is off. A tenant's key is never an admin key."""
    if settings.admin_key is None:
        raise Unauthorized(
            "The admin API is off: set PHITUNE_ADMIN_KEY to turn it on.", code="admin_api_disabled"
        )
    presented = bearer_key(authorization).encode()
    if not hmac.compare_digest(presented, settings.admin_key.get_secret_value().encode()):
        raise Unauthorized("Invalid admin key.", code="invalid_admin_key")


class KeyCache:
    """Keys recently found valid → their tenant, for `seconds`: a client polling a job does not pay a
    database query (and a threadpool hop) for its key on every request. A key revoked in another process
    stops working here within `seconds` (0: checked on every request); one revoked through this process's
    admin API at once (`evict`). An entry never outlives its key's expiry. Only valid keys are kept, by
    their SHA-256, so the cache holds no key and its lookups compare hashes, as the database's do."""

    MAX_KEYS = 10_000
    REFRESH_AHEAD = 0.25  # of `seconds`

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # key hash → (monotonic deadline, wall-clock expiry of the key, key id, tenant)
        self._entries: dict[str, tuple[float, float, str | None, Tenant]] = {}
        self._evictions = 0
        self._lookups: dict[str, asyncio.Future[KeyOwner]] = {}  # key hash → the database lookup in flight
        # `evict` runs on a worker thread (after its commit), `put` on the event loop: the lock makes a put's
        # generation check and its insert one step, so an eviction never falls between them.
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """Read before a database lookup and given back to `put`: a lookup that raced an eviction (it may have
        read the key before its revocation committed) is then not cached."""
        return self._evictions

    def get(self, authorization: str | None) -> Tenant | None:
        """The cached tenant of the header's key; 401 for a missing or malformed header; None if unknown."""
        cached = self._cached(hash_token(bearer_key(authorization)))
        return None if cached is None else cached[0]

    def _cached(self, key_hash: str) -> tuple[Tenant, float] | None:
        """The tenant of a live entry and the entry's deadline; a lapsed entry is dropped."""
        if self.seconds <= 0 or (entry := self._entries.get(key_hash)) is None:
            return None
        deadline, expires_at, _, tenant = entry
        if time.monotonic() >= deadline or time.time() >= expires_at:
            self._entries.pop(key_hash, None)
            return None
        return tenant, deadline

    async def tenant(self, authorization: str | None, look_up: Callable[[], Awaitable[KeyOwner]]) -> Tenant:
        """The tenant of the header's key: cached, else from `look_up`, run once for all the requests that
        ask meanwhile (64 pollers missing together make one database read, not 64 threads queueing for the
        pool and the GIL). An entry in the last REFRESH_AHEAD of its time is answered from the cache while
        one lookup renews it in the background, so a polled key's entry never lapses under its pollers (it
        did every `seconds`, stalling each of them ~25 ms); a key found revoked by that lookup is dropped at
        once, so it still stops working within `seconds`."""
        key_hash = hash_token(bearer_key(authorization))  # a missing or malformed header: 401 here
        if self.seconds <= 0:
            return (await look_up()).tenant  # every request checked: share no lookup either
        if (cached := self._cached(key_hash)) is not None:
            tenant, deadline = cached
            if time.monotonic() >= deadline - self.seconds * self.REFRESH_AHEAD:
                self._lookup(key_hash, authorization, look_up)  # renewed meanwhile; nobody waits for it
            return tenant
        # Shielded: a waiter whose client went away must not cancel the lookup the others wait for.
        return (await asyncio.shield(self._lookup(key_hash, authorization, look_up))).tenant

    def _lookup(
        self, key_hash: str, authorization: str | None, look_up: Callable[[], Awaitable[KeyOwner]]
    ) -> asyncio.Future[KeyOwner]:
        """The lookup of this key in flight, started if there is none."""
        if (lookup := self._lookups.get(key_hash)) is None:
            lookup = self._lookups[key_hash] = asyncio.ensure_future(self._look_up(authorization, look_up))
            lookup.add_done_callback(lambda done: self._looked_up(key_hash, done))
        return lookup

    def _looked_up(self, key_hash: str, lookup: asyncio.Future[KeyOwner]) -> None:
        if self._lookups.get(key_hash) is lookup:  # not a newer one, started after an eviction
            del self._lookups[key_hash]
        if not lookup.cancelled() and isinstance(lookup.exception(), Unauthorized):
            with self._lock:  # revoked or expired since it was cached: its next request is a 401
                self._entries.pop(key_hash, None)

    async def _look_up(
        self, authorization: str | None, look_up: Callable[[], Awaitable[KeyOwner]]
    ) -> KeyOwner:
        generation = self.generation
        owner = await look_up()
        self.put(
            authorization,
            owner.tenant,
            key_id=owner.key_id,
            expires_at=owner.expires_at,
            generation=generation,
        )
        return owner

    def put(
        self,
        authorization: str | None,
        tenant: Tenant,
        *,
        key_id: str | None = None,
        expires_at: int | None = None,
        generation: int | None = None,
    ) -> None:
        if self.seconds <= 0:
            return
        # A detached copy: the cached object is shared by requests, never by their sessions.
        copy = Tenant(seq=tenant.seq, id=tenant.id, name=tenant.name, created_at=tenant.created_at)
        expiry = float("inf") if expires_at is None else float(expires_at)
        entry = (time.monotonic() + self.seconds, expiry, key_id, copy)
        key_hash = hash_token(bearer_key(authorization))
        with self._lock:
            if generation is not None and generation != self._evictions:
                return
            if len(self._entries) >= self.MAX_KEYS:
                self._entries.clear()
            self._entries[key_hash] = entry

    def evict(self, key_id: str) -> None:
        """Forget the key with this id (revoked): its next request is checked against the database, not
        answered by a lookup that began before the revocation. All lookups in flight are forgotten: they are
        keyed by the key's hash, which the id does not give, and a forgotten one only costs a new read."""
        with self._lock:
            self._evictions += 1
            self._lookups.clear()
            # list(): one copy, made without yielding the GIL, as `get` may drop an expired entry meanwhile.
            for key_hash, entry in list(self._entries.items()):
                if entry[2] == key_id:
                    self._entries.pop(key_hash, None)
