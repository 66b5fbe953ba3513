"""API keys: created by the CLI, stored hashed, checked on every /v1 request."""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy.orm import Session

from app.errors import Unauthorized
from app.models import Tenant
from app.repositories import tenants

KEY_PREFIX = "pt-"


def hash_token(token: str) -> str:
    """Keys and attempt tokens are 256-bit random, so a plain SHA-256 is a safe way to store them."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_key(session: Session, tenant_name: str) -> str:
    """A new key for `tenant_name` (created if missing). Only the hash is stored."""
    tenant = tenants.tenant_named(session, tenant_name) or tenants.add_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    tenants.add_key(session, tenant, hash_token(key), key[:10])
    return key


def bearer_key(authorization: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header, or 401."""
    if not authorization:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
    return key.strip()


def tenant_for_key(session: Session, authorization: str | None) -> Tenant:
    """The tenant owning the bearer key in an Authorization header, or 401."""
    tenant = tenants.tenant_of_key(session, hash_token(bearer_key(authorization)))
    if tenant is None:
        raise Unauthorized("Invalid API key.")
    return tenant


class KeyCache:
    """Keys recently found valid → their tenant, for `seconds`: a client polling a job does not pay a
    database query (and a threadpool hop) for its key on every request. A key revoked in the database
    stops working within `seconds` (0: checked on every request). Only valid keys are kept."""

    MAX_KEYS = 10_000

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._tenants: dict[str, tuple[float, Tenant]] = {}

    def get(self, authorization: str | None) -> Tenant | None:
        """The cached tenant of the header's key; 401 for a missing or malformed header; None if unknown."""
        key = bearer_key(authorization)
        if self.seconds <= 0 or (entry := self._tenants.get(key)) is None:
            return None
        if time.monotonic() >= entry[0]:
            self._tenants.pop(key, None)
            return None
        return entry[1]

    def put(self, authorization: str | None, tenant: Tenant) -> None:
        if self.seconds <= 0:
            return
        if len(self._tenants) >= self.MAX_KEYS:
            self._tenants.clear()
        # A detached copy: the cached object is shared by requests, never by their sessions.
        copy = Tenant(seq=tenant.seq, id=tenant.id, name=tenant.name, created_at=tenant.created_at)
        self._tenants[bearer_key(authorization)] = (time.monotonic() + self.seconds, copy)
