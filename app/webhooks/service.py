"""Webhook endpoints: register (the URL checked by app.webhooks.url_guard), list, read, delete, and the
log of their deliveries."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.errors import InvalidRequest, NotFound
from app.limits import MAX_WEBHOOKS_PER_TENANT
from app.models import WebhookEndpoint
from app.models.base import new_id
from app.pagination import paginate
from app.repositories import tenants, webhooks
from app.webhooks import signing, url_guard
from app.webhooks.schemas import WebhookCreate, WebhookDeliveryList, WebhookList


def create_webhook(
    session: Session, tenant_id: str, request: WebhookCreate, *, allow_private: bool
) -> WebhookEndpoint:
    """Store an endpoint with a new secret. A URL it may not use is a 400 naming `url`; a tenant with
    MAX_WEBHOOKS_PER_TENANT endpoints already, a 400 too (the tenant locked first, so that concurrent
    creates count one after another)."""
    try:
        url_guard.check(request.url, allow_private=allow_private)
    except url_guard.UrlRefused as refused:
        raise InvalidRequest(f"Webhook URL refused: {refused}", param="url", code="invalid_url") from None
    tenants.lock(session, tenant_id)
    if webhooks.endpoint_count(session, tenant_id) >= MAX_WEBHOOKS_PER_TENANT:
        raise InvalidRequest(
            f"This tenant has {MAX_WEBHOOKS_PER_TENANT} webhooks, the most allowed; delete one first",
            code="too_many_webhooks",
        )
    endpoint = WebhookEndpoint(
        id=new_id("wh"),
        tenant_id=tenant_id,
        url=request.url,
        events=list(dict.fromkeys(request.events)),
        secret=signing.new_secret(),
    )
    webhooks.add_endpoint(session, endpoint)
    return endpoint


def get_webhook(session: Session, tenant_id: str, webhook_id: str) -> WebhookEndpoint:
    endpoint = webhooks.endpoint_for_tenant(session, tenant_id, webhook_id)
    if endpoint is None:
        raise NotFound(f"No webhook '{webhook_id}'", param="webhook_id", code="webhook_not_found")
    return endpoint


def list_webhooks(session: Session, tenant_id: str, *, limit: int, after: str | None) -> WebhookList:
    query = webhooks.endpoints_query(tenant_id)
    return paginate(session, query, limit=limit, after=after, newest_first=True, into=WebhookList)


def delete_webhook(session: Session, tenant_id: str, webhook_id: str) -> str:
    """Delete an endpoint; its pending deliveries go with it, unsent."""
    webhooks.delete_endpoint(session, get_webhook(session, tenant_id, webhook_id))
    return webhook_id


def list_deliveries(
    session: Session, tenant_id: str, webhook_id: str, *, limit: int, after: str | None
) -> WebhookDeliveryList:
    """The endpoint's deliveries, newest first."""
    endpoint = get_webhook(session, tenant_id, webhook_id)
    query = webhooks.deliveries_query(endpoint.id)
    return paginate(session, query, limit=limit, after=after, newest_first=True, into=WebhookDeliveryList)
