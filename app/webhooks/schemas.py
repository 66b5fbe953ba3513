"""Request bodies of the webhooks API and the objects it answers with, each built from its row by
`from_row`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.limits import WebhookUrl
from app.models import WebhookDelivery, WebhookEndpoint
from app.pagination import ListPage
from app.webhooks.events import EVENT_OF_STATUS, EventType


class WebhookCreate(BaseModel):
    """`POST /v1/webhooks`: where to send which job events."""

    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl = Field(
        description="http(s) URL, without credentials, whose host resolves to public addresses only (unless "
        "the operator allows private ones)."
    )
    events: list[EventType] = Field(
        min_length=1,
        max_length=len(EVENT_OF_STATUS),
        description="The job events to send (each once; a repeat is ignored).",
    )


class WebhookObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[EventType]
    created_at: int

    @classmethod
    def from_row(cls, row: WebhookEndpoint) -> WebhookObject:
        return cls(id=row.id, url=row.url, events=row.events, created_at=row.created_at)


class CreatedWebhook(WebhookObject):
    secret: str = Field(
        description="`whsec_…`: the key of the endpoint's signatures, shown in this response only."
    )


class WebhookList(ListPage[WebhookObject]):
    pass


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool = True


class WebhookDeliveryObject(BaseModel):
    """One event sent (or being sent) to an endpoint."""

    id: str = Field(description="The `webhook-id` header of every attempt.")
    object: Literal["webhook.delivery"] = "webhook.delivery"
    webhook_id: str
    type: EventType
    fine_tuning_job_id: str
    status: Literal["pending", "delivered", "failed"] = Field(
        description="`pending` until the endpoint answers 2xx (`delivered`) or every retry failed (`failed`)."
    )
    attempts: int = Field(description="Attempts started so far.")
    last_status_code: int | None = Field(description="The HTTP status of the last attempt, if it got one.")
    last_error: str | None = Field(description="Why the last attempt failed, if it did.")
    next_attempt_at: int | None = Field(description="When the next attempt is due, while pending.")
    created_at: int
    delivered_at: int | None

    @classmethod
    def from_row(cls, row: WebhookDelivery) -> WebhookDeliveryObject:
        pending = row.status == WebhookDelivery.PENDING
        return cls(
            id=row.id,
            webhook_id=row.endpoint_id,
            type=row.event_type,
            fine_tuning_job_id=row.job_id,
            status=row.status,
            attempts=row.attempts,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            next_attempt_at=round(row.next_attempt_at) if pending else None,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
        )


class WebhookDeliveryList(ListPage[WebhookDeliveryObject]):
    pass
