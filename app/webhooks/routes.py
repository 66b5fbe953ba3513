"""/v1/webhooks: register, list, read and delete endpoints, and read their delivery log."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import CurrentTenant, SessionDep, SettingsDep
from app.errors import error_responses
from app.openapi_parts import After, Limit
from app.webhooks import service
from app.webhooks.schemas import (
    CreatedWebhook,
    WebhookCreate,
    WebhookDeleted,
    WebhookDeliveryList,
    WebhookList,
    WebhookObject,
)

router = APIRouter(prefix="/webhooks", tags=["webhooks"], responses=error_responses(401, 429, 503))


@router.post("", response_model=CreatedWebhook, responses=error_responses(400, 413))
def create_webhook(
    body: WebhookCreate, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep
) -> CreatedWebhook:
    """Register an endpoint for job events. Its signing secret is in this response only."""
    row = service.create_webhook(session, tenant.id, body, allow_private=settings.webhook_allow_private_urls)
    return CreatedWebhook(**WebhookObject.from_row(row).model_dump(), secret=row.secret)


@router.get("", response_model=WebhookList, responses=error_responses(400))
def list_webhooks(
    tenant: CurrentTenant, session: SessionDep, limit: Limit = 20, after: After = None
) -> WebhookList:
    """The tenant's endpoints, newest first."""
    return service.list_webhooks(session, tenant.id, limit=limit, after=after)


@router.get("/{webhook_id}", response_model=WebhookObject, responses=error_responses(404))
def retrieve_webhook(webhook_id: str, tenant: CurrentTenant, session: SessionDep) -> WebhookObject:
    return WebhookObject.from_row(service.get_webhook(session, tenant.id, webhook_id))


@router.delete("/{webhook_id}", response_model=WebhookDeleted, responses=error_responses(404))
def delete_webhook(webhook_id: str, tenant: CurrentTenant, session: SessionDep) -> WebhookDeleted:
    """Delete an endpoint; deliveries still pending for it are never sent."""
    return WebhookDeleted(id=service.delete_webhook(session, tenant.id, webhook_id))


@router.get(
    "/{webhook_id}/deliveries", response_model=WebhookDeliveryList, responses=error_responses(400, 404)
)
def list_deliveries(
    webhook_id: str, tenant: CurrentTenant, session: SessionDep, limit: Limit = 20, after: After = None
) -> WebhookDeliveryList:
    """The endpoint's deliveries, newest first: status, attempts, the last answer or error."""
    return service.list_deliveries(session, tenant.id, webhook_id, limit=limit, after=after)
