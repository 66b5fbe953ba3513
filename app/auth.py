"""API keys: created by the CLI, stored hashed, checked on every /v1 request."""

from __future__ import annotations

import hashlib
import secrets

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


def tenant_for_key(session: Session, authorization: str | None) -> Tenant:
    """The tenant owning the bearer key in an Authorization header, or 401."""
    if not authorization:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
    tenant = tenants.tenant_of_key(session, hash_token(key.strip()))
    if tenant is None:
        raise Unauthorized("Invalid API key.")
    return tenant
