"""Shared FastAPI dependencies, as `Annotated` aliases so route signatures read like sentences."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from anyio import to_thread
from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.auth import KeyCache, tenant_for_key
from app.config import Settings
from app.db import async_session_scope
from app.internal.service import Attempt, check_worker_token, current_attempt
from app.models import Tenant
from app.storage import Storage


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """The request's unit of work, committed when the route function returns. Async, as are the other
    dependencies that do no I/O, so that they do not each hop to the threadpool."""
    async with async_session_scope(settings.resolved_database_url) as session:
        yield session


# scope="function": the commit runs when the route returns, before the response is sent, so a client never
# sees a 200 for a write that is not yet (or never) committed; a failed commit becomes the error response.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


StorageDep = Annotated[Storage, Depends(get_storage)]


async def get_current_tenant(
    request: Request, session: SessionDep, authorization: Annotated[str | None, Header()] = None
) -> Tenant:
    """The key's tenant: from the app's KeyCache when the key was found valid moments ago, else from the
    database (in the threadpool)."""
    cache: KeyCache = request.app.state.api_keys
    if (tenant := cache.get(authorization)) is None:
        tenant = await to_thread.run_sync(tenant_for_key, session, authorization)
        cache.put(authorization, tenant)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


def get_current_attempt(
    job_id: str, session: SessionDep, authorization: Annotated[str | None, Header()] = None
) -> Attempt:
    return current_attempt(session, job_id, authorization)


# A worker's attempt of the job in the path, proven by the attempt token (internal routes).
CurrentAttempt = Annotated[Attempt, Depends(get_current_attempt)]


def require_worker_token(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    check_worker_token(settings, authorization)


# On routes only workers may call with the shared worker token: claim, adapter download.
WorkerOnly = Depends(require_worker_token)
