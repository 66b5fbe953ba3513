"""Request bodies of the admin API and the objects it answers with, each built from its row by `from_row`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.models import ApiKey, Tenant
from app.pagination import ListPage

# The columns are 32-bit integers on PostgreSQL: the latest time they hold is 2038-01-19T03:14:07Z.
MAX_TIMESTAMP = 2**31 - 1
MAX_TENANT_NAME = 200  # tenants.name


class TenantObject(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created_at: int

    @classmethod
    def from_row(cls, row: Tenant) -> TenantObject:
        return cls(id=row.id, name=row.name, created_at=row.created_at)


class TenantList(ListPage[TenantObject]):
    pass


class ApiKeyObject(BaseModel):
    """An API key as listed: never the key itself, which only its creation shows."""

    id: str = Field(description="`key-…`: names the key to revoke it.")
    object: Literal["api_key"] = "api_key"
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    tenant_id: str
    tenant: str = Field(description="The tenant's name.")
    created_at: int
    expires_at: int | None = Field(description="When the key stops working; null: never.")
    revoked_at: int | None = Field(description="When the key was revoked; null: it was not.")

    @classmethod
    def from_row(cls, row: ApiKey) -> ApiKeyObject:
        return cls(
            id=row.id,
            prefix=row.prefix,
            tenant_id=row.tenant_id,
            tenant=row.tenant.name,
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
        )


class CreatedApiKey(ApiKeyObject):
    key: str = Field(description="The API key: shown in this response only, so store it now.")


class ApiKeyList(ListPage[ApiKeyObject]):
    pass


class ApiKeyCreate(BaseModel):
    """`POST /v1/admin/keys`: a key for a tenant (created if missing), valid forever or until its expiry."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(
        min_length=1,
        max_length=MAX_TENANT_NAME,
        description="The tenant's name: printable characters, without leading or trailing spaces.",
    )
    expires_at: int | None = Field(
        None, gt=0, le=MAX_TIMESTAMP, description="Unix time when the key stops working: in the future."
    )
    expires_in: int | None = Field(
        None, gt=0, le=MAX_TIMESTAMP, description="Seconds from now until the key stops working."
    )
