"""API keys: created by the CLI, stored hashed, checked on every /v1 request."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Unauthorized
from app.models import ApiKey, Tenant
from app.models.base import new_id

KEY_PREFIX = "pt-"


def hash_token(token: str) -> str:
    """Keys and attempt tokens are 256-bit random, so a plain SHA-256 is a safe way to store them."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_api_key(session: Session, tenant_name: str) -> str:
    """A new key for `tenant_name` (created if missing). Only the hash is stored."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("tenant"), name=tenant_name)
        session.add(tenant)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_token(key), prefix=key[:10]))
    return key


def tenant_for_key(session: Session, authorization: str | None) -> Tenant:
    """The tenant owning the bearer key in an Authorization header, or 401."""
    if not authorization:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
    row = session.execute(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_token(key.strip()), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is None:
        raise Unauthorized("Invalid API key.")
    return row
