"""Tenants and their API keys (stored hashed)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Row, Select, bindparam, or_, select, update
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


def tenants_query() -> Select:
    return select(Tenant)


def add_key(
    session: Session, tenant: Tenant, key_hash: str, prefix: str, *, expires_at: int | None = None
) -> ApiKey:
    key = ApiKey(
        id=new_id("key"), tenant_id=tenant.id, key_hash=key_hash, prefix=prefix, expires_at=expires_at
    )
    session.add(key)
    session.flush()
    return key


def key_by_id(session: Session, key_id: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.id == key_id))


def keys_query(tenant_name: str | None = None) -> Select:
    """All keys (their tenant loaded with them), or those of the tenant named `tenant_name`."""
    query = select(ApiKey)
    if tenant_name is not None:
        query = query.where(ApiKey.tenant_id.in_(select(Tenant.id).where(Tenant.name == tenant_name)))
    return query


def all_keys(session: Session, tenant_name: str | None = None) -> Sequence[ApiKey]:
    """Every key (of one tenant), oldest first: for the CLI, which lists them whole."""
    return session.scalars(keys_query(tenant_name).order_by(ApiKey.seq)).all()


def revoke(key: ApiKey, at: int) -> None:
    """Revoke `key` at `at`; a key revoked before keeps its first revocation time."""
    if key.revoked_at is None:
        key.revoked_at = at


# Built once: every /v1 request whose key is not cached runs it, and building the statement cost more than
# executing it. Only the key's columns that the cache needs come along with the tenant.
_TENANT_OF_KEY = (
    select(Tenant, ApiKey.id, ApiKey.expires_at)
    .join(ApiKey, ApiKey.tenant_id == Tenant.id)
    .where(
        ApiKey.key_hash == bindparam("key_hash"),
        ApiKey.revoked_at.is_(None),
        or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > bindparam("now")),
    )
)


def tenant_of_key(session: Session, key_hash: str, now: int) -> Row[Tenant, str, int | None] | None:
    """(tenant, key id, expiry) of the key with this hash, if it is neither revoked nor expired at `now`."""
    return session.execute(_TENANT_OF_KEY, {"key_hash": key_hash, "now": now}).one_or_none()


def lock(session: Session, tenant_id: str) -> None:
    """Hold the tenant until the unit of work ends, so that concurrent requests checking one of its limits
    (count, then insert) do so one at a time. An UPDATE that changes nothing: on PostgreSQL it locks the
    row (READ COMMITTED: the next holder's count, a new statement, sees what this one committed), on SQLite
    it takes the database's write lock, where a SELECT ... FOR UPDATE would take nothing."""
    session.execute(
        update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name),
        execution_options={"synchronize_session": False},
    )
