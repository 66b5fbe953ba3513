"""Tenants and their API keys for the admin API and the `phitune keys` commands: create, list, revoke."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from app.admin.schemas import MAX_TENANT_NAME, MAX_TIMESTAMP, ApiKeyList, TenantList
from app.auth import issue_key
from app.errors import InvalidRequest, NotFound
from app.models import ApiKey
from app.models.base import now
from app.pagination import paginate
from app.repositories import tenants


def check_tenant_name(name: str) -> str:
    """400 for a name that could not be told apart from another when listed, or be typed back."""
    if not 1 <= len(name) <= MAX_TENANT_NAME or not name.isprintable() or name != name.strip():
        raise InvalidRequest(
            f"A tenant name is 1 to {MAX_TENANT_NAME} printable characters without leading or trailing "
            "spaces.",
            param="tenant",
            code="invalid_value",
        )
    return name


def expiry(expires_at: int | None, expires_in: int | None, at: int) -> int | None:
    """The unix time a key made at `at` expires (None: never), from one of an absolute time or a duration."""
    if expires_at is not None and expires_in is not None:
        raise InvalidRequest(
            "Give expires_at or expires_in, not both.", param="expires_in", code="invalid_value"
        )
    if expires_in is not None:
        expires_at, param = at + expires_in, "expires_in"
    else:
        param = "expires_at"
    if expires_at is not None and not at < expires_at <= MAX_TIMESTAMP:
        raise InvalidRequest(
            f"A key's expiry must be in the future and at most {MAX_TIMESTAMP} (2038-01-19T03:14:07Z).",
            param=param,
            code="invalid_value",
        )
    return expires_at


def create_key(
    session: Session, tenant_name: str, *, expires_at: int | None = None, expires_in: int | None = None
) -> tuple[ApiKey, str]:
    """A new key for the tenant named `tenant_name` (created if missing): its row, and the key, shown once."""
    expires = expiry(expires_at, expires_in, now())
    return issue_key(session, check_tenant_name(tenant_name), expires_at=expires)


def list_keys(session: Session, tenant_name: str | None, *, limit: int, after: str | None) -> ApiKeyList:
    """One page of the keys (of one tenant), newest first."""
    return paginate(
        session, tenants.keys_query(tenant_name), limit=limit, after=after, newest_first=True, into=ApiKeyList
    )


def all_keys(session: Session, tenant_name: str | None = None) -> Sequence[ApiKey]:
    return tenants.all_keys(session, tenant_name)


def list_tenants(session: Session, *, limit: int, after: str | None) -> TenantList:
    """One page of the tenants, newest first."""
    return paginate(
        session, tenants.tenants_query(), limit=limit, after=after, newest_first=True, into=TenantList
    )


def get_key(session: Session, key_id: str) -> ApiKey:
    key = tenants.key_by_id(session, key_id)
    if key is None:
        raise NotFound(f"No API key with id '{key_id}'.", param="key_id", code="key_not_found")
    return key


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key for good; revoking a revoked key changes nothing."""
    key = get_key(session, key_id)
    tenants.revoke(key, now())
    return key
