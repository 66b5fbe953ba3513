"""Shared FastAPI dependencies, as `Annotated` aliases so route signatures read like sentences."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Annotated, Any

from anyio import to_thread
from fastapi import Depends, Header, Request, Security
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.orm import Session

from app.auth import KeyCache, KeyOwner, check_admin_key, owner_of_key
from app.config import Settings
from app.db import async_session_scope, session_scope
from app.internal.service import Attempt, check_serving_token, check_worker_token, current_attempt
from app.models import Tenant
from app.openapi_parts import ADMIN_KEY, API_KEY
from app.rate_limit import RateLimiter
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
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(API_KEY)] = None,  # the document's security
) -> Tenant:
    """The key's tenant: from the app's KeyCache when the key was found valid moments ago, else from the
    database, in a unit of work of its own (in the threadpool). Not the request's: a route that reads
    outside a unit of work (app.db.read) then opens none at all. Then the key's rate (app.rate_limit): every
    tenant route is counted here, on the event loop, after the key was found valid (a bad key is a 401)."""
    settings: Settings = request.app.state.settings  # not SettingsDep: each dependency costs every request
    cache: KeyCache = request.app.state.api_keys
    tenant = await cache.tenant(
        authorization,
        lambda: to_thread.run_sync(_owner_of_key, settings.resolved_database_url, authorization),
    )
    limiter: RateLimiter = request.app.state.rate_limiter
    limiter.take(authorization)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


class TenantRoute(APIRoute):
    """A read route that pollers call: FastAPI solving its dependencies was ~30 % of its CPU. Its endpoint
    takes `str` path parameters, `request` and `tenant: CurrentTenant` and returns a Response; this route
    calls it with them itself (the tenant from `get_current_tenant`, as the dependency would give it). The
    endpoint's signature still makes the OpenAPI document, so it stays the one description of the route."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Callable[..., Awaitable[Response]] = self.endpoint
        dependant = self.dependant
        calls = [dependency.call for dependency in dependant.dependencies]
        path_names = [field.name for field in dependant.path_params]
        tenant_name = dependant.dependencies[0].name if calls == [get_current_tenant] else None
        if (
            not inspect.iscoroutinefunction(endpoint)
            or tenant_name is None
            or dependant.request_param_name != "request"
            or set(inspect.signature(endpoint).parameters) != {*path_names, "request", tenant_name}
            or any(field.field_info.annotation is not str for field in dependant.path_params)
            or dependant.query_params
            or dependant.header_params
            or dependant.cookie_params
            or dependant.body_params
        ):
            raise TypeError(
                f"{self.path}: a TenantRoute's endpoint takes str path parameters, request, tenant"
            )
        tenant_param: str = tenant_name

        async def handle(request: Request) -> Response:
            tenant = await get_current_tenant(request, request.headers.get("authorization"))
            given: dict[str, Any] = {name: request.path_params[name] for name in path_names}
            return await endpoint(**given, request=request, **{tenant_param: tenant})

        return handle


async def check_credentials(request: Request) -> None:
    """Check a /v1 request's credentials as its route's dependencies would (the admin key on the admin API,
    a tenant's key elsewhere): for errors found before they ran (app.errors.install_error_handlers)."""
    path, authorization = request.url.path, request.headers.get("authorization")
    settings: Settings = request.app.state.settings
    if path.startswith("/v1/admin/") or path == "/v1/admin":
        check_admin_key(settings, authorization)
    elif path.startswith("/v1/"):
        await get_current_tenant(request, authorization)


def _owner_of_key(database_url: str, authorization: str | None) -> KeyOwner:
    with session_scope(database_url) as session:
        return owner_of_key(session, authorization)


async def require_admin(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_KEY)] = None,  # the document's security
) -> None:
    check_admin_key(settings, authorization)


# On the admin API's routes: the admin key from configuration, never a tenant's key.
AdminOnly = Depends(require_admin)


def get_current_attempt(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Attempt:
    return current_attempt(session, settings, job_id, authorization)


# A worker's attempt of the job in the path, proven by the attempt token (internal routes).
CurrentAttempt = Annotated[Attempt, Depends(get_current_attempt)]


def require_worker_token(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    check_worker_token(settings, authorization)


# The claim, the one route the shared worker token opens.
WorkerOnly = Depends(require_worker_token)


def require_serving_token(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    check_serving_token(settings, authorization)


# The adapter download, the one route the inference server's serving token opens.
ServingOnly = Depends(require_serving_token)
