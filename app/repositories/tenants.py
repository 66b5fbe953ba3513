"""Tenants and their API keys (stored hashed)."""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from app.models import ApiKey, Tenant
from app.models.base import new_id


def tenant_named(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def add_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(id=new_id("tenant"), name=name)
    session.add(tenant)
    session.flush()
    return tenant


def add_key(session: Session, tenant: Tenant, key_hash: str, prefix: str) -> None:
    session.add(ApiKey(tenant_id=tenant.id, key_hash=key_hash, prefix=prefix))


# Built once: every /v1 request runs it, and building the statement cost more than executing it.
_TENANT_OF_KEY = (
    select(Tenant)
    .join(ApiKey, ApiKey.tenant_id == Tenant.id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)


def tenant_of_key(session: Session, key_hash: str) -> Tenant | None:
    """The tenant owning the unrevoked key with this hash."""
    return session.execute(_TENANT_OF_KEY, {"key_hash": key_hash}).scalar_one_or_none()
