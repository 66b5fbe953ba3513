"""/v1/admin: tenants and their API keys, for the admin key only (PHITUNE_ADMIN_KEY; unset: always 401)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.admin import service
from app.admin.schemas import ApiKeyCreate, ApiKeyList, ApiKeyObject, CreatedApiKey, TenantList
from app.db import after_commit
from app.deps import AdminOnly, SessionDep
from app.errors import error_responses
from app.openapi_parts import After, Limit

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[AdminOnly], responses=error_responses(401, 503)
)


@router.get("/tenants", response_model=TenantList, responses=error_responses(400))
def list_tenants(session: SessionDep, limit: Limit = 20, after: After = None) -> TenantList:
    """Every tenant, newest first."""
    return service.list_tenants(session, limit=limit, after=after)


@router.post("/keys", response_model=CreatedApiKey, responses=error_responses(400, 413))
def create_key(body: ApiKeyCreate, session: SessionDep) -> CreatedApiKey:
    """A new key for a tenant (created if missing). The key is in this response only."""
    row, key = service.create_key(
        session, body.tenant, expires_at=body.expires_at, expires_in=body.expires_in
    )
    return CreatedApiKey(**ApiKeyObject.from_row(row).model_dump(), key=key)


@router.get("/keys", response_model=ApiKeyList, responses=error_responses(400))
def list_keys(
    session: SessionDep,
    limit: Limit = 20,
    after: After = None,
    tenant: Annotated[str | None, Query(max_length=200, description="Only this tenant's keys.")] = None,
) -> ApiKeyList:
    """Keys, newest first, revoked and expired ones included; never the keys themselves."""
    return service.list_keys(session, tenant, limit=limit, after=after)


@router.get("/keys/{key_id}", response_model=ApiKeyObject, responses=error_responses(404))
def retrieve_key(key_id: str, session: SessionDep) -> ApiKeyObject:
    return ApiKeyObject.from_row(service.get_key(session, key_id))


@router.post("/keys/{key_id}/revoke", response_model=ApiKeyObject, responses=error_responses(404))
def revoke_key(key_id: str, request: Request, session: SessionDep) -> ApiKeyObject:
    """Revoke a key: its next request is a 401 on this API process, and on the others within
    PHITUNE_API_KEY_CACHE_SECONDS. Revoking a revoked key changes nothing."""
    key = service.revoke_key(session, key_id)
    after_commit(session, lambda: request.app.state.api_keys.evict(key_id))
    return ApiKeyObject.from_row(key)
